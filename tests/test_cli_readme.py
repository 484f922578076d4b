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


def _python_api_example() -> str:
    import textwrap

    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    lines, started = [], False
    for line in section.splitlines():
        if line.startswith("    "):
            started = True
            lines.append(line)
        elif started and not line.strip():
            lines.append("")
        elif started:
            break
    return textwrap.dedent("\n".join(lines)).strip() + "\n"


def test_the_python_api_example_runs(tmp_path):
    """The README's example, verbatim, in a fresh interpreter, with a 1 s speech track in place of
    examples/speech.wav (the example photo is the real one): it lists the face and dubs it."""
    import shutil
    import sys

    from dubber import media

    code = _python_api_example()
    assert "import dubber" in code and "dubber.lipsync(" in code
    (tmp_path / "examples").mkdir()
    shutil.copyfile(helpers.FACE_PHOTO, tmp_path / "examples" / "face.jpg")
    helpers.make_tone_speech(tmp_path / "examples" / "speech.wav", 1.0)
    (tmp_path / "example.py").write_text(code)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[(0, (181.")  # the one face of the example photo, id 0
    assert lines[1].startswith("out.mp4: 25 frames, 25 dubbed, backbone dck on ")
    assert len(helpers.decode_frames(tmp_path / "out.mp4")) == 25 and media.probe(tmp_path / "out.mp4").has_audio


def test_the_api_takes_options_as_keywords_and_checks_them(tmp_path):
    import pytest

    import dubber

    with pytest.raises(dubber.OptionError, match=r"^--crf 99: must be between 0 and 51"):
        dubber.lipsync(helpers.FACE_PHOTO, helpers.SPEECH, tmp_path / "o.mp4", crf=99)
    with pytest.raises(TypeError):
        dubber.lipsync(helpers.FACE_PHOTO, helpers.SPEECH, tmp_path / "o.mp4", no_such_option=1)
    options = dubber.LipsyncOptions(crf=20)
    with pytest.raises(dubber.DubberError, match="file not found"):
        dubber.lipsync(tmp_path / "none.jpg", helpers.SPEECH, tmp_path / "o.mp4", options, crf=18)
    assert options.crf == 20  # the caller's options are not changed
    assert dubber.__version__ and "lipsync" in dir(dubber)
