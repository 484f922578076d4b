"""The trainer's validation figures (dubber.train.validate): its still baselines."""

import numpy as np
import torch

from dubber.backbones.base import Generated
from dubber.backbones.toy import ToyFrame
from dubber.train.validate import generator_figures
from helpers import synthetic_box_clip


class CopiesIdentity(ToyFrame):
    """Draws every frame as the identity face it is given: a generator that learnt nothing."""

    def forward(self, faces, mels, identity=None, state=None):
        return Generated(identity[:, None].expand_as(faces).clone())


def test_a_generator_that_copies_its_identity_scores_the_identity_baseline():
    clips = [synthetic_box_clip("anna", 20, seed=1, size=64), synthetic_box_clip("bert", 20, seed=2, size=64)]
    copied = generator_figures(CopiesIdentity(), clips, torch.device("cpu"))
    assert np.isclose(copied["val_lmd"], copied["val_lmd_identity"], atol=1e-6)
    assert copied["val_lmd_identity"] > 0  # the mouths move: a still one is off

    drawn = generator_figures(ToyFrame(), clips, torch.device("cpu"))  # an untrained generator draws noise
    assert drawn["val_lmd_identity"] == copied["val_lmd_identity"]  # the baseline is the model's input
    assert not np.isclose(drawn["val_lmd"], drawn["val_lmd_identity"])
