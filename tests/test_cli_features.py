"""What users of ffmpeg, whisper, demucs and Wav2Lip reach for: --version, shell completion, a JSON
summary, part of a video (--start/--duration), speech longer than the video (--loop), the mouth
region's padding (--pads) and temporal smoothing off (--no-smooth)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import helpers
from dubber import media
from dubber.blend import lower_face_mask
from dubber.pipeline import source_order

FPS = 25


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """A 2 s video whose frames carry their index (helpers.draw_marker), 1 s of speech."""
    d = tmp_path_factory.mktemp("features")
    return {"video": helpers.make_face_video(d / "marked.mp4", 2.0, FPS),
            "speech": helpers.make_tone_speech(d / "speech.wav", 1.0)}


def _markers(path):
    return [helpers.read_marker(f) for f in helpers.decode_frames(path)]


def test_version():
    import dubber

    code, stdout, stderr = helpers.run_cli(["--version"])
    assert code == 0 and stdout.strip() == f"dubber {dubber.__version__}"
    # one source of the version: the package's, read by setuptools
    assert re.search(r'version = \{ ?attr = "dubber.__version__" ?\}', (helpers.REPO / "pyproject.toml").read_text())
    code, stdout, _ = helpers.run_cli_subprocess(["-V"])
    assert code == 0 and re.fullmatch(r"dubber \d+\.\d+\.\d+\S*", stdout.strip())


def test_shell_completion_script_and_answers():
    script = Path(sys.executable).with_name("dubber")  # the console script: completion answers by its name
    if not script.is_file():
        pytest.skip("no dubber console script beside this Python")
    cmd = [str(script)]
    # typer guesses the shell from the parent processes (none under some test runners) unless told
    # to take the one named, as its own tests do
    env = dict(os.environ, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    shown = subprocess.run(cmd + ["--show-completion", "bash"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "_dubber_completion" in shown.stdout and "complete" in shown.stdout, shown
    env = dict(os.environ, _DUBBER_COMPLETE="complete_bash", COMP_WORDS="dubber lip", COMP_CWORD="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["lipsync"], result
    env.update(COMP_WORDS="dubber lipsync --lo", COMP_CWORD="2")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["--loop"], result


def test_json_summary(marked, tmp_path):
    output = tmp_path / "o.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", marked["video"], marked["speech"], "-o", output,
                                            "--backbone", "identity", "--json", "-q"])
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["output"] == str(output) and summary["frames"] == FPS and summary["faces"] == FPS
    assert summary["backbone"] == "identity" and summary["device"] == "cpu" and summary["passed_through"] == 0


def test_json_batch(marked, tmp_path):
    faces, out = tmp_path / "faces", tmp_path / "out"
    faces.mkdir()
    (faces / "a.mp4").write_bytes(marked["video"].read_bytes())
    (faces / "b.mp4").write_text("not a video")
    code, stdout, stderr = helpers.run_cli(["lipsync", faces, marked["speech"], "-o", out, "--backbone", "identity",
                                            "--json", "-q"])
    assert code == 1 and stderr.strip() == "error: 1 of 2 items failed"
    rows = {r["face"].rsplit("/", 1)[-1]: r for r in json.loads(stdout)}
    assert rows["a.mp4"]["status"] == "done" and rows["b.mp4"]["status"] == "failed"


@pytest.mark.slow
def test_start_and_duration_dub_part_of_the_video(marked, tmp_path):
    output = tmp_path / "part.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", marked["video"], marked["speech"], "-o", output,
                                            "--backbone", "identity", "--start", "0.8", "--duration", "1", "-q"])
    assert code == 0, stderr
    assert _markers(output) == list(range(20, 45))


def test_source_order_for_every_loop_mode():
    assert source_order(7, 3, "pingpong").tolist() == [0, 1, 2, 1, 0, 1, 2]
    assert source_order(7, 3, "repeat").tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert source_order(7, 3, "hold").tolist() == [0, 1, 2, 2, 2, 2, 2]
    assert source_order(7, 3, "stretch").tolist() == [0, 0, 0, 1, 1, 2, 2]
    for mode in ("pingpong", "repeat", "hold", "stretch"):
        assert source_order(3, 5, mode).tolist() == [0, 1, 2]  # a longer video is cut
        assert source_order(4, 1, mode).tolist() == [0, 0, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["pingpong", "repeat", "hold", "stretch"])
def test_loop_modes_when_the_speech_is_longer(marked, loop, tmp_path):
    """10 frames of video (--duration 0.4) for 1 s of speech: the frames play in the --loop order."""
    output = tmp_path / "o.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", marked["video"], marked["speech"], "-o", output,
                                            "--backbone", "identity", "--duration", "0.4", "--loop", loop])
    assert code == 0, stderr
    assert _markers(output) == source_order(FPS, 10, loop).tolist()
    assert "video (10 frames) is shorter than the audio" in stderr and "(--loop)" in stderr


def _mask_edges(mask):
    ys, xs = np.nonzero(mask > 0.5)
    return ys.min(), ys.max(), xs.min(), xs.max()


def test_pads_grow_and_shrink_the_mask_side_by_side():
    """Wav2Lip's order: top bottom left right; negative shrinks."""
    from dubber.face.align import crop_transforms, transform_points
    from dubber.face.crops import CropSpec
    from dubber.pipeline import analyse

    track = analyse(helpers.FACE_PHOTO).track
    matrix = crop_transforms(track.landmarks, CropSpec("box", 128))[0]
    points = transform_points(track.landmarks[0], matrix) + 64  # centred in a 256 crop: far from its border
    edges = np.array(_mask_edges(lower_face_mask(points, 256)))
    for pads in ((0, 6, 0, 0), (5, 0, 0, 0), (0, 0, -4, 3), (-3, -3, 0, 0)):
        moved = np.array(_mask_edges(lower_face_mask(points, 256, pads))) - edges
        expected = np.array([-pads[0], pads[1], -pads[2], pads[3]])
        # the padded sides move by the pad; the others stay (within the blur's reach: 3 px)
        assert all(abs(m - e) <= (1 if e else 3) for m, e in zip(moved, expected)), (pads, moved)


@pytest.mark.slow
def test_pads_reach_the_frame(marked, tmp_path):
    """--pads 0 0 12 12 lets the (shifted) lower face change further out on both sides, nothing
    more above or below. (The region grows within the model's crop: its border still fades it out.)"""
    photo = helpers.write_image(tmp_path / "face.png", helpers.face_frame(0, (256, 256), motion=False))
    changed, frame = {}, {}
    # Against the identity backbone's output, not the photo: the encoder's 4:2:0 chroma leaves a few
    # sharp colour edges > 12 levels off in any output, pasted or not.
    for name, backbone, pads in (("source", "identity", ["0", "0", "0", "0"]),
                                 ("plain", "shiftmouth", ["0", "0", "0", "0"]),
                                 ("padded", "shiftmouth", ["0", "0", "12", "12"])):
        output = tmp_path / f"{name}.mp4"
        code, _, stderr = helpers.run_cli(["lipsync", photo, marked["speech"], "-o", output, "-q",
                                           "--backbone", backbone, "--pads", *pads])
        assert code == 0, stderr
        frame[name] = helpers.decode_frames(output)[5].astype(np.int16)
        if name != "source":
            changed[name] = np.abs(frame[name] - frame["source"]).mean(-1) > 12
    extent = {name: (np.nonzero(moved.any(1))[0][[0, -1]], np.nonzero(moved.any(0))[0][[0, -1]])
              for name, moved in changed.items()}
    print(f"changed (rows, columns): {extent}")
    (rows_plain, cols_plain), (rows_padded, cols_padded) = extent["plain"], extent["padded"]
    assert cols_padded[0] < cols_plain[0] - 2 and cols_padded[1] > cols_plain[1] + 2
    assert np.abs(rows_padded - rows_plain).max() <= 2
    assert changed["padded"].sum() > changed["plain"].sum()


def test_no_smooth_reaches_the_alignment(marked, tmp_path, monkeypatch):
    import dubber.pipeline

    seen = []
    real = dubber.pipeline.crop_transforms
    monkeypatch.setattr(dubber.pipeline, "crop_transforms",
                        lambda landmarks, spec, smooth=True: seen.append(smooth) or real(landmarks, spec, smooth))
    for flag, expected in (("--no-smooth", False), ("--smooth", True)):
        code, _, stderr = helpers.run_cli(["lipsync", marked["video"], marked["speech"], "-o", tmp_path / f"{flag}.mp4",
                                           "--backbone", "identity", flag, "-q"])
        assert code == 0, stderr
        assert seen[-1] is expected
    assert media.probe(tmp_path / "--no-smooth.mp4").has_video
