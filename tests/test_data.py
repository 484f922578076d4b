"""dubber.data and the v2 cache: identities, splits, the incremental parallel cache build, clips
with lag and speech, and the tracker's re-detection near the tracked face."""

import csv
import os

import numpy as np
import pytest

import helpers
from dubber import audio, cache, data
from dubber.errors import DubberError
from dubber.face import detect, track
from dubber.face.crops import CropSpec

FACE96, BOX64 = CropSpec.parse("face:96"), CropSpec.parse("box:64")
MANIFEST_FIELDS = ["file", "audio", "audio_silent", "split", "sync_lag_est", "sync_peak_est", "note"]


@pytest.fixture(scope="module")
def talking(media_dir):
    """2 s, 25 fps, 160x128 with speech-like audio; frames 20-24 have no face."""
    return helpers.make_face_video(media_dir / "data_talking.mp4", seconds=2.0, fps=25, audio=True,
                                   marker=False, blank=range(20, 25))


def _item(path, lag=0):
    return {"path": path, "identity": "someone", "lag": lag}


# ---------------------------------------------------------------------------------------------
# corpus


def test_identity_from_the_note_else_the_old_rule(tmp_path):
    row = {"note": "id=lrcar_a05; pooled lag -1 (weak)"}
    assert data.identity_of(tmp_path / "wild" / "lrcar_a05_00012.mp4", row) == "lrcar_a05"
    assert data.identity_of(tmp_path / "grid" / "s3" / "bbaf2n.mp4") == "grid_s3"
    assert data.identity_of(tmp_path / "wild" / "vox2_741400163.mp4", {"note": ""}) == "vox2_741400104"
    assert data.identity_of(tmp_path / "wild" / "mead_M003.mp4", {"note": "quiet; id=x later"}) == "mead_M003"


def test_grid_split_per_speaker_and_corpus_rules(tmp_path):
    for speaker, n in (("s1", 20), ("s2", 10)):
        folder = tmp_path / "grid" / speaker
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"u{i:02d}.{'mpg' if i % 2 else 'mp4'}").touch()
    (tmp_path / "grid" / "alignments" / "s1").mkdir(parents=True)
    splits = data.grid_split(tmp_path / "grid")
    assert [p.name for p in splits["val"]] == ["u18.mp4", "u19.mpg", "u09.mpg"]
    assert len(splits["train"]) == 18 + 9 and not set(splits["train"]) & set(splits["val"])
    rows = [("wild/a.mp4", "yes", "no", "train", "3", "0.5", "id=anna; note"),
            ("wild/b.mp4", "yes", "no", "train", "5", "0.1", ""),      # weak sync: not trained on
            ("wild/c.mp4", "yes", "yes", "train", "0", "0.9", ""),     # silent track
            ("wild/d.mp4", "no", "", "val", "", "", ""),               # no audio
            ("wild/e.mp4", "yes", "no", "val", "-4", "0.1", "id=eve")]  # weak, but validation keeps it (lag 0)
    with open(tmp_path / "manifest_wild.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows(rows)
    assert len(data.wild_rows(tmp_path)) == 3 and len(data.wild_rows(tmp_path, speech_only=False)) == 5
    train = data.corpus(tmp_path, "train", grid_every=9)
    assert [(i["path"].name, i["identity"], i["lag"]) for i in train] == [
        ("u00.mp4", "grid_s1", 0), ("u09.mpg", "grid_s1", 0), ("u00.mp4", "grid_s2", 0), ("a.mp4", "anna", 3)]
    val = data.corpus(tmp_path, "val")
    assert [(i["path"].name, i["identity"], i["lag"]) for i in val][-1] == ("e.mp4", "eve", 0)


# ---------------------------------------------------------------------------------------------
# the cache


def test_build_cache_is_incremental(talking, tmp_path):
    items = [_item(talking)]
    target = data.cache_path(items[0], tmp_path)
    steps = []
    assert data.build_cache(items, tmp_path, [FACE96], workers=1, progress=lambda *a: steps.append(a)) == [target]
    assert steps[0] == ("build cache", 0, 1) and steps[-1] == ("build cache", 1, 1)
    frames = len(cache.load_cache(target, ["valid"])["valid"])
    for stage in ("detect faces", "crop faces"):  # one file: its frames show as they are done
        assert sum(a for s, a, _ in steps if s == stage) == frames > 1, stage
    first = target.stat().st_ino
    assert data.build_cache(items, tmp_path, [FACE96], workers=1) == [target]
    assert target.stat().st_ino == first  # current: not rebuilt
    data.build_cache(items, tmp_path, [FACE96, BOX64], workers=1)
    second = target.stat().st_ino
    assert second != first and {"crops_face96", "crops_box64"} <= set(cache.load_cache(target))  # a crop was missing
    old = dict(cache.load_cache(target), version=np.array(1))
    old.pop("envelope")
    np.savez(target, **old)  # a version-1 file: readable, but stale
    assert "envelope" not in cache.load_cache(target)
    data.build_cache(items, tmp_path, [FACE96], workers=1)
    rebuilt = cache.load_cache(target)
    assert int(rebuilt["version"]) == cache.CACHE_VERSION and "envelope" in rebuilt


@pytest.mark.slow
def test_a_corrupt_file_does_not_stop_a_parallel_build(talking, face_video_silent, tmp_path):
    corrupt = tmp_path / "src" / "broken.mp4"
    corrupt.parent.mkdir()
    corrupt.write_bytes(os.urandom(4096))
    logged = []
    items = [_item(talking), _item(corrupt), _item(face_video_silent)]
    written = data.build_cache(items, tmp_path / "cache", [FACE96], workers=2, log=logged.append)
    assert written == [data.cache_path(items[i], tmp_path / "cache") for i in (0, 2)]
    assert all(p.is_file() for p in written)
    assert len(logged) == 1 and "broken.mp4" in logged[0] and logged[0].startswith("skipped: ")


def test_one_decode_and_two_decodes_give_the_same_cache(talking, tmp_path, monkeypatch):
    kept = cache.load_cache(cache.preprocess(talking, tmp_path / "one", [FACE96]))
    monkeypatch.setattr(cache, "KEEP_FRAMES_BYTES", 0)  # as for a long input: crops from a second decode
    again = cache.load_cache(cache.preprocess(talking, tmp_path / "two", [FACE96]))
    assert kept.keys() == again.keys()
    for key in kept:
        np.testing.assert_array_equal(kept[key], again[key], err_msg=key)
    assert kept["envelope"].shape == (kept["mel"].shape[1],) and kept["envelope"].dtype == np.float32


def test_load_clips_runs_lag_and_speech(talking, face_video_silent, tmp_path):
    items = [_item(talking), _item(talking, lag=3), _item(face_video_silent)]
    data.build_cache(items, tmp_path, [FACE96, BOX64], workers=1)
    clips = data.load_clips(items, tmp_path, [BOX64])
    assert [c["name"] for c in clips] == ["data_talking#0", "data_talking#1"] * 2  # no audio: skipped
    assert [len(c["mels"]) for c in clips] == [20, 25, 20, 25]  # the faceless frames 20-24 split the runs
    clip, shifted = clips[1], clips[3]
    assert clip["crops"]["box64"].shape == (25, 64, 64, 3) and clip["crops"]["box64"].dtype == np.uint8
    assert clip["transforms"]["box64"].shape == (25, 2, 3) and clip["landmarks"].shape == (25, 68, 2)
    assert clip["mels"].shape == (25, audio.N_MELS, audio.MEL_WINDOW) and clip["speech"].dtype == bool
    assert "face96" not in clip["crops"] and clip["fps"] == 25.0 and clip["identity"] == "someone"
    # lag 3: the mouth trails the sound by 3 frames, so frame t hears what frame t - 3 hears at lag 0
    np.testing.assert_array_equal(shifted["mels"][3:], clip["mels"][:-3])
    # speech follows the audio's pauses; at lag 3 it is the same rule at the shifted times
    envelope = cache.load_cache(data.cache_path(items[0], tmp_path))["envelope"]
    columns = np.round((np.arange(50) - 3) / 25 * audio.MEL_FPS).astype(int)  # every frame's time at lag 3
    expected = audio.speech_frames(np.where(columns >= 0, envelope[columns.clip(0)], 0))  # before the audio: silence
    assert shifted["speech"].tolist() == expected[25:].tolist() and 0 < shifted["speech"].mean() < 1
    assert data._speech_at(None, np.arange(25) / 25).all()  # a version-1 cache: speech unknown
    with pytest.raises(DubberError, match="face:128"):
        data.load_clips(items, tmp_path, [CropSpec.parse("face:128")])
    # a lips crop is not stored but cut from the box crops (dubber.cache.derive_source)
    lips = data.load_clips(items[:1], tmp_path, [CropSpec.parse("lips:32")])
    assert lips[0]["crops"]["lips32"].shape == (20, 32, 32, 3) and lips[0]["crops"]["lips32"].any()
    with pytest.raises(DubberError, match="no usable clips"):
        data.load_clips(items, tmp_path, [BOX64], min_run=30)
    # without pixels (a model of landmarks and audio): the transforms, no images
    bare = data.load_clips(items, tmp_path, [BOX64], pixels=False)
    assert bare[1]["crops"] == {} and np.array_equal(bare[1]["transforms"]["box64"], clip["transforms"]["box64"])
    assert np.array_equal(bare[3]["mels"], shifted["mels"])



def test_a_pack_gives_back_the_clips_it_was_written_from(talking, tmp_path):
    from dubber.train.pack import read_pack, write_pack

    items = [_item(talking), _item(talking, lag=3)]
    data.build_cache(items, tmp_path / "cache", [FACE96, BOX64], workers=1)
    clips = data.load_clips(items, tmp_path / "cache", [BOX64, FACE96])
    assert np.allclose(np.diff(clips[0]["times"]), 1 / 25)
    write_pack(clips, [BOX64, FACE96], tmp_path / "pack", crop_keys=["box64"])
    packed = read_pack(tmp_path / "pack")
    assert [c["name"] for c in packed] == [c["name"] for c in clips]
    for clip, back in zip(clips, packed):
        assert back["crops"].keys() == {"box64"} and back["crops"]["box64"].shape == clip["crops"]["box64"].shape
        assert np.abs(back["crops"]["box64"].astype(int) - clip["crops"]["box64"]).mean() < 3  # H.264, near-transparent
        np.testing.assert_allclose(back["mels"], clip["mels"], atol=4 / 255 + 1e-6)  # uint8 over [-4, 4]
        for key in ("box64", "face96"):
            np.testing.assert_array_equal(back["transforms"][key], clip["transforms"][key])
        assert back["speech"].tolist() == clip["speech"].tolist() and back["identity"] == clip["identity"]
        np.testing.assert_array_equal(back["landmarks"][:, 48:68], clip["landmarks"][:, 48:68])  # the mouth's, exactly
        assert np.isnan(back["landmarks"][:, :48]).all()  # and no other: validation refits all 68
    # and trains: `dubber train --pack` (only the mouth's landmarks, so no validation)
    from dubber.backbones import load_backbone
    from dubber.train import train_from_corpus

    out = train_from_corpus("dck", tmp_path / "no-corpus", tmp_path / "no-cache", tmp_path / "dck.pt", steps=2,
                            pack=tmp_path / "pack", hyperparameters={"size": 64, "batch_size": 2},
                            log=lambda message: None)
    meta = load_backbone("dck", out).meta
    assert meta["steps"] == 2 and meta["data"]["clips"] == len(clips) and meta["data"]["pack"].startswith("pack")


# ---------------------------------------------------------------------------------------------
# tracking


@pytest.fixture(scope="module")
def moving_frames():
    """2 s at 25 fps, 320x240: the example face moving and turning in-plane (±8°)."""
    return list(helpers.make_frames(2.0, 25, size=(320, 240), marker=False))


def _iou(a, b):
    return float(track.box_iou(np.asarray(a)[None], np.asarray(b))[0])


def test_detection_near_the_tracked_face_finds_the_full_frame_face(moving_frames):
    for t in range(5, len(moving_frames), 5):
        full = detect.detect_faces(moving_frames[t])
        previous = detect.detect_faces(moving_frames[t - 1])[0]  # where the track was a frame before
        near = detect.detect_faces_near(moving_frames[t], previous)
        assert len(full) == 1 and len(near) == 1
        assert _iou(near[0], full[0]) > 0.6, t


def test_tracker_redetects_near_the_face_with_the_same_landmarks(moving_frames, monkeypatch):
    calls = {"full": 0}
    full_frame = track.detect_faces

    def counting(*args, **kwargs):
        calls["full"] += 1
        return full_frame(*args, **kwargs)

    monkeypatch.setattr(track, "detect_faces", counting)
    roi = track.track_faces(moving_frames)
    assert calls["full"] == 1  # the first frame only; every re-detection found the face near it
    monkeypatch.setattr(track, "detect_faces_near", lambda *args, **kwargs: np.zeros((0, 4), np.float32))
    whole = track.track_faces(moving_frames)  # the region always misses: today's full-frame tracker
    assert calls["full"] == 1 + len(moving_frames) // track.DETECT_EVERY
    assert roi.valid.all() and whole.valid.all()
    distance = np.linalg.norm(roi.landmarks - whole.landmarks, axis=2).mean()
    assert distance < 1.5  # px, on a face about 100 px wide


def test_grid_words_reach_the_clips_as_frame_ranges(tmp_path):
    """A GRID video's alignment (1/25,000 s, silences dropped) is found beside the corpus and its
    words are given per run of frames: whole words only, counted from the run's first frame."""
    speaker = tmp_path / "grid" / "s1"
    speaker.mkdir(parents=True)
    for name in ("a", "b"):
        (speaker / f"{name}.mp4").write_bytes(b"")
    aligned = tmp_path / "grid" / "alignments" / "s1"
    aligned.mkdir(parents=True)
    (aligned / "a.align").write_text("0 23750 sil\n23750 29500 bin\n29500 34000 blue\n34000 35000 sp\n"
                                     "35000 40000 at\n40000 75000 sil\n")
    items = {i["path"].stem: i for i in data.corpus(tmp_path, "train")}
    assert items["a"]["alignment"] == aligned / "a.align" and "alignment" not in items["b"]
    words = data.read_alignment(items["a"]["alignment"])
    assert words == [(0.95, 1.18, "bin"), (1.18, 1.36, "blue"), (1.4, 1.6, "at")]
    assert data.words_in_run(words, 25.0, 0, 75) == [(24, 30, "bin"), (30, 34, "blue"), (35, 40, "at")]
    assert data.words_in_run(words, 25.0, 26, 40) == [(4, 8, "blue"), (9, 14, "at")]  # "bin" starts before the run
