"""`dubber adapt` and `dubber lipsync --adapt / --weights` through the real CLI, on the tiny
talking-face video of conftest: DCK's shipped weights fine-tuned for a few steps on the video's own
frames and audio, the self-describing file they write, resuming, the time budget, dubbing with the
result, and the refusals. One preprocess cache serves the whole module (--cache)."""

import shutil

import numpy as np
import pytest

import helpers
from dubber.backbones import load_backbone, weights_path
from dubber.checkpoint import load_package, state_sha256

pytestmark = pytest.mark.slow
STEPS = 2  # a few optimiser steps: the test is of the plumbing, not of the quality


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("adapt-cache")


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    """Videos adaptation must refuse: a silent audio track, no face, too little speech."""
    folder = tmp_path_factory.mktemp("bad")
    silence = helpers.make_tone_speech(folder / "silence.wav", 1.0, amplitude=0)
    return {"muted": helpers.make_face_video(folder / "muted.mp4", 1.0, audio=silence),
            "faceless": helpers.make_face_video(folder / "faceless.mp4", 1.0, audio=True, blank=range(25)),
            "mumble": helpers.make_face_video(folder / "mumble.mp4", 2.0, audio=0.25)}


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, face_video, cache):
    """`dubber adapt face_motion.mp4 -o person.pt --backbone dck --steps 2` -> (person.pt, stderr)."""
    out = tmp_path_factory.mktemp("adapted") / "person.pt"
    code, stdout, stderr = helpers.run_cli(["adapt", face_video, "-o", out, "--backbone", "dck", "--steps", STEPS,
                                            "--device", "cpu", "--cache", cache])
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    return out, stderr


def test_adapt_writes_a_self_describing_model(adapted, face_video):
    out, stderr = adapted
    assert isinstance(load_backbone("dck", out), type(load_backbone("dck")))
    meta = load_package(out)["meta"]
    record = meta["adapted"]
    assert record["source"] == {"name": face_video.name, "duration_s": pytest.approx(2.0, abs=0.05),
                                "sha256": helpers.sha256(face_video)}
    base = weights_path("dck")
    assert record["base"] == {"path": str(base.resolve()),
                              "state_sha256": state_sha256(load_package(base)["state"])}
    assert record["steps"] == meta["steps"] == STEPS and record["seconds"] > 0
    # the video's own lag, measured with the expert (dubber.train.offsets, tested there), shifts its audio
    assert isinstance(record["lag"], int) and "audio-visual lag" in stderr
    assert f"(lag {record['lag']} frames)" in meta["data"]["source"]
    assert meta["recipe"]["init"] == str(base.resolve()) and meta["data"]["identities"] == 1
    assert meta["state_sha256"] != record["base"]["state_sha256"]  # the steps changed the weights
    assert "first step took" in stderr  # the estimate of the whole adaptation, before it runs on
    assert len(list(out.parent.glob("person.*.train.pt"))) == 1  # the resumable state beside it


def test_a_rerun_with_more_steps_continues(adapted, face_video, cache, tmp_path):
    out, _ = adapted
    copy = tmp_path / out.name
    for path in out.parent.glob("person*"):
        shutil.copy(path, tmp_path / path.name)
    code, _, stderr = helpers.run_cli(["adapt", face_video, "-o", copy, "--backbone", "dck", "--steps", STEPS + 1,
                                       "--device", "cpu", "--cache", cache])
    assert code == 0, stderr
    assert f"resumed from {copy.parent}" in stderr and f"at step {STEPS}" in stderr
    meta = load_package(copy)["meta"]
    assert meta["steps"] == meta["adapted"]["steps"] == STEPS + 1


def test_minutes_stops_early(face_video, cache, tmp_path):
    out = tmp_path / "budget.pt"
    code, _, stderr = helpers.run_cli(["adapt", face_video, "-o", out, "--steps", 50, "--minutes", 0.0001,
                                       "--device", "cpu", "--cache", cache, "-q"])
    assert code == 0, stderr
    assert load_package(out)["meta"]["adapted"]["steps"] == 1  # the budget ran out after the first step


def test_an_interrupted_adaptation_leaves_no_model_and_resumes(face_video, cache, tmp_path):
    from dubber.train.adapt import adapt

    out = tmp_path / "person.pt"
    seen = []

    def progress(stage, advance, total):
        seen.append((stage, advance, total))
        if stage == "adapt" and sum(a for s, a, _ in seen if s == "adapt") == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second step's report

    with pytest.raises(KeyboardInterrupt):
        adapt(face_video, out, "dck", steps=3, device="cpu", cache_dir=cache, log=lambda m: None, progress=progress)
    assert not out.exists() and not list(tmp_path.glob(".person.pt*"))
    assert ("adapt", 0, 3) in seen and any(stage == "build cache" for stage, _, _ in seen)
    messages = []
    assert adapt(face_video, out, "dck", steps=3, device="cpu", cache_dir=cache, log=messages.append) == out
    assert any("at step 2" in m for m in messages) and load_package(out)["meta"]["steps"] == 3


def test_the_loss_goes_down(face_video, cache, tmp_path):
    from dubber.train.adapt import adapt

    out = adapt(face_video, tmp_path / "person.pt", "dck", steps=12, device="cpu", cache_dir=cache, log=lambda m: None)
    losses = load_package(out)["meta"]["adapted"]["losses"]  # the mean of every 3 steps
    assert [row["step"] for row in losses] == [3, 6, 9, 12]
    assert losses[-1]["total_g"] < losses[0]["total_g"], losses


def test_lipsync_with_adapted_weights(adapted, face_video, speech_1s, tmp_path):
    out, _ = adapted
    dubbed, generic = tmp_path / "adapted.mp4", tmp_path / "generic.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", face_video, speech_1s, "-o", dubbed, "--weights", out,
                                            "--device", "cpu", "-q"])
    assert code == 0, stderr
    assert stdout.strip() == str(dubbed)
    code, _, stderr = helpers.run_cli(["lipsync", face_video, speech_1s, "-o", generic, "--backbone", "dck",
                                       "--device", "cpu", "-q"])
    assert code == 0, stderr
    frames, shipped = helpers.decode_frames(dubbed), helpers.decode_frames(generic)
    assert len(frames) == len(shipped) == 25
    assert any(not np.array_equal(a, b) for a, b in zip(frames, shipped))  # the adapted model was used


def test_lipsync_adapt_then_dub_in_one_run(face_video, speech_1s, tmp_path):
    kept, dubbed = tmp_path / "kept.pt", tmp_path / "out.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", face_video, speech_1s, "-o", dubbed, "--adapt", "--backbone",
                                            "dck", "--adapt-steps", STEPS, "--adapt-out", kept, "--device", "cpu"])
    assert code == 0, stderr
    assert stdout.strip() == str(dubbed) and len(helpers.decode_frames(dubbed)) == 25
    assert "first step took" in stderr and "adapt" in stderr
    assert load_package(kept)["meta"]["adapted"]["steps"] == STEPS


@pytest.mark.parametrize("args, code, words", [
    (["adapt", "{video}", "-o", "{tmp}/p.pt", "--steps", "0"], 2, ["--steps 0", "at least 1"]),
    (["adapt", "{video}", "-o", "{tmp}"], 2, ["is a folder"]),
    (["adapt", "{video}", "-o", "{tmp}/p.mp4"], 2, ["must end in .pt"]),
    (["adapt", "{video}", "-o", "{base}", "--backbone", "dck"], 2, ["is an input"]),
    (["adapt", "{video}", "-o", "{shipped}"], 2, ["rewrite.pt", "is in weights/"]),  # never over a shipped file
    (["adapt", "{video}", "-o", "{tmp}/p.pt", "--minutes", "0"], 2, ["--minutes 0", "greater than 0"]),
    (["adapt", "{video}", "-o", "{tmp}/p.pt", "--backbone", "toy_frame"], 2, ["--backbone toy_frame", "dck"]),
    (["adapt", "{photo}", "-o", "{tmp}/p.pt"], 1, ["is a photo"]),
    (["adapt", "{silent}", "-o", "{tmp}/p.pt"], 1, ["no audio track"]),
    (["adapt", "{muted}", "-o", "{tmp}/p.pt"], 1, ["muted.mp4", "its audio track is silent"]),
    (["adapt", "{faceless}", "-o", "{tmp}/p.pt", "-q"], 1, ["faceless.mp4", "no face"]),  # -q: found while tracking
    (["adapt", "{mumble}", "-o", "{tmp}/p.pt", "-q"], 1, ["mumble.mp4", "s of speech with a visible face",
                                                     "needs at least 0.5 s"]),
    (["lipsync", "{photo}", "{speech}", "-o", "{tmp}/o.mp4", "--adapt"], 1, ["is a photo", "one frame"]),
    (["lipsync", "{video}", "{speech}", "-o", "{tmp}/o.mp4", "--adapt-steps", "3"], 2, ["--adapt-steps 3",
                                                                                          "with --adapt"]),
    (["lipsync", "{video}", "{speech}", "-o", "{tmp}/o.mp4", "--adapt", "--adapt-steps", "0"], 2,
     ["--adapt-steps 0"]),
    (["lipsync", "{video}", "{speech}", "-o", "{tmp}/o.mp4", "--adapt", "--weights", "{base}"], 2,
     ["--weights", "cannot be combined with --adapt"]),
    (["lipsync", "{video}", "{speech}", "-o", "{tmp}/o.mp4", "--adapt", "--face-index", "1"], 2,
     ["--face-index 1", "largest face"]),
    (["lipsync", "{video}", "{speech}", "-o", "{tmp}/o.mp4", "--adapt", "--adapt-out", "{tmp}"], 2,
     ["--adapt-out", "is a folder"]),
    (["lipsync", "{video}", "{speech}", "-o", "{tmp}/o.mp4", "--weights", "{expert}"], 1,
     ["syncnet.pt", "not a generator backbone"]),
])
def test_refusals(args, code, words, face_video, face_video_silent, face_still, speech_1s, bad_videos, tmp_path):
    values = {"video": face_video, "silent": face_video_silent, "photo": face_still, "speech": speech_1s,
              "tmp": tmp_path, "base": weights_path("dck"), "shipped": weights_path("rewrite"),
              "expert": weights_path("syncnet"), **bad_videos}
    got, stdout, stderr = helpers.run_cli([a.format(**values) for a in args])
    assert got == code, stderr
    line = stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and all(w in line for w in words), line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_unwritable_output_is_refused_before_any_work(face_video, tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    code, _, stderr = helpers.run_cli(["adapt", face_video, "-o", tmp_path / "file.txt" / "p.pt"])
    line = stderr.strip()
    assert code == 2 and line.startswith("error: -o") and "\n" not in line, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_the_measured_lag_corrects_a_known_shift(grid_clip, tmp_path):
    """A GRID clip (in sync) with its audio delayed by 3 frames: the expert finds 3 frames less
    than on the original, and the adaptation trains at that lag."""
    from dubber.backbones import weights_path
    from dubber.train.adapt import _measured_lag, adapt
    from dubber.train.recipes import recipe_for

    shifted = tmp_path / "shifted" / grid_clip.name
    shifted.parent.mkdir()
    helpers.run_ffmpeg(["-i", str(grid_clip), "-c:v", "copy", "-af", "adelay=120:all=1", "-t", "3",
                        "-c:a", "aac", str(shifted)])  # 120 ms = 3 frames at 25 fps
    specs = list(recipe_for("dck", init=str(weights_path("dck"))).crops())
    item = {"path": grid_clip, "identity": "s1", "lag": 0}
    original = _measured_lag(item, tmp_path / "cache", specs, None, lambda m: None)
    out = adapt(shifted, tmp_path / "person.pt", "dck", steps=1, device="cpu", cache_dir=tmp_path / "cache",
                log=lambda m: None)
    assert load_package(out)["meta"]["adapted"]["lag"] == original - 3


def test_rewrite_adapts_and_dubs_in_one_run(face_video, speech_1s, cache, tmp_path):
    """The rewrite backbone's stage 1 adapts too (landmarks and audio of the video, from the shipped
    file) and dubs from the video's own mouths with the result."""
    kept, dubbed = tmp_path / "kept.pt", tmp_path / "out.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", face_video, speech_1s, "-o", dubbed, "--backbone", "rewrite",
                                            "--adapt", "--adapt-steps", STEPS, "--adapt-out", kept, "--device", "cpu"])
    assert code == 0, stderr
    assert stdout.strip() == str(dubbed) and len(helpers.decode_frames(dubbed)) == 25
    meta = load_package(kept)["meta"]
    assert meta["backbone"] == "rewrite" and meta["adapted"]["steps"] == STEPS
    assert meta["recipe"]["init"] == str(weights_path("rewrite").resolve())
    assert meta["state_sha256"] != meta["adapted"]["base"]["state_sha256"]
