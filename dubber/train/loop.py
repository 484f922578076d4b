"""The one training loop. A recipe (dubber.train.recipes) supplies modules, batches and losses;
the loop owns the rest:

- the per-step RNG: step k draws from numpy's default_rng([seed, k]) and torch's generator seeded
  from (seed, k), so a resumed run draws exactly what an uninterrupted one would (bit-exact resume);
- training checkpoints of every named module and optimiser, atomically, every `checkpoint_every`
  steps, at the end and on Ctrl-C;
- logging with progress and ETA; periodic validation on held-out clips; early stopping and the
  choice of the shipped step on the recipe's validation metric;
- the shipped file: the selected model with its recipe, data, steps, hardware and figures in meta;
- several processes under torchrun (dubber.train.distributed): process 0 logs, validates and
  writes; every process trains its shard of the step's batch.
"""

import copy
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from dubber.analysis import ProgressHook
from dubber.checkpoint import save_atomic, save_model
from dubber.errors import DubberError
from dubber.train import distributed
from dubber.train.recipes import Recipe
from dubber.train.sampler import IdentitySampler

TRAIN_FORMAT = "dubber-train-2"
LOG_EVERY = 50  # steps
CHECKPOINT_EVERY = 500  # steps
SEED = 0



def checkpoint_path_for(out_path: Union[str, Path]) -> Path:
    """Where the resumable training state of `out_path` lives: <stem>.train.pt beside it."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".train.pt")


def hardware_description(device: torch.device) -> str:
    """What trained a model, for its checkpoint's meta: GPU name, or CPU model + torch threads."""
    import platform

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{name}, {device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _torch_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2 ** 63)


def train(recipe: Recipe, clips: Sequence[dict], out_path: Union[str, Path], steps: int, *,
          val_clips: Sequence[dict] = (), device: Union[str, torch.device] = "cpu", seed: int = SEED,
          checkpoint_path: Optional[Union[str, Path]] = None, resume: bool = True, log_every: int = LOG_EVERY,
          checkpoint_every: int = CHECKPOINT_EVERY, val_every: int = 0, patience: int = 0,
          data_meta: Optional[Dict[str, object]] = None, log: Callable[[str], None] = print,
          progress: Optional[ProgressHook] = None, max_seconds: Optional[float] = None) -> List[Dict[str, float]]:
    """Train `recipe.model` for `steps` optimiser steps in total; write the shipped file to out_path.

    With `resume`, an existing training checkpoint (default: checkpoint_path_for(out_path)) is
    continued, so calling again with a larger `steps` trains further. With val_clips and val_every,
    the model is validated every val_every steps and the shipped file is the step with the best
    recipe.select_metric; patience > 0 stops after that many validations without improvement.
    max_seconds stops after the step that reaches that much training time in this call (a time
    budget, e.g. a borrowed GPU's minutes); the state is saved, so a later call continues.
    Under torchrun each of N processes trains B = the recipe's batch_size rows of a step's N*B
    (dubber.train.distributed); only process 0 logs and writes files.
    Returns the logged history (mean losses per log_every steps, and the validations).
    """
    device = distributed.join(torch.device(device))
    main = distributed.is_main()
    log, progress = distributed.main_only(log, progress)
    out_path = Path(out_path)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else checkpoint_path_for(out_path)
    sampler = IdentitySampler(clips, recipe.anchors, recipe.identity_power)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        modules = recipe.build()
    optimizers = recipe.optimizers(modules)
    state = {"step": 0, "history": [], "best": None, "since_best": 0}
    if resume and checkpoint_path.is_file():
        _load(checkpoint_path, recipe, modules, optimizers, state)
        log(f"resumed from {checkpoint_path} at step {state['step']}")
    distributed.check_same(state["step"], "step to resume from", device)
    for module in modules.values():
        module.to(device).train()
    _optimizers_to(optimizers, device)
    trained = {name: distributed.wrap(module, device) for name, module in recipe.trained(modules).items()}
    if distributed.world_size() > 1:
        log(f"{distributed.world_size()} processes, {device.type}: a step's batch is each process's batch_size "
            f"times {distributed.world_size()}")

    def save():
        if not main:
            return
        save_atomic({
            "format": TRAIN_FORMAT, "recipe": recipe.model, "hyperparameters": recipe.hyperparameters(),
            "seed": seed, "step": state["step"], "history": state["history"], "best": state["best"],
            "since_best": state["since_best"], "processes": distributed.world_size(),
            "kwargs": {name: dict(getattr(m, "init_kwargs", {})) for name, m in modules.items()},
            "modules": {name: m.state_dict() for name, m in modules.items()},
            "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
        }, checkpoint_path)

    total = steps - state["step"]
    advance = (lambda n: progress("train", n, total)) if progress else (lambda n: None)
    if progress:
        progress("train", 0, total)
    totals: Dict[str, float] = {}
    counted, tic, started = 0, time.perf_counter(), time.perf_counter()
    stopped_early = False
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            while state["step"] < steps:
                step = state["step"]
                rng = np.random.default_rng([seed, step])
                torch.manual_seed(_torch_seed(seed, step))
                losses = recipe.train_step(trained, optimizers, sampler, rng, step, device)
                state["step"] = step = step + 1
                advance(1)
                if step == steps - total + 1 and total > 1:  # the first step of this run: an estimate
                    took = time.perf_counter() - started
                    budget = (f"; the time budget stops it after {_duration(max_seconds)}, about "
                              f"{max(1, int(max_seconds / took))} steps"
                              if max_seconds is not None and took * total > max_seconds else "")
                    log(f"first step took {took:.1f} s: about {_duration(took * total)} for {total} steps{budget} "
                        f"(later steps are usually faster; the log gives a running ETA)")
                for key, value in losses.items():
                    totals[key] = totals.get(key, 0.0) + value
                counted += 1
                if step % log_every == 0 or step == steps:
                    seconds = (time.perf_counter() - tic) / counted
                    means = distributed.mean({key: value / counted for key, value in totals.items()}, device)
                    state["history"].append({"step": step, "s_per_step": seconds, **means})
                    eta = (steps - step) * (time.perf_counter() - started) / max(step - (steps - total), 1)
                    log(f"step {step}/{steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
                        + f"  {seconds:.2f} s/step  eta {_duration(eta)}")
                    totals, counted, tic = {}, 0, time.perf_counter()
                if val_clips and val_every and (step % val_every == 0 or step == steps):
                    stopped_early = main and _validate(recipe, modules, val_clips, device, state, patience, log)
                    stopped_early = distributed.main_decides(stopped_early, device)
                out_of_time = (max_seconds is not None and step < steps
                               and distributed.main_decides(time.perf_counter() - started >= max_seconds, device))
                if step % checkpoint_every == 0 or step == steps or stopped_early or out_of_time:
                    save()
                if stopped_early:
                    log(f"early stop at step {step}: {recipe.select_metric} has not improved for {patience} validations")
                    break
                if out_of_time:
                    log(f"time budget of {_duration(max_seconds)} reached at step {step}")
                    break
    except KeyboardInterrupt:
        save()
        log(f"interrupted: training state saved at step {state['step']} ({checkpoint_path}); rerun to resume")
        raise

    def write_model():
        model = modules["model"]
        best = state["best"]
        if best is not None:
            model.load_state_dict(best["state"])
        for module in modules.values():
            module.train()
        recipe.finish(modules, sampler, np.random.default_rng([seed, steps, 1]), device)
        meta = {
            "backbone": recipe.model,
            "recipe": {"name": recipe.model, **recipe.hyperparameters()},
            "steps": state["step"],
            "selected_step": best["step"] if best else state["step"],
            "validation": best["figures"] if best else {},
            "data": {**sampler.describe(), **(data_meta or {})},
            "seed": seed,
            "losses": {k: v for k, v in state["history"][-1].items() if k != "step"} if state["history"] else {},
            "hardware": hardware_description(device),
            "processes": distributed.world_size(),
        }
        save_model(model.cpu().eval(), out_path, meta=meta, half=recipe.ship_half)
        model.meta = meta
        log(f"wrote {out_path}")

    distributed.run_on_main(write_model)  # the others wait: none ends while process 0 writes
    return state["history"]


def _validate(recipe: Recipe, modules, val_clips, device, state, patience: int, log) -> bool:
    """Validate, keep the best state, return True when patience has run out."""
    for module in modules.values():
        module.eval()
    with torch.no_grad():
        figures = recipe.validate(modules, val_clips, device)
    for module in modules.values():
        module.train()
    step = state["step"]
    state["history"].append({"step": step, **figures})
    log(f"validation at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    value = figures.get(recipe.select_metric)
    if value is None or not np.isfinite(value):
        return False
    best = state["best"]
    better = best is None or (value < best["value"] if recipe.select_mode == "min" else value > best["value"])
    if better:
        state["best"] = {"step": step, "value": float(value), "figures": figures,
                         "state": copy.deepcopy({k: v.detach().cpu() for k, v in modules["model"].state_dict().items()})}
        state["since_best"] = 0
        return False
    state["since_best"] += 1
    return patience > 0 and state["since_best"] >= patience


def _load(path: Path, recipe: Recipe, modules, optimizers, state) -> None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DubberError(f"not a readable training checkpoint ({type(exc).__name__})", path) from exc
    if not isinstance(saved, dict) or saved.get("format") != TRAIN_FORMAT or saved.get("recipe") != recipe.model:
        raise DubberError(f"not a training checkpoint of {recipe.model!r}", path)
    kwargs = {name: dict(getattr(m, "init_kwargs", {})) for name, m in modules.items()}
    saved_settings = _step_settings(saved["hyperparameters"], saved.get("processes", 1))
    settings = _step_settings(recipe.hyperparameters(), distributed.world_size())
    if saved_settings != settings or saved["kwargs"] != kwargs:
        if saved["kwargs"] == kwargs and {**saved_settings, "batch_size": 0} == {**settings, "batch_size": 0}:
            batch, world = saved_settings["batch_size"], distributed.world_size()
            advice = (f"pass --batch-size {batch // world}" if batch % world == 0 else
                      f"it does not split over {world} processes")
            raise DubberError(f"checkpoint was trained with {batch} samples a step "
                              f"({saved.get('processes', 1)} process(es) of batch_size "
                              f"{saved['hyperparameters']['batch_size']}); on {world} process(es) {advice}, "
                              "or delete it or pass --no-resume", path)
        changed = sorted({k for k in set(saved_settings) | set(settings) if saved_settings.get(k) != settings.get(k)}
                         | {f"{name}({k})" for name in set(kwargs) | set(saved["kwargs"])
                            for k in set(kwargs.get(name, {})) | set(saved["kwargs"].get(name, {}))
                            if kwargs.get(name, {}).get(k) != saved["kwargs"].get(name, {}).get(k)})
        raise DubberError(f"checkpoint was trained with other settings ({', '.join(changed)}); "
                          "delete it or pass --no-resume", path)
    for name, module in modules.items():
        module.load_state_dict(saved["modules"][name])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(saved["optimizers"][name])
    for key in ("step", "history", "best", "since_best"):
        state[key] = saved[key]


def _step_settings(hyperparameters: Dict[str, object], processes: int) -> Dict[str, object]:
    """The hyperparameters a resumed run must keep, batch_size as a step's batch over all processes
    (a run resumes on any number of processes that share it out)."""
    settings = dict(hyperparameters)
    if "batch_size" in settings:
        settings["batch_size"] = settings["batch_size"] * processes
    return settings


def _optimizers_to(optimizers, device: torch.device) -> None:
    """Adam moments follow the model to the device (load_state_dict leaves them on the CPU)."""
    for optimizer in optimizers.values():
        for slot in optimizer.state.values():
            for key, value in slot.items():
                if torch.is_tensor(value) and key != "step":
                    slot[key] = value.to(device)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
