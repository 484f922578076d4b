"""One process of a torchrun launch for tests/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc-per-node N tests/distributed_worker.py JOBS.json

Each job trains through dubber.train.loop.train on synthetic clips made here exactly as the test
makes them; then every process saves the parameters of the modules it trained (as train_step saw them,
unwrapped) to <out>.rank<K>.pt, so the test can check the processes stayed identical.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_distributed import synthetic_clips  # noqa: E402

from dubber.train import distributed  # noqa: E402
from dubber.train.loop import train  # noqa: E402
from dubber.train.recipes import recipe_for  # noqa: E402


def run(job: dict) -> None:
    recipe = recipe_for(job["recipe"], **job["hyperparameters"])
    seen = {}
    step = recipe.train_step

    def capture(modules, *args):
        seen.update(modules)
        return step(modules, *args)

    recipe.train_step = capture
    train(recipe, synthetic_clips(job["recipe"]), job["out"], job["steps"], device="cpu", log_every=1,
          log=print, **job.get("options", {}))
    Path(job["out"]).parent.mkdir(parents=True, exist_ok=True)  # process 0 may not have written there yet
    torch.save({name: {key: value.detach() for key, value in getattr(module, "module", module).named_parameters()}
                for name, module in seen.items()},
               f"{job['out']}.rank{distributed.rank()}.pt")


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        run(job)
    distributed.leave()
