"""`dubber faces`: the faces of a photo or video with ids, time ranges and a preview image; the id
selects the face in `lipsync --face ID`."""

import json

import numpy as np
import pytest

import helpers
from dubber import media

FPS = 25


@pytest.fixture(scope="module")
def two_faces(tmp_path_factory):
    """A photo with two faces, and a 2 s video where the second face is there from 1 s to 1.8 s."""
    d = tmp_path_factory.mktemp("faces")
    photo = helpers.write_image(d / "two.png", helpers.two_faces_frame())
    frames = [helpers.two_faces_frame(second=FPS <= k < 45) for k in range(2 * FPS)]
    video = helpers.encode_frames(d / "arrives.mp4", frames, FPS)
    speech = helpers.make_tone_speech(d / "speech.wav", 2.0)
    return {"photo": photo, "video": video, "speech": speech}


def test_faces_of_a_photo(two_faces, tmp_path):
    preview = tmp_path / "p.png"
    code, stdout, stderr = helpers.run_cli(["faces", two_faces["photo"], "--preview", preview, "-q"])
    assert code == 0, stderr
    rows = [line.split() for line in stdout.splitlines()[1:] if line.strip() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]  # largest first: ids are what --face-index counts
    sides = [int(next(v for v in r if v.endswith("px"))[:-2]) for r in rows]
    assert sides[0] > sides[1]
    assert f"preview: {preview}" in stdout
    image = media.read_image(preview)
    assert image.shape == (128, 2 * 128, 3)


def test_faces_of_a_video_with_time_ranges_as_json(two_faces, tmp_path):
    code, stdout, stderr = helpers.run_cli(["faces", two_faces["video"], "--json", "--preview", tmp_path / "v.png",
                                            "-q"])
    assert code == 0, stderr
    data = json.loads(stdout)
    assert data["frames"] == 2 * FPS and data["max_together"] == 2 and data["preview"] == str(tmp_path / "v.png")
    first, second = data["faces"]
    assert (first["id"], second["id"]) == (0, 1)
    assert first["start"] == 0.0 and first["end"] == 2.0
    assert second["start"] == 1.0 and second["first_frame"] == FPS  # to the frame, though sampled every 12
    assert second["end"] == 1.8 and second["last_frame"] == 44
    assert second["box"][0] > 128  # the right-hand face
    assert (tmp_path / "v.png").is_file()


def test_faces_refuses_an_existing_preview_and_bad_values(two_faces, tmp_path):
    existing = tmp_path / "p.png"
    existing.write_bytes(b"mine")
    code, _, stderr = helpers.run_cli(["faces", two_faces["photo"], "--preview", existing])
    assert code == 2 and stderr.startswith("error: --preview") and "--overwrite" in stderr
    assert existing.read_bytes() == b"mine"
    code, _, stderr = helpers.run_cli(["faces", two_faces["photo"], "--every", "0"])
    assert code == 2 and stderr.startswith("error: --every 0:")
    code, _, stderr = helpers.run_cli(["faces", tmp_path / "none.mp4"])
    assert code == 1 and "none.mp4: file not found" in stderr


def _changed(source_frame: np.ndarray, output_frame: np.ndarray) -> str:
    moved = np.abs(output_frame.astype(np.int16) - source_frame.astype(np.int16)).mean(-1) > 20
    left, right = int(moved[:, :130].sum()), int(moved[:, 132:].sum())
    return "left" if left > 100 and right < 30 else "right" if right > 100 and left < 30 else \
        "none" if left < 30 and right < 30 else "both"


@pytest.mark.slow
def test_the_id_selects_the_face_in_lipsync(two_faces, tmp_path):
    """--face 1 on the video dubs the face that is there from 1 s to 1.8 s, and only that one."""
    output = tmp_path / "o.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", two_faces["video"], two_faces["speech"], "-o", output,
                                            "--backbone", "shiftmouth", "--face", "1", "-q"])
    assert code == 0, stderr
    source, result = helpers.decode_frames(two_faces["video"]), helpers.decode_frames(output)
    assert len(result) == 2 * FPS
    assert _changed(source[10], result[10]) == "none"
    assert _changed(source[40], result[40]) == "right"
    code, stdout, stderr = helpers.run_cli(["lipsync", two_faces["photo"], two_faces["speech"], "-o", tmp_path / "p.mp4",
                                            "--backbone", "shiftmouth", "--face", "0", "-q"])
    assert code == 0, stderr
    assert _changed(media.read_image(two_faces["photo"]), helpers.decode_frames(tmp_path / "p.mp4")[5]) == "left"


@pytest.mark.parametrize("args, says", [
    (["--face", "2"], ["--face 2", "2 faces (ids 0-1)", "dubber faces"]),
    (["--face", "-1"], ["--face -1", "must be ID"]),
    (["--face", "1", "--face-index", "1"], ["--face 1", "not several"]),
])
def test_a_face_id_that_selects_nothing(two_faces, tmp_path, args, says):
    code, stdout, stderr = helpers.run_cli(["lipsync", two_faces["photo"], two_faces["speech"], "-o",
                                            tmp_path / "o.mp4", "--backbone", "identity", "-q", *args])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    for text in says:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "o.mp4").exists()
