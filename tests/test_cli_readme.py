"""The README's commands and examples are the ones that run: the install line takes torch's CPU build
from PyTorch's CPU index, CI runs the README's own test command, and the Python API example works."""

import re
import subprocess

import helpers

README = helpers.REPO / "README.md"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _quick_start_commands():
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    python3 -m venv")]


def test_install_commands_take_torch_from_the_cpu_index_first():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    for command in commands:
        steps = [step.strip() for step in command.split("&&")]
        torch_step = next(k for k, step in enumerate(steps) if "torch" in step)
        # torch alone, pinned, from PyTorch's CPU index; dubber after it from the usual index
        assert re.fullmatch(rf"pip install --no-deps torch==[\d.]+ {re.escape(CPU_INDEX)}", steps[torch_step]), command
        assert steps[torch_step + 1].startswith("pip install -e ") and "index-url" not in steps[torch_step + 1]
    assert commands[1].endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    """.ci/run reads its command from the README (the same grep it uses), so the two cannot drift."""
    script = (helpers.REPO / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 -E '([^']+)' README.md", script).group(1)
    found = subprocess.run(["grep", "-m1", "-E", pattern, str(README)], capture_output=True, text=True).stdout
    assert found.strip() == _quick_start_commands()[1]
    assert 'eval "$command"' in script
