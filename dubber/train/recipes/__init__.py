"""Training recipes: how each registered model is trained. The loop (dubber.train.loop) owns the
rest -- RNG, checkpoints, resume, logging, validation, early stopping, shipping.

A recipe is a dataclass whose fields are its hyperparameters (defaults: the named constants of
its module); they are recorded in the shipped file's meta. The recipe of model NAME lives in the
module named like NAME's model module (dubber.backbones.BUILTIN), registered with @recipe.
"""

import dataclasses
import importlib
from typing import Any, ClassVar, Dict, List, Sequence

import numpy as np
import torch

from dubber.audio import MEL_WINDOW
from dubber.errors import DubberError
from dubber.face.crops import CropSpec

_RECIPES: Dict[str, type] = {}


def recipe(cls: type) -> type:
    """Class decorator: the recipe for model cls.model."""
    _RECIPES[cls.model] = dataclasses.dataclass(cls)
    return _RECIPES[cls.model]


def _import_recipes(*names: str) -> None:
    """Import the recipe modules of these registered models (those that have one)."""
    from dubber.backbones import BUILTIN

    for module in sorted({BUILTIN[name] for name in names if name in BUILTIN}):
        try:
            importlib.import_module(f"{__name__}.{module.rsplit('.', 1)[1]}")
        except ModuleNotFoundError as exc:
            if not exc.name.startswith(__name__):
                raise


def recipe_for(name: str, **hyperparameters) -> "Recipe":
    """The recipe of registered model `name`, with hyperparameters overridden."""
    _import_recipes(name)
    if name not in _RECIPES:
        raise DubberError(f"no training recipe for {name!r}; trainable: {', '.join(sorted(trainable()))}")
    fields = {f.name for f in dataclasses.fields(_RECIPES[name])}
    unknown = set(hyperparameters) - fields
    if unknown:
        raise DubberError(f"recipe {name!r} has no hyperparameter {', '.join(sorted(unknown))}")
    return _RECIPES[name](**hyperparameters)


def trainable() -> List[str]:
    """Names of the registered models that have a recipe."""
    from dubber.backbones import BUILTIN

    _import_recipes(*BUILTIN)
    return sorted(_RECIPES)


class Recipe:
    """Base of the recipes. Subclasses set the class attributes, add hyperparameter fields and
    implement build / optimizers / anchors / train_step / validate."""

    model: ClassVar[str] = ""  # registry name of the model it ships
    identity_power: ClassVar[float] = 0.0  # IdentitySampler's weighting (0: identities uniformly)
    select_metric: ClassVar[str] = ""  # validation figure that selects the shipped step
    select_mode: ClassVar[str] = "min"  # "min" or "max"
    ship_half: ClassVar[bool] = True  # store the shipped model in fp16
    validation_clips: ClassVar[int] = 8  # clips scored at each validation (spread over identities)
    validation_split: ClassVar[str] = "val_select"  # the corpus split they come from (dubber.data.corpus)
    needs_pixels: ClassVar[bool] = True  # False: the clips carry the crops' transforms, not their images

    def hyperparameters(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def crops(self) -> Sequence[CropSpec]:
        """Crops the clips must carry (dubber.data.load_clips)."""
        raise NotImplementedError

    def mel_width(self) -> int:
        """Mel frames in each frame's audio window of the clips (dubber.data.load_clips): what the
        model declares (Backbone.mel_width), the experts' MEL_WINDOW otherwise."""
        from dubber.backbones import models

        return getattr(models()[self.model], "mel_width", MEL_WINDOW)

    def build(self) -> Dict[str, torch.nn.Module]:
        """Named modules, freshly initialised; "model" is the one shipped."""
        raise NotImplementedError

    def optimizers(self, modules: Dict[str, torch.nn.Module]) -> Dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def anchors(self, clip: dict) -> np.ndarray:
        """Frames of a clip a sample may be built around (see dubber.train.sampler)."""
        raise NotImplementedError

    def trained(self, modules: Dict[str, torch.nn.Module]) -> Dict[str, torch.nn.Module]:
        """The modules train_step is given, by name: `modules` unless train_step calls one through
        other methods than forward. On several processes the loop wraps each in
        DistributedDataParallel, which averages the gradients of what runs through forward() only."""
        return modules

    def train_step(self, modules, optimizers, sampler, rng: np.random.Generator, step: int,
                   device: torch.device) -> Dict[str, float]:
        """Draw a batch with `rng`, take the optimiser steps, return the losses. `modules` are
        trained(...)'s, to be called (forward) and nothing else. Under torchrun each of N processes
        draws the whole step's batch of N * batch_size alike and trains on its own rows
        (dubber.train.distributed.shard)."""
        raise NotImplementedError

    def validate(self, modules, clips: Sequence[dict], device: torch.device) -> Dict[str, float]:
        """Validation figures on held-out clips (names start with "val_")."""
        return {}

    def initialised(self, model: torch.nn.Module, init: str) -> torch.nn.Module:
        """`model` with the weights of the file `init` (fine-tuning), or as it is when init is "".
        The file must hold this model built with the same constructor arguments."""
        if init:
            from dubber.backbones import load

            start = load(self.model, init)
            if start.init_kwargs != model.init_kwargs:
                raise DubberError(f"holds a {self.model} built with {start.init_kwargs}, not {model.init_kwargs}", init)
            model.load_state_dict(start.state_dict())
        return model

    def finish(self, modules, sampler, rng: np.random.Generator, device: torch.device) -> None:
        """Last touches before shipping (e.g. BatchNorm statistics); after the resumable state is saved."""
