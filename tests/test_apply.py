"""The runner (dubber.apply): windows, overlap cross-fade, state carried and reset at gaps,
faceless frames passed through in order, tails padded and trimmed, batching of stateless windows."""

from typing import ClassVar

import numpy as np
import pytest
import torch

from dubber.apply import Generator, Step, apply_backbone, crossfade_weights
from dubber.backbones.base import CONDITION_NONE, Backbone, Generated
from dubber.face.crops import CROP_FACE, CropSpec

SIZE = 8


class Recorder(Backbone):
    """Adds (window position + 1) / 255 to each crop and records every call's shape and state."""

    name = "recorder"
    crop = CropSpec(CROP_FACE, 16)
    conditioning = CONDITION_NONE
    needs_weights = False
    window: ClassVar[int] = 1

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, faces, mels, identity=None, state=None) -> Generated:
        self.calls.append((tuple(faces.shape), state))
        position = torch.arange(faces.shape[1], dtype=faces.dtype).view(1, -1, 1, 1, 1)
        next_state = (0 if state is None else state) + 1 if self.stateful else None
        return Generated(faces + (position + 1) / 255, state=next_state)


def make(window: int, overlap: int, stateful: bool) -> Recorder:
    cls = type(f"Recorder{window}_{overlap}_{int(stateful)}", (Recorder,),
               {"window": window, "overlap": overlap, "stateful": stateful, "name": f"rec{window}{overlap}{stateful}"})
    return cls()


def stream(valid):
    """Steps whose crop value is 10 * frame index (so each output can be traced to its input)."""
    for t, ok in enumerate(valid):
        crop = np.full((SIZE, SIZE, 3), 10 * t % 250, np.uint8) if ok else None
        yield Step(crop, np.zeros((80, 16), np.float32), payload=t)


def run(backbone, valid, batch_frames=16):
    out = list(apply_backbone(Generator(backbone, torch.device("cpu")), stream(valid), None, batch_frames))
    assert [payload for payload, _, _ in out] == list(range(len(valid)))  # order kept
    return out


def test_crossfade_ramps_sum_to_one_across_an_overlap():
    weights = crossfade_weights(16, 4)
    assert weights[4:12].tolist() == [1.0] * 8
    stride = 12
    assert np.allclose(weights[stride:] + weights[:16 - stride], weights[stride:][0] + weights[0])
    assert crossfade_weights(1, 0).tolist() == [1.0]


def test_frame_backbone_is_batched_and_faceless_frames_pass_through():
    valid = [True] * 20 + [False] * 3 + [True] * 5
    backbone = make(1, 0, False)
    out = run(backbone, valid)
    for t, (_, crop, generated) in enumerate(out):
        if not valid[t]:
            assert crop is None and generated is None
        else:
            assert generated[0, 0, 0] == 10 * t % 250 + 1
    assert [shape[:2] for shape, _ in backbone.calls] == [(16, 1), (4, 1), (5, 1)]  # runs never mix


def test_windows_overlap_pad_and_trim():
    """21 frames, window 16, overlap 4: windows at 0 and 12 (padded to 28, trimmed to 21). Where
    they overlap, the cross-fade mixes position k + 1 of the first with k - 11 of the second."""
    backbone = make(16, 4, False)
    out = run(backbone, [True] * 21, batch_frames=64)
    assert [shape[:2] for shape, _ in backbone.calls] == [(2, 16)]  # both windows in one call
    weights = crossfade_weights(16, 4)
    for t, (_, _, generated) in enumerate(out):
        first = (t + 1, weights[t]) if t < 16 else (0, 0.0)
        second = (t - 12 + 1, weights[t - 12]) if t >= 12 else (0, 0.0)
        added = (first[0] * first[1] + second[0] * second[1]) / (first[1] + second[1])
        assert generated[0, 0, 0] == np.clip(np.round(10 * t + added), 0, 255), t


def test_short_run_is_padded_to_one_window():
    backbone = make(16, 4, False)
    out = run(backbone, [False, True, True, True, False])
    assert [shape[:2] for shape, _ in backbone.calls] == [(1, 16)]
    assert [g is not None for _, _, g in out] == [False, True, True, True, False]


@pytest.mark.parametrize("batch_frames", [16, 64])
def test_state_is_carried_within_a_run_and_reset_at_a_gap(batch_frames):
    valid = [True] * 30 + [False] * 2 + [True] * 20
    backbone = make(16, 4, True)
    run(backbone, valid, batch_frames)
    states = [state for _, state in backbone.calls]
    shapes = {shape[:2] for shape, _ in backbone.calls}
    # First run: windows at 0, 12, 24 (three calls, one window each); second run: 0 and 12.
    assert shapes == {(1, 16)} and states == [None, 1, 2, None, 1]


def test_bf16_autocast_keeps_the_generator_output():
    """precision bf16 (auto on CPUs with bf16 units): DCK's crops within a grey level or so of fp32's,
    and the choice itself follows the CPU (dubber.options.precision)."""
    from dubber import options
    from dubber.backbones import load_backbone

    assert options.precision("--precision", "auto", False, "cpu") == ("bf16" if options.cpu_computes_bf16() else "fp32")
    assert options.precision("--precision", "fp32", False, "cpu") == "fp32"
    with pytest.raises(options.OptionError):
        options.precision("--precision", "fp8", False, "cpu")
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (4, 1, 128, 128, 3), dtype=np.uint8)
    mels = rng.normal(size=(4, 1, 80, 16)).astype(np.float32)
    identity = crops[0, 0]
    full, _ = Generator(load_backbone("dck"), torch.device("cpu"), "fp32")(crops, mels, identity)
    fast = Generator(load_backbone("dck"), torch.device("cpu"), "bf16")
    half, _ = fast(crops, mels, identity)
    assert fast.autocast_bf16
    difference = np.abs(half - full)
    assert difference.mean() < 0.5 and difference.max() < 20, (difference.mean(), difference.max())
    assert difference.max() > 0  # it did run in bf16
