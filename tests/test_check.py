"""`dubber check`: the per-second segmentation, flags and verdict rules on made-up distance matrices,
the audio placed on the picture's timeline, and the real CLI end to end -- on tiny generated
videos (face lost, errors, the same figures twice) and on a GRID clip when the data is present (a
real clip, the same clip with its audio 0.3 s late, and a still frame get three verdicts)."""

import json

import numpy as np
import pytest

import helpers
from dubber import audio, media
from dubber.backbones.syncnet import MOUTH_FRAMES, OFFSET_RANGE
from dubber.eval import check
from dubber.eval.check import (IN_SYNC, NO_FACE, NO_FACE_VERDICT, NO_SPEECH, NO_SPEECH_VERDICT, NO_SYNC,
                               NOT_SYNCED, OFFSET, OK, OUT_OF_SYNC, Figures)

FPS = 25.0
CENTRE = OFFSET_RANGE


def distances_for(frames: int, offsets, depth: float = 0.3, seed: int = 0) -> np.ndarray:
    """A distance matrix [frames - 4, 31] as offset_distances shapes it (NaN where the audio would be
    outside the clip): window w dips by `depth` where its offset is offsets[w] (None: no dip, only
    noise). Offset k (the mouth k frames after the sound) matches the audio k frames before the
    window's middle: audio shift -k."""
    rng = np.random.default_rng(seed)
    windows = frames - MOUTH_FRAMES + 1
    shifts = np.arange(-CENTRE, CENTRE + 1)
    out = 1.0 + 0.005 * rng.standard_normal((windows, len(shifts)))
    for w in range(windows):
        if offsets[w] is not None:
            out[w] += depth * np.clip(np.abs(shifts + offsets[w]) / 4, 0, 1) - depth
    index = np.arange(windows)[:, None] + MOUTH_FRAMES // 2 + shifts[None, :]
    out[(index < 0) | (index >= frames)] = np.nan
    return out


# ---------------------------------------------------------------------------------------------
# rules


def test_window_rows_need_the_face_in_all_five_frames_and_speech_in_the_middle():
    face = np.ones(20, bool)
    face[10] = False
    speech = np.ones(20, bool)
    speech[3] = False
    rows = check.window_rows(face, speech)
    assert rows.shape == (16,)
    # windows covering frame 10 are w = 6..10; window 1's middle frame is 3
    assert list(np.flatnonzero(~rows)) == [1, 6, 7, 8, 9, 10]
    assert check.window_rows(np.ones(3, bool), np.ones(3, bool)).shape == (0,)


@pytest.mark.parametrize("offset", [0, -8, 5])
def test_measure_finds_the_dip_and_its_depth(offset):
    frames = 100
    figures = check.measure(distances_for(frames, [offset] * 96), np.ones(96, bool), FPS, 10)
    assert figures.windows == 96 and figures.offset == offset
    assert figures.offset_seconds == pytest.approx(offset / FPS)
    assert figures.confidence == pytest.approx(0.3, abs=0.02)  # median (no dip) - minimum (the dip)
    assert figures.lse_d == pytest.approx(0.7, abs=0.02)
    if offset == 0:
        assert figures.lse_c0 == pytest.approx(figures.confidence)
    else:
        assert figures.lse_c0 < 0.02 and figures.lse_d0 > 0.98  # as delivered: no match


def test_measure_needs_enough_windows():
    rows = np.zeros(96, bool)
    rows[:7] = True
    assert check.measure(distances_for(100, [0] * 96), rows, FPS, 8) == Figures(7)


def test_measure_ignores_offsets_few_windows_reach():
    # Windows 0-19 of a 24-frame clip: the audio shift -15 (offset +15) is reached only by windows
    # whose middle frame is >= 15 (the last 7); a chance dip there must not win over the real one at +2.
    distances = distances_for(24, [2] * 20, depth=0.1)
    distances[:, 0] -= 0.5  # column of audio shift -15: a deep dip, where it exists
    assert np.isfinite(distances[:, 0]).sum() == 7
    assert check.measure(distances, np.ones(20, bool), FPS, 5).offset == 2


@pytest.mark.parametrize("frames, fps, inside", [
    (0, 25, True), (-3, 25, True), (-4, 25, False), (1, 25, True), (2, 25, False),
    (1, 15, True),  # one frame at 15 fps is 67 ms, more than the 45 ms early tolerance: the expert's resolution
    (-1, 15, True), (-2, 15, False), (-3, 30, True), (-4, 30, False), (-8, 25, False)])
def test_sync_tolerance_is_itu_detectability_but_at_least_a_frame(frames, fps, inside):
    assert check.in_tolerance(frames, fps) is inside


@pytest.mark.parametrize("frames, fps, expected", [
    (75, 25, [(0, 25), (25, 50), (50, 75)]),
    (80, 25, [(0, 25), (25, 50), (50, 80)]),  # 5 frames left over: joined to the last second
    (90, 25, [(0, 25), (25, 50), (50, 75), (75, 90)]),
    (10, 25, [(0, 10)]),
    (60, 29.97, [(0, 30), (30, 60)]),
])
def test_segment_bounds(frames, fps, expected):
    assert check.segment_bounds(frames, fps) == expected


def test_each_second_gets_its_flag():
    """Five seconds: the face lost; silence; a mouth that follows nothing; audio 0.32 s late; in sync."""
    frames = 125
    offsets = [None] * 50 + [None] * 25 + [-8] * 25 + [0] * (frames - 4 - 75)
    distances = distances_for(frames, offsets)
    face = np.ones(frames, bool)
    face[:20] = False
    speech = np.ones(frames, bool)
    speech[25:50] = False
    parts = check.segments(distances, face, speech, FPS)
    assert [p.flag for p in parts] == [NO_FACE, NO_SPEECH, NO_SYNC, OFFSET, OK]
    assert [(p.first, p.stop) for p in parts] == [(0, 25), (25, 50), (50, 75), (75, 100), (100, 125)]
    assert parts[0].face == pytest.approx(0.2) and parts[1].speech == 0.0
    assert parts[3].figures.offset == -8 and parts[4].figures.offset == 0
    assert parts[2].figures.confidence < parts[2].figures.needed == check.needed_confidence(25) == 0.1
    assert parts[4].figures.confidence >= parts[4].figures.needed


def test_a_second_with_speech_but_the_face_lost_in_scattered_frames_is_no_face():
    face = np.ones(50, bool)
    face[::3] = False  # found in 2 of 3 frames: above MIN_FACE_FRACTION, but no window has it in all 5
    assert [p.flag for p in check.segments(distances_for(50, [0] * 46), face, np.ones(50, bool), FPS)] == [NO_FACE] * 2


@pytest.mark.parametrize("offset, code, words", [
    (0, IN_SYNC, "in sync: no offset (0 frames)"),
    (-2, IN_SYNC, "in sync: audio 0.08 s late (-2 frames)"),
    (1, IN_SYNC, "in sync: audio 0.04 s early (+1 frame)"),
    (-8, OUT_OF_SYNC, "out of sync: audio 0.32 s late (-8 frames)"),
    (5, OUT_OF_SYNC, "out of sync: audio 0.20 s early (+5 frames)"),
])
def test_verdict_of_a_confident_clip_is_its_offset(offset, code, words):
    figures = Figures(100, offset, offset / FPS, 0.3, 0.7, 0.0, 1.0, check.needed_confidence(100))
    assert check.verdict(figures, 1.0, 100, FPS) == (code, f"{words}, confidence 0.300")


def test_verdicts_that_cannot_judge_or_find_no_sync():
    assert check.verdict(Figures(100, -8, -0.32, 0.04, 0.9, 0.0, 0.9, 0.05), 1.0, 100, FPS)[0] == NOT_SYNCED
    code, line = check.verdict(Figures(100, -15, -0.6, 0.2, 0.9, 0.0, 0.9, 0.05), 1.0, 100, FPS)
    assert code == NOT_SYNCED and "within 0.60 s either way" in line  # a best match on the edge of the search
    assert check.verdict(Figures(3), 1.0, 3, FPS)[0] == NO_SPEECH_VERDICT
    code, line = check.verdict(Figures(3), 0.1, 80, FPS)
    assert code == NO_FACE_VERDICT and "10% of the frames" in line


def test_verdict_counts_the_flagged_seconds():
    frames = 125
    distances = distances_for(frames, [0] * (frames - 4))
    face = np.ones(frames, bool)
    face[30:45] = False
    clip, parts, code, line = check.judge(distances, face, np.ones(frames, bool), FPS)
    assert code == IN_SYNC and clip.offset == 0
    assert [p.flag for p in parts] == [OK, NO_FACE, OK, OK, OK]
    assert line.endswith("; 1 of 5 seconds flagged")


# ---------------------------------------------------------------------------------------------
# audio on the picture's timeline


def test_audio_delayed_in_the_container_is_decoded_late(tmp_path, face_video):
    """ffmpeg -itsoffset 0.3 on the audio (stream copy): a player sounds it 0.3 s late, and so must the check."""
    late = tmp_path / "late.mp4"
    helpers.run_ffmpeg(["-i", str(face_video), "-itsoffset", "0.3", "-i", str(face_video),
                        "-map", "0:v", "-map", "1:a", "-c", "copy", str(late)])
    plain = audio.load_audio(face_video, video_timeline=True)
    moved = audio.load_audio(late, video_timeline=True)
    assert np.abs(moved[:int(0.25 * audio.SAMPLE_RATE)]).max() < 1e-3  # silence first (AAC priming: from 0.277 s)

    def lag(wav):  # seconds
        return max(range(0, 8000, 8), key=lambda k: float(np.dot(wav[k:k + 16000], plain[:16000]))) / audio.SAMPLE_RATE

    assert abs(lag(moved) - 0.3) < 0.03
    assert lag(audio.load_audio(late)) < 0.1  # the stream's own samples from its first: no delay seen
    assert media.video_start(face_video) == 0.0


# ---------------------------------------------------------------------------------------------
# the CLI on generated media


def test_check_json_flags_a_lost_face_and_is_the_same_twice(tmp_path):
    video = helpers.make_face_video(tmp_path / "gap.mp4", seconds=3.0, fps=25, audio=True, blank=range(25, 50))
    code, out, err = helpers.run_cli(["check", video, "--json", "-q"])
    assert code == 0, err
    report = json.loads(out)
    assert report["frames"] == 75 and report["fps"] == 25.0 and report["speech"] is None
    assert [s["first"] for s in report["segments"]] == [0, 25, 50]
    assert report["segments"][1]["flag"] == NO_FACE and report["segments"][1]["face"] == 0.0
    assert report["segments"][0]["face"] == 1.0 and report["face"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["expert"]["sha256"] == check.EXPERT_SHA256 and report["expert"]["calibrated"]
    assert report["verdict"] in (IN_SYNC, OUT_OF_SYNC, NOT_SYNCED, NO_SPEECH_VERDICT, NO_FACE_VERDICT)
    again = helpers.run_cli(["check", video, "--json", "-q"])
    assert again[0] == 0 and again[1] == out  # stable: the same file gives the same figures


def test_check_table_and_speech_argument(tmp_path, face_video, speech_1s):
    code, out, err = helpers.run_cli(["check", face_video, speech_1s])  # not quiet: notes on stderr
    assert code == 0, err
    assert f"{face_video} against {speech_1s}: 50 frames at 25 fps" in out
    assert "whole clip" in out and "\nverdict: " in out
    assert "the speech ends at 1.00 s, the video at 2.00 s" in err


@pytest.mark.parametrize("args, exit_code, message", [
    (["{photo}"], 1, "is a photo"),
    (["{silent}"], 1, "has no audio track: give the SPEECH"),
    (["{video}", "--face-index", "-1"], 2, "--face-index -1: must be at least 0"),
    (["{video}", "--sync-expert", "{missing}"], 2, "--sync-expert"),
    (["{missing}"], 1, "file not found"),
])
def test_check_bad_input(tmp_path, face_still, face_video_silent, face_video, args, exit_code, message):
    names = {"photo": face_still, "silent": face_video_silent, "video": face_video, "missing": tmp_path / "none.mp4"}
    code, out, err = helpers.run_cli(["check"] + [a.format(**names) for a in args])
    assert code == exit_code and message in err and err.count("\n") == 1, err
    assert out == ""


# ---------------------------------------------------------------------------------------------
# real speech: a GRID clip


def test_real_shifted_and_still_get_three_verdicts(tmp_path, grid_clip):
    late = tmp_path / "late.mp4"
    helpers.run_ffmpeg(["-i", str(grid_clip), "-itsoffset", "0.3", "-i", str(grid_clip),
                        "-map", "0:v", "-map", "1:a", "-c", "copy", str(late)])
    first = next(iter(media.VideoReader(media.probe(grid_clip), count=1)))
    still = helpers.encode_frames(tmp_path / "still.mp4", [first] * 75, 25, audio=grid_clip)
    reports = {}
    for name, path in (("real", grid_clip), ("late", late), ("still", still)):
        code, out, err = helpers.run_cli(["check", path, "--json", "-q"])
        assert code == 0, err
        reports[name] = json.loads(out)
    assert reports["real"]["verdict"] == IN_SYNC, reports["real"]["verdict_text"]
    assert reports["late"]["verdict"] == OUT_OF_SYNC, reports["late"]["verdict_text"]
    assert -9 <= reports["late"]["clip"]["offset"] <= -6 and "late" in reports["late"]["verdict_text"]
    assert reports["still"]["verdict"] == NOT_SYNCED, reports["still"]["verdict_text"]
