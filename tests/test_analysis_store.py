"""Stored face analyses (dubber.analysis.analyse_stored): a second dub of the same video reuses the
first one's detection and landmarks, keyed by the file's content and the face choice; and a long
video's analysis in two processes (analyse(workers=2))."""

import numpy as np
import pytest

import helpers
from dubber import analysis, media
from dubber.analysis import FaceChoice, analyse_stored


def _no_tracking(*args, **kwargs):
    raise AssertionError("tracked again: the stored analysis was not used")


def test_second_analysis_is_read_back(face_video, tmp_path, monkeypatch):
    first = analyse_stored(face_video, folder=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    monkeypatch.setattr(analysis, "track_faces", _no_tracking)
    again = analyse_stored(face_video, folder=tmp_path)
    np.testing.assert_array_equal(again.track.landmarks, first.track.landmarks)
    np.testing.assert_array_equal(again.track.boxes, first.track.boxes)
    assert again.fps == first.fps and again.track.faces_seen == first.track.faces_seen
    with pytest.raises(AssertionError, match="tracked again"):  # another choice, another key
        analyse_stored(face_video, FaceChoice(detect_every=3), folder=tmp_path)
    with pytest.raises(AssertionError, match="tracked again"):  # another part of the video
        analyse_stored(face_video, folder=tmp_path, first=5)


def test_changed_content_or_unreadable_entry_is_analysed_again(face_video, tmp_path, monkeypatch):
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(face_video.read_bytes())
    store = tmp_path / "store"
    analyse_stored(copy, folder=store)
    (entry,) = store.glob("*.npz")
    entry.write_bytes(b"truncated")
    calls = []
    real = analysis.track_faces
    monkeypatch.setattr(analysis, "track_faces", lambda *a, **k: calls.append(1) or real(*a, **k))
    analyse_stored(copy, folder=store)  # unreadable entry: analysed again and rewritten
    with open(copy, "ab") as handle:
        handle.write(b"\0")  # the same name, other bytes
    analyse_stored(copy, folder=store)
    assert len(calls) == 2 and len(list(store.glob("*.npz"))) == 2


def test_photo_analysis_is_stored_with_its_image(face_still, tmp_path, monkeypatch):
    first = analyse_stored(face_still, folder=tmp_path)
    monkeypatch.setattr(analysis, "track_faces", _no_tracking)
    again = analyse_stored(face_still, folder=tmp_path)
    assert again.is_image and np.array_equal(again.image, first.image)
    np.testing.assert_array_equal(again.track.landmarks, first.track.landmarks)


@pytest.mark.slow
def test_second_dub_of_a_video_reuses_its_analysis(face_video, speech_1s, tmp_path, monkeypatch):
    store = tmp_path / "cache"
    monkeypatch.setenv("DUBBER_CACHE_DIR", str(store))
    outputs = []
    for i in range(2):
        out = tmp_path / f"dub{i}.mp4"
        code, _, stderr = helpers.run_cli(["lipsync", face_video, speech_1s, "-o", out, "--backbone", "identity",
                                           "--device", "cpu"])
        assert code == 0, stderr
        outputs.append(out)
        if i == 0:
            assert len(list((store / "analysis").glob("*.npz"))) == 1
            assert "detect faces" in stderr
            monkeypatch.setattr(analysis, "track_faces", _no_tracking)
    assert "detect faces" not in stderr  # the second dub did no detection
    decoded = [np.stack(list(media.VideoReader(media.probe(p)))) for p in outputs]
    np.testing.assert_array_equal(decoded[0], decoded[1])
    code, _, stderr = helpers.run_cli(["lipsync", face_video, speech_1s, "-o", tmp_path / "fresh.mp4", "--backbone",
                                       "identity", "--device", "cpu", "--no-reuse-analysis"])
    assert code != 0 and "tracked again" in stderr  # --no-reuse-analysis analyses (and the patch says so)


def test_long_video_tracked_in_two_processes_joins_where_the_face_continues(tmp_path):
    video = helpers.make_face_video(tmp_path / "long.mp4", seconds=12.0, fps=25)
    one = analysis.analyse(video)
    two = analysis.analyse(video, workers=2)
    assert len(one.track) == len(two.track) >= analysis.PARALLEL_MIN_FRAMES
    assert two.track.valid.all() and one.track.valid.all()
    points_one, points_two = one.track.landmarks, two.track.landmarks
    eyes = np.linalg.norm(points_one[:, 36:42].mean(1) - points_one[:, 42:48].mean(1), axis=1)
    drift = np.linalg.norm(points_one - points_two, axis=2).mean(1) / eyes
    # The later part starts from its own detection: the same face, re-fitted (here up to ~0.05 of
    # the eye distance in a frame, ~0.01 on average); another face would be a whole face away.
    assert drift.max() < 0.15 and drift.mean() < 0.03
    steps = np.linalg.norm(np.diff(points_two, axis=0), axis=2).mean(1) / eyes[1:]
    assert steps.max() < 3 * np.percentile(steps, 99) + 0.02  # no jump where the parts meet
