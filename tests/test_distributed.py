"""Training on several processes (dubber.train.distributed): torchrun with 2 CPU processes (gloo)
trains as one process with the doubled batch, resumes across process counts, keeps the processes of
a GAN recipe identical, and `torchrun -m dubber train` writes one model and prints once.

Two launches, each in real processes: tests/distributed_worker.py for the comparisons (a few
steps of tiny models), and the CLI on a tiny corpus.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dubber.errors import DubberError
from dubber.train.loop import checkpoint_path_for, train
from dubber.train.recipes import recipe_for

import test_train_eval_e2e

torch.set_num_threads(1)

corpus = test_train_eval_e2e.corpus  # the fixture: a tiny corpus in ../shared/data's layout
WORKER = Path(__file__).with_name("distributed_worker.py")
PROCESSES = 2
BATCH = 4  # per process
TOY = "toy_frame"  # no BatchNorm: the runs must agree to float precision
FIRST, LAST = 4, 6  # steps of the first run and of the resumed one
TOLERANCE = 1e-5


def synthetic_clips(recipe: str):
    """The clips each job trains on, made alike in the test and in every worker process."""
    from test_dck import synthetic_clip as face_clip

    if recipe == "syncnet":
        from test_syncnet import synthetic_clip as mouth_clip

        rng = np.random.default_rng(0)
        return [mouth_clip(rng, 40, name) for name in ("anna", "bert")]
    size = 64 if recipe == TOY else 32
    return [face_clip(name, 16, size, seed) for seed, name in enumerate(("anna", "bert"))]


def torchrun(*args, timeout: float = 300):
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS` -> CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="250")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(PROCESSES), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def one_process(out: Path, steps: int, batch: int):
    return train(recipe_for(TOY, batch_size=batch), synthetic_clips(TOY), out, steps, log=lambda message: None)


def trained_state(out: Path) -> dict:
    return torch.load(checkpoint_path_for(out), weights_only=True)["modules"]["model"]


def assert_same(a: dict, b: dict, tolerance: float = TOLERANCE) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tolerance, msg=name)


def differs(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[name], b[name], rtol=0, atol=100 * TOLERANCE) for name in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch of 2 processes: a fresh toy run (BATCH each) to FIRST steps; the resumption to
    LAST of a 1-process checkpoint at FIRST; DCK with its discriminator training from step 0; the
    sync expert. Around it, the 1-process runs at 2 * BATCH they are compared with."""
    root = tmp_path_factory.mktemp("distributed")
    one_process(root / "one" / "toy.pt", FIRST, PROCESSES * BATCH)
    one_process(root / "straight" / "toy.pt", LAST, PROCESSES * BATCH)
    shutil.copytree(root / "one", root / "one_then_two")
    jobs = [
        {"recipe": TOY, "hyperparameters": {"batch_size": BATCH}, "out": str(root / "two" / "toy.pt"), "steps": FIRST},
        {"recipe": TOY, "hyperparameters": {"batch_size": BATCH}, "out": str(root / "one_then_two" / "toy.pt"),
         "steps": LAST},
        {"recipe": "dck", "hyperparameters": {"batch_size": 2, "size": 32, "adv_start": 0},
         "out": str(root / "dck" / "dck.pt"), "steps": 2},
        {"recipe": "syncnet", "hyperparameters": {"batch_size": 8, "base_channels": 8, "embed_dim": 32},
         "out": str(root / "syncnet" / "syncnet.pt"), "steps": 2},
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    launched = torchrun(WORKER, root / "jobs.json")
    assert launched.returncode == 0, "\n".join(line for line in launched.stderr.splitlines() if "[rank" in line)
    shutil.copytree(root / "two", root / "two_then_one")
    one_process(root / "two_then_one" / "toy.pt", LAST, PROCESSES * BATCH)
    return root, launched


def test_two_processes_train_as_one_with_the_doubled_batch(runs, tmp_path):
    root, launched = runs
    two = trained_state(root / "two" / "toy.pt")
    assert_same(two, trained_state(root / "one" / "toy.pt"))
    # Not what one process at the per-process batch trains: each process trained other samples.
    one_process(tmp_path / "toy.pt", FIRST, BATCH)
    assert differs(two, trained_state(tmp_path / "toy.pt"))
    # Process 0 alone logs and writes; the file says how it was trained.
    assert launched.stdout.count(f"wrote {root / 'two' / 'toy.pt'}") == 1
    written = {p.name for p in (root / "two").iterdir()}
    assert written == {"toy.pt", "toy.train.pt", "toy.pt.rank0.pt", "toy.pt.rank1.pt"}  # the last two: the worker's
    meta = torch.load(root / "two" / "toy.pt", weights_only=True)["meta"]
    assert meta["processes"] == PROCESSES and meta["recipe"]["batch_size"] == BATCH


def test_a_run_resumes_on_another_number_of_processes(runs, tmp_path):
    """2 processes of BATCH then 1 of 2 * BATCH, and the other way round, train as 1 process of
    2 * BATCH throughout: the checkpoint holds the unwrapped state, and the step's batch is kept."""
    root, _ = runs
    straight = trained_state(root / "straight" / "toy.pt")
    assert_same(trained_state(root / "two_then_one" / "toy.pt"), straight)
    assert_same(trained_state(root / "one_then_two" / "toy.pt"), straight)
    # Resuming with another step's batch is refused, with the batch_size that would fit.
    shutil.copytree(root / "two", tmp_path / "two")
    with pytest.raises(DubberError, match=f"trained with {PROCESSES * BATCH} samples a step .* "
                                          f"pass --batch-size {PROCESSES * BATCH}"):
        one_process(tmp_path / "two" / "toy.pt", LAST, BATCH)


@pytest.mark.parametrize("recipe, out", [("dck", "dck/dck.pt"), ("syncnet", "syncnet/syncnet.pt")])
def test_processes_of_recipes_with_several_modules_and_batchnorm_stay_identical(runs, recipe, out):
    """DDP averages the generator's and the discriminator's gradients alike (DCK trains both from
    step 0 here), and SyncNet's two encoders through its one forward: every process ends with the
    same weights, though each trained on other samples."""
    root, _ = runs
    states = [torch.load(f"{root / out}.rank{k}.pt", weights_only=True) for k in range(PROCESSES)]
    assert set(states[0]) == ({"model", "disc"} if recipe == "dck" else {"model"})
    for name in states[0]:
        assert_same(states[0][name], states[1][name], tolerance=0)
    history = torch.load(checkpoint_path_for(root / out), weights_only=True)["history"]
    assert history[-1]["step"] == 2 and all(np.isfinite(v) for v in history[-1].values())
    if recipe == "dck":
        assert "d" in history[-1] and "g_adv" in history[-1]


@pytest.mark.slow
def test_torchrun_dubber_train_reports_and_writes_once(corpus, tmp_path):
    """The README's command on the tiny corpus, with validation (process 0 alone validates, the
    others wait for its decision) and a time budget (process 0's clock, broadcast)."""
    out = tmp_path / "run" / "toy_frame.pt"
    launched = torchrun("-m", "dubber", "train", "--backbone", "toy_frame", "--data", corpus, "--cache",
                        tmp_path / "cache", "--out", out, "--steps", 3, "--batch-size", 2, "--grid-every", 1,
                        "--device", "cpu", "--workers", 1, "--val-every", 2, "--log-every", 1, "--minutes", 30)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.splitlines() == [str(out)]
    for line in ("validation at step 2", "validation at step 3", "step 3/3", f"wrote {out}"):
        assert launched.stderr.count(line) == 1, line
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["processes"] == PROCESSES and meta["steps"] == 3 and meta["selected_step"] in (2, 3)
