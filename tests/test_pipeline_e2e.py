"""The other commands end to end: `preprocess` writes the documented cache, `blend` pastes crops back
from it, `--quiet` is quiet, and the package runs as `python -m dubber`."""

import numpy as np
import pytest

import helpers
from dubber import media
from dubber.audio import N_MELS
from dubber.face.align import warp_crop
from dubber.cache import CACHE_VERSION, load_cache


@pytest.fixture(scope="module")
def clip(media_dir):
    """1.2 s, 25 fps, 256x192 with head motion and its own audio track."""
    return helpers.make_face_video(media_dir / "e2e_clip.mp4", seconds=1.2, fps=25, size=(256, 192), audio=True)


@pytest.fixture(scope="module")
def cache(clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    code, stdout, stderr = helpers.run_cli(["preprocess", clip, "-o", out, "--crop", "face:96", "--crop", "box:128",
                                            "--crop", "lips:64", "-q"])
    assert code == 0, stderr
    path = out / f"{clip.stem}.npz"
    assert stdout.strip() == str(path) and stderr == ""
    assert [p.name for p in out.iterdir()] == [path.name]  # no temporary left beside it
    return path


@pytest.mark.slow
def test_preprocess_writes_the_documented_arrays(clip, cache):
    data = load_cache(cache)
    n = 30
    assert int(data["version"]) == CACHE_VERSION
    assert float(data["fps"]) == 25.0 and (int(data["width"]), int(data["height"])) == (256, 192)
    assert data["landmarks"].shape == (n, 68, 2) and data["landmarks"].dtype == np.float32
    assert data["boxes"].shape == (n, 4) and data["valid"].shape == (n,) and data["valid"].all()
    assert int(data["faces_seen"]) == 1
    frames = helpers.decode_frames(clip)
    assert len(frames) == n
    for key, size in (("face96", 96), ("box128", 128), ("lips64", 64)):
        transforms, crops = data[f"transform_{key}"], data[f"crops_{key}"]
        assert transforms.shape == (n, 2, 3) and transforms.dtype == np.float32
        assert crops.shape == (n, size, size, 3) and crops.dtype == np.uint8
        # crops are RGB, cut from the decoded frames by the stored transforms
        for t in (0, n // 2, n - 1):
            assert np.array_equal(crops[t], warp_crop(frames[t], transforms[t], size)[..., ::-1])
    # the box crop keeps the frame upright: no rotation in its transform
    assert np.allclose(data["transform_box128"][:, 0, 1], 0) and np.allclose(data["transform_box128"][:, 1, 0], 0)
    # the face crop removes the head's in-plane rotation, which the made video varies by ±8°
    angles = np.degrees(np.arctan2(data["transform_face96"][:, 1, 0], data["transform_face96"][:, 0, 0]))
    assert angles.max() - angles.min() > 5
    # the landmarks sit inside the boxes (give or take the chin, which dlib's box cuts)
    lm, box = data["landmarks"], data["boxes"]
    inside = (lm[..., 0] >= box[:, None, 0] - 10) & (lm[..., 0] <= box[:, None, 2] + 10) & \
             (lm[..., 1] >= box[:, None, 1] - 10) & (lm[..., 1] <= box[:, None, 3] + 25)
    assert inside.mean() > 0.95
    assert bool(data["has_audio"]) and data["mel"].shape[0] == N_MELS
    assert abs(data["mel"].shape[1] - 1.2 * 80) <= 2  # 80 mel frames per second


@pytest.mark.slow
def test_preprocess_without_audio_and_default_crops(face_video_silent, tmp_path):
    code, stdout, stderr = helpers.run_cli(["preprocess", face_video_silent, "-o", tmp_path, "-q"])
    assert code == 0, stderr
    data = load_cache(stdout.strip())
    assert not bool(data["has_audio"]) and "mel" not in data
    assert {"transform_face96", "crops_face96", "transform_box128", "crops_box128"} <= set(data)
    # a second run does not replace the cache unasked
    code, _, stderr = helpers.run_cli(["preprocess", face_video_silent, "-o", tmp_path, "-q"])
    assert code == 1 and stderr.startswith("error: ") and "--overwrite" in stderr


def _identity_crops(clip, data, key, size, folder):
    """The crops a do-nothing generator would return, one PNG per frame, cut by the cache's transforms."""
    folder.mkdir()
    for t, frame in enumerate(helpers.decode_frames(clip)):
        matrix = data[f"transform_{key}"][t]
        crop = np.zeros((size, size, 3), np.uint8) if np.isnan(matrix[0, 0]) else warp_crop(frame, matrix, size)
        helpers.write_image(folder / f"{t:05d}.png", crop)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["feather", "alpha"])
def test_blend_with_identity_crops_reproduces_the_source(clip, cache, mode, tmp_path):
    data = load_cache(cache)
    crops = _identity_crops(clip, data, "face96", 96, tmp_path / "crops")
    output = tmp_path / "blended.mp4"
    code, stdout, stderr = helpers.run_cli(["blend", clip, cache, crops, "-o", output, "--mode", mode, "-q"])
    assert code == 0, stderr
    assert stdout.strip() == str(output)
    source, result = np.stack(helpers.decode_frames(clip)), np.stack(helpers.decode_frames(output))
    assert result.shape == source.shape
    whole, face = helpers.psnr(source, result), helpers.psnr_boxes(source, result, data["boxes"])
    print(f"blend --mode {mode} with identity crops: whole {whole:.2f} dB, face {face:.2f} dB")
    assert whole >= 40 and face >= 40
    assert media.probe(output).has_audio  # the source's audio, by default


@pytest.mark.slow
def test_blend_refuses_crops_that_match_no_transform(clip, cache, tmp_path):
    folder = tmp_path / "crops"
    folder.mkdir()
    for t in range(3):
        helpers.write_image(folder / f"{t:05d}.png", np.zeros((80, 80, 3), np.uint8))
    code, _, stderr = helpers.run_cli(["blend", clip, cache, folder, "-o", tmp_path / "o.mp4", "-q"])
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {cache}")
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.slow
def test_quiet_prints_only_the_result_path(face_video_silent, speech_1s, tmp_path):
    """A real process (library warnings would show here): nothing on stderr, the path on stdout."""
    output = tmp_path / "quiet.mp4"
    code, stdout, stderr = helpers.run_cli_subprocess(
        ["lipsync", face_video_silent, speech_1s, "-o", output, "--backbone", "identity", "--quiet"],
        test_backbones=True)
    assert code == 0, stderr
    assert stderr == ""
    assert stdout == f"{output}\n"
    assert len(helpers.decode_frames(output)) == 25


@pytest.mark.slow
def test_not_quiet_reports_progress_and_a_summary(face_video_silent, speech_1s, tmp_path):
    output = tmp_path / "loud.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", face_video_silent, speech_1s, "-o", output,
                                            "--backbone", "identity"])
    assert code == 0, stderr
    assert stdout == f"{output}\n"
    assert "lip sync" in stderr and helpers.summary_counts(stderr) == (25, 25, 0)


def test_python_m_dubber_help():
    code, stdout, stderr = helpers.run_cli_subprocess(["--help"], module=True, timeout=120)
    assert code == 0, stderr
    for command in ("lipsync", "preprocess", "blend", "backbones"):
        assert command in stdout
    code, stdout, stderr = helpers.run_cli_subprocess(["lipsync", "--help"], module=True, timeout=120)
    assert code == 0 and "--face-index" in stdout and "--overwrite" in stdout


def test_console_script_lists_backbones():
    code, stdout, stderr = helpers.run_cli_subprocess(["backbones"], timeout=120)
    assert code == 0, stderr
    lines = {line.split()[0]: line for line in stdout.splitlines()}
    assert lines["dck"].endswith("default for photos") and lines["rewrite"].endswith("default for videos")
