"""Shared fixtures for the end-to-end tests: test backbones registered, tiny media made once per session.

One torch thread everywhere: the tests run on small shared machines and the media are tiny.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No stored face analyses between tests (a test that wants them sets its own folder): every test
# analyses its inputs, and nothing is written to the user's ~/.cache.
os.environ["DUBBER_CACHE_DIR"] = "off"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402  (registers the identity and shiftmouth backbones)

GRID_DIRS = [helpers.REPO.parent / "shared" / "data" / "grid" / "s1", Path("/work/shared/data/grid/s1")]


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """A folder of inputs shared by the whole session; tests must not write into it."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def face_video(media_dir) -> Path:
    """2 s, 25 fps, 160x128 H.264 of the example face with head motion, a frame-index marker along the
    bottom rows, and an AAC track of speech-like audio."""
    return helpers.make_face_video(media_dir / "face_motion.mp4", seconds=2.0, fps=25, audio=True)


@pytest.fixture(scope="session")
def face_video_silent(media_dir) -> Path:
    """1 s, 25 fps, 160x128, head motion, no audio track."""
    return helpers.make_face_video(media_dir / "face_noaudio.mp4", seconds=1.0, fps=25)


@pytest.fixture(scope="session")
def speech_1s(media_dir) -> Path:
    """1.0 s of 16 kHz mono speech-like audio (exactly 25 frames at 25 fps)."""
    return helpers.make_tone_speech(media_dir / "speech_1s.wav", 1.0)


@pytest.fixture(scope="session")
def face_still(media_dir) -> Path:
    """A 160x128 PNG of the example face (no motion)."""
    return helpers.write_image(media_dir / "face_still.png", helpers.face_frame(0.0, motion=False))


@pytest.fixture(scope="session")
def grid_clip() -> Path:
    """The first clip of the GRID corpus' speaker 1 from ../shared/data (skipped when absent)."""
    for folder in GRID_DIRS:
        clips = sorted(folder.glob("*.mp4")) if folder.is_dir() else []
        if clips:
            return clips[0]
    pytest.skip("GRID data (../shared/data/grid/s1) is not available on this machine")


@pytest.fixture(scope="session")
def dck_eval(tmp_path_factory):
    """`dubber eval` of two clips with different speech (dck and its dub, scored with the expert):
    (output folder, stdout). Shared by the eval and report tests, which only read it."""
    root = tmp_path_factory.mktemp("dck_eval")
    clips = root / "clips"
    clips.mkdir()
    for k in range(2):  # different speech in each, so a dub is driven by something new
        speech = helpers.make_tone_speech(root / f"speech{k}.wav", 1.4, seed=k)
        helpers.make_face_video(clips / f"clip{k}.mp4", seconds=1.4, fps=25, size=(192, 160), audio=speech,
                                marker=False)
    out_dir = root / "eval"
    code, out, err = helpers.run_cli_subprocess(
        ["eval", "--dataset", "folder", "--root", clips, "--backbone", "dck", "--dub", "--device", "cpu",
         "--out", out_dir, "-q"])
    assert code == 0, err
    return out_dir, out
