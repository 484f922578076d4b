"""Every option checked before any work: one parametrised case per value a user can get wrong.

Each case runs the CLI in this process with the expensive steps (decoding, face analysis, audio
decoding, pasting, training, evaluation) replaced by a function that fails the test, unless the
case needs them to find the problem (a face index beyond the faces a file has). Whatever the case:

- stderr is exactly one line, `error: ...`, naming the option and the value typed (or the file
  at fault), with what is allowed;
- the exit code is 2 for a usage error (an option's value or a missing argument), 1 for an input
  error, never 3 (an internal error);
- nothing is written (the `out/` folder is unchanged).
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest

import helpers
from dubber.errors import DubberError

SECONDS = 1.0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A photo, 1 s of speech, a 1 s video with its preprocess cache, 10 crops of the cache's size,
    a plain file and a folder of corrupt 'videos'."""
    d = tmp_path_factory.mktemp("options_in")
    files = {"photo": d / "face.jpg", "speech": helpers.make_tone_speech(d / "speech.wav", SECONDS),
             "video": helpers.make_face_video(d / "clip.mp4", SECONDS, 25, audio=True),
             "other_video": helpers.make_face_video(d / "other.mp4", SECONDS, 25, size=(200, 160))}
    shutil.copyfile(helpers.FACE_PHOTO, files["photo"])
    code, stdout, stderr = helpers.run_cli(["preprocess", files["video"], "-o", d / "cache", "-q"])
    assert code == 0, stderr
    files["cache"] = Path(stdout.strip())
    crops = d / "crops10"
    crops.mkdir()
    for k in range(10):
        helpers.write_image(crops / f"{k:03d}.png", np.zeros((96, 96, 3), np.uint8))
    files["crops10"] = crops
    files["file"] = d / "plain.txt"
    files["file"].write_text("not a folder\n")
    corrupt = d / "corrupt"
    corrupt.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (corrupt / name).write_text("not a video\n")
    files["corrupt"] = corrupt
    files["weights"] = helpers.REPO / "weights"
    return files


@dataclass
class Case:
    args: Callable  # (inputs, out folder) -> CLI arguments
    code: int  # 2 usage error, 1 input error
    says: Sequence[str]  # substrings of the error line (option, value, what is allowed)
    work: bool = False  # the problem shows only once the input is analysed
    skip_with_gpu: bool = False


def _lipsync(*extra, face="photo", audio="speech", output="o.mp4"):
    def args(f, out):
        return ["lipsync", f[face], f[audio], "-o", out / output if isinstance(output, str) else output(f, out),
                "--backbone", "identity", "-q", *[e(f, out) if callable(e) else e for e in extra]]
    return args


def _cmd(name, *extra):
    return lambda f, out: [name, *[e(f, out) if callable(e) else e for e in extra]]


def _eval(*extra):
    return lambda f, out: ["eval", "--dataset", "folder", "--root", f["corrupt"], "--out", out / "eval",
                           "--no-sync-expert", "-q", *[e(f, out) if callable(e) else e for e in extra]]


def _train(*extra):
    return lambda f, out: ["train", "--data", helpers.REPO.parent / "shared" / "data", "--cache", out / "cache",
                           "-q", *[e(f, out) if callable(e) else e for e in extra]]


def _train_data(f, out):
    """A corpus root that exists (its content is never read: the checks come first)."""
    return out.parent


CASES = {
    # lipsync: ranges
    "fps_zero": Case(_lipsync("--fps", "0"), 2, ["--fps 0", "between 1 and 240"]),
    "fps_negative": Case(_lipsync("--fps", "-5"), 2, ["--fps -5", "between 1 and 240"]),
    "fps_not_a_number": Case(_lipsync("--fps", "abc"), 2, ["--fps abc", "number"]),
    "fps_with_a_video": Case(_lipsync("--fps", "50", face="video"), 2, ["--fps 50", "applies to a photo", "25 fps"]),
    "crf_99": Case(_lipsync("--crf", "99"), 2, ["--crf 99", "between 0 and 51"]),
    "crf_negative": Case(_lipsync("--crf", "-1"), 2, ["--crf -1", "between 0 and 51"]),
    "preset_unknown": Case(_lipsync("--preset", "fastest"), 2, ["--preset fastest", "ultrafast", "veryslow"]),
    "batch_size_zero": Case(_lipsync("--batch-size", "0"), 2, ["--batch-size 0", "between 1 and 4096"]),
    "jobs_zero": Case(lambda f, out: ["lipsync", f["crops10"], f["speech"], "-o", out / "batch", "--jobs", "0", "-q"],
                      2, ["--jobs 0", "between 1 and 64"]),
    # lipsync: choices and formats
    "blend_unknown": Case(_lipsync("--blend", "smudge"), 2, ["--blend smudge", "auto, feather, poisson, alpha"]),
    "detector_unknown": Case(_lipsync("--detector", "yolo"), 2, ["--detector yolo", "hog, cnn"]),
    "device_unknown": Case(_lipsync("--device", "gpu"), 2, ["--device gpu", "auto, cpu, cuda or cuda:N"]),
    "device_cuda_without_gpu": Case(_lipsync("--device", "cuda:1"), 2, ["--device cuda:1", "no CUDA GPU"],
                                    skip_with_gpu=True),
    "half_on_cpu": Case(_lipsync("--half", "--device", "cpu"), 2, ["--half", "cpu", "CUDA"]),
    "precision_unknown": Case(_lipsync("--precision", "fp8"), 2, ["--precision fp8", "auto, fp32, bf16"]),
    "face_index_negative": Case(_lipsync("--face-index", "-1"), 2, ["--face-index -1", "at least 0"]),
    "face_box_malformed": Case(_lipsync("--face-box", "1,2,oops"), 2, ["--face-box 1,2,oops", "x0,y0,x1,y1"]),
    "face_box_inverted": Case(_lipsync("--face-box", "50,50,10,10"), 2, ["--face-box 50,50,10,10", "x1 > x0"]),
    "face_box_and_index": Case(_lipsync("--face-box", "0,0,100,100", "--face-index", "1"), 2,
                               ["--face-index 1", "not both"]),
    "start_negative": Case(_lipsync("--start", "-1", face="video"), 2, ["--start -1", "at least 0"]),
    "duration_zero": Case(_lipsync("--duration", "0", face="video"), 2, ["--duration 0", "greater than 0"]),
    "start_with_a_photo": Case(_lipsync("--start", "2"), 2, ["--start 2", "applies to a video", "face.jpg is a photo"]),
    "duration_with_a_photo": Case(_lipsync("--duration", "2"), 2, ["--duration 2", "applies to a video"]),
    "start_past_the_end": Case(_lipsync("--start", "5", face="video"), 2, ["--start 5", "clip.mp4 is only 1.0"]),
    "loop_unknown": Case(_lipsync("--loop", "bounce"), 2, ["--loop bounce", "pingpong, repeat, hold, stretch"]),
    "pads_too_large": Case(_lipsync("--pads", "0", "0", "0", "999"), 2, ["--pads 0 0 0 999", "-512 and 512"]),
    "pads_three_values": Case(_lipsync("--pads", "1", "2", "3"), 2, ["--pads"]),
    # lipsync: selections that select nothing (found once the file is analysed)
    "face_index_beyond_the_faces": Case(_lipsync("--face-index", "3"), 2,
                                        ["--face-index 3", "face.jpg has one face", "dubber faces"], work=True),
    "face_box_on_no_face": Case(_lipsync("--face-box", "0,0,20,20"), 2,
                                ["--face-box 0,0,20,20", "overlaps no face", "faces found at 0: 181,79,273,171"],
                                work=True),
    # lipsync: files named by options
    "weights_missing": Case(_lipsync("--weights", lambda f, out: out.parent / "no.pt", "--backbone", "dck"), 2,
                            ["--weights", "no.pt", "file not found"]),
    "weights_is_a_folder": Case(_lipsync("--weights", lambda f, out: out, "--backbone", "dck"), 2,
                                ["--weights", "is a folder"]),
    "backbone_unknown": Case(_lipsync("--backbone", "nosuch"), 2, ["--backbone nosuch", "unknown", "dck"]),
    "backbone_untrained": Case(_lipsync("--backbone", "cran"), 1, ["cran.pt", "no trained weights for 'cran'", "dubber train --backbone cran"]),
    "backbone_not_a_generator": Case(_lipsync("--backbone", "syncnet"), 2, ["--backbone syncnet", "not a generator"]),
    "output_is_a_folder": Case(_lipsync(output=lambda f, out: out), 2, ["-o", "is a folder", ".mp4"]),
    "output_not_mp4": Case(_lipsync(output="o.mkv"), 2, ["-o", "o.mkv", "must end in .mp4"]),
    "output_under_a_file": Case(_lipsync(output=lambda f, out: f["file"] / "o.mp4"), 2,
                                ["-o", "plain.txt", "is a file, not a folder"]),
    "output_is_the_input": Case(_lipsync("--overwrite", output=lambda f, out: f["photo"]), 2,
                                ["-o", "face.jpg"]),
    "audio_missing": Case(lambda f, out: ["lipsync", f["photo"], "-o", out / "o.mp4", "-q"], 2, ["AUDIO is required"]),
    "option_unknown": Case(_lipsync("--pad", "3"), 2, ["--pad"]),
    # preprocess
    "crop_size_zero": Case(_cmd("preprocess", lambda f, out: f["video"], "-o", lambda f, out: out / "c", "--crop",
                                "face:0"), 2, ["--crop face:0", "16-1024"]),
    "crop_kind_unknown": Case(_cmd("preprocess", lambda f, out: f["video"], "-o", lambda f, out: out / "c", "--crop",
                                   "mouth:96"), 2, ["--crop mouth:96", "face|lips|box:SIZE"]),
    "preprocess_output_is_a_file": Case(_cmd("preprocess", lambda f, out: f["video"], "-o", lambda f, out: f["file"]),
                                        2, ["-o", "plain.txt", "is a file"]),
    # blend
    "blend_mode_unknown": Case(_cmd("blend", lambda f, out: f["video"], lambda f, out: f["cache"],
                                    lambda f, out: f["crops10"], "-o", lambda f, out: out / "b.mp4", "--mode", "smudge"),
                               2, ["--mode smudge", "feather, alpha, poisson"]),
    "blend_output_avi": Case(_cmd("blend", lambda f, out: f["video"], lambda f, out: f["cache"],
                                  lambda f, out: f["crops10"], "-o", lambda f, out: out / "b.avi"),
                             2, ["-o", "b.avi", "must end in .mp4"]),
    "blend_cache_of_another_video": Case(_cmd("blend", lambda f, out: f["other_video"], lambda f, out: f["cache"],
                                              lambda f, out: f["crops10"], "-o", lambda f, out: out / "b.mp4"),
                                         1, ["clip.npz", "cache of a 160x128 input", "other.mp4 is 200x160"]),
    "blend_fewer_crops_than_frames": Case(_cmd("blend", lambda f, out: f["video"], lambda f, out: f["cache"],
                                               lambda f, out: f["crops10"], "-o", lambda f, out: out / "b.mp4"),
                                          1, ["crops10", "holds 10 crops", "25 frames"]),
    # eval
    "eval_backbone_unknown": Case(_eval("--backbone", "nosuch"), 2, ["--backbone nosuch", "unknown", "dck"]),
    "eval_split_missing": Case(_eval("--split", lambda f, out: out.parent / "split.csv"), 2,
                               ["--split", "split.csv", "file not found"]),
    "eval_out_is_a_file": Case(lambda f, out: ["eval", "--dataset", "folder", "--root", f["corrupt"], "--out",
                                               f["file"], "--no-sync-expert"], 2, ["--out", "plain.txt", "is a file"]),
    "eval_limit_zero": Case(_eval("--limit", "0"), 2, ["--limit 0", "at least 1"]),
    "eval_dataset_unknown": Case(lambda f, out: ["eval", "--dataset", "vox", "--root", f["corrupt"]], 2,
                                 ["--dataset vox", "grid, lrw, folder"]),
    "eval_root_missing": Case(lambda f, out: ["eval", "--dataset", "folder", "--root", out / "nowhere"], 2,
                              ["--root", "nowhere", "folder not found"]),
    "eval_expert_and_no_expert": Case(_eval("--sync-expert", lambda f, out: f["weights"] / "syncnet.pt"), 2,
                                      ["--sync-expert", "--no-sync-expert"]),
    "eval_every_clip_corrupt": Case(_eval(), 1, ["every clip failed (2 of 2)", "a.mp4"], work=True),
    # train
    "train_steps_zero": Case(_train("--steps", "0"), 2, ["--steps 0", "at least 1"]),
    "train_grid_every_zero": Case(_train("--grid-every", "0"), 2, ["--grid-every 0", "at least 1"]),
    "train_minutes_zero": Case(_train("--data", _train_data, "--minutes", "0"), 2, ["--minutes 0", "greater than 0"]),
    "train_pack_missing": Case(_train("--data", _train_data, "--pack", lambda f, out: out.parent / "nopack"), 2, ["--pack", "nopack", "file not found"]),
    "train_workers_zero": Case(_train("--workers", "0"), 2, ["--workers 0", "between 1 and 64"]),
    "train_backbone_unknown": Case(_train("--backbone", "nosuch"), 2, ["--backbone nosuch", "trainable: amie, cran, dck"]),
    "train_patience_without_validation": Case(_train("--patience", "3"), 2, ["--patience 3", "--val-every"]),
    "train_data_missing": Case(lambda f, out: ["train", "--data", out / "nowhere"], 2,
                               ["--data", "nowhere", "folder not found"]),
    "train_out_existing_folder": Case(_train("--data", _train_data, "--out", lambda f, out: out), 2,
                                      ["--out", "is a folder", ".pt"]),
    "train_out_under_a_file": Case(_train("--data", _train_data, "--out", lambda f, out: f["file"] / "m.pt"), 2,
                                   ["--out", "plain.txt is a file, not a folder"]),
    "train_out_not_pt": Case(_train("--data", _train_data, "--out", lambda f, out: out / "m.txt"), 2,
                             ["--out", "m.txt", "must end in .pt"]),
    "train_out_shipped_weights": Case(_train("--data", _train_data, "--out", lambda f, out: f["weights"] / "dck.pt"),
                                      2, ["--out", "weights/dck.pt", "--force"]),
    "train_log_every_zero": Case(_train("--log-every", "0"), 2, ["--log-every 0", "at least 1"]),
    "train_checkpoint_every_zero": Case(_train("--checkpoint-every", "0"), 2, ["--checkpoint-every 0", "at least 1"]),
    "train_val_every_negative": Case(_train("--val-every", "-1"), 2, ["--val-every -1", "at least 0"]),
    "train_set_unknown_key": Case(_train("--data", _train_data, "--set", "foo=1"), 2,
                                  ["--set foo=1", "dck has no hyperparameter foo", "lr"]),
    "train_set_not_a_number": Case(_train("--data", _train_data, "--set", "lr=abc"), 2,
                                   ["--set lr=abc", "lr must be a number"]),
    "train_set_batch_size_zero": Case(_train("--data", _train_data, "--set", "batch_size=0"), 2,
                                      ["--set batch_size=0", "at least 1"]),
    "train_sync_expert_without_its_loss": Case(_train("--data", _train_data, "--backbone", "toy_frame", "--sync-expert",
                                                      lambda f, out: f["weights"] / "syncnet.pt"), 2,
                                               ["--sync-expert", "syncnet.pt", "toy_frame trains without"]),
}


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the options were checked")


@pytest.fixture
def no_work(monkeypatch):
    """Every expensive step fails the test if it is reached."""
    import dubber.audio
    import dubber.cache
    import dubber.eval.run
    import dubber.pipeline
    import dubber.train

    for module, name in ((dubber.pipeline, "analyse"), (dubber.audio, "load_audio"), (dubber.pipeline, "_paste_and_write"),
                         (dubber.cache, "preprocess"), (dubber.train, "train_from_corpus"),
                         (dubber.eval.run, "evaluate")):
        monkeypatch.setattr(module, name, _no_work)


@pytest.mark.parametrize("name", sorted(CASES))
def test_option_is_checked(name, inputs, tmp_path, request):
    case = CASES[name]
    if case.skip_with_gpu:
        import torch

        if torch.cuda.device_count() > 1:
            pytest.skip("this machine has the GPU the case asks for")
    if not case.work:
        request.getfixturevalue("no_work")
    out = tmp_path / "out"
    out.mkdir()
    before = helpers.tree_hashes(out), helpers.tree_hashes(inputs["photo"].parent)
    code, stdout, stderr = helpers.run_cli(case.args(inputs, out))
    lines = [line for line in stderr.splitlines() if line.strip()]
    print(f"{name}: exit {code}; {lines}")
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "internal error" not in lines[0] and "Traceback" not in stderr
    assert code == case.code, stderr
    for text in case.says:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert stdout.strip() == "" or name.startswith("eval")
    after = helpers.tree_hashes(out), helpers.tree_hashes(inputs["photo"].parent)
    if not name.startswith("eval"):  # eval writes its (empty) report, then says every clip failed
        assert after == before


def test_half_without_a_gpu_falls_back_with_a_note(inputs, tmp_path):
    """--half with --device auto on a machine without CUDA: fp32 and a note (whisper's behaviour)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --half is honoured")
    code, stdout, stderr = helpers.run_cli(["lipsync", inputs["photo"], inputs["speech"], "-o", tmp_path / "o.mp4",
                                            "--backbone", "identity", "--half"])
    assert code == 0, stderr
    assert "note: --half: no CUDA GPU here" in stderr


def test_eval_rerun_removes_stale_sheets(tmp_path):
    """A rerun into the same folder replaces the earlier run's sheets: none of a clip it did not score stays."""
    clips = tmp_path / "clips"
    clips.mkdir()
    for k in range(2):
        helpers.make_face_video(clips / f"c{k}.mp4", 0.8, 25, audio=True, marker=False)
    out = tmp_path / "eval"
    stale = out / "sheets" / "old_clip.png"
    stale.parent.mkdir(parents=True)
    helpers.write_image(stale, np.zeros((8, 8, 3), np.uint8))
    (out / "notes.txt").write_text("mine\n")
    code, stdout, stderr = helpers.run_cli(["eval", "--dataset", "folder", "--root", clips, "--out", out,
                                            "--no-sync-expert", "--limit", "1", "-q"])
    assert code == 0, stderr
    assert not stale.exists()
    assert (out / "notes.txt").read_text() == "mine\n"  # not ours: untouched
    sheets = sorted(p.name for p in (out / "sheets").glob("*.png"))
    assert sheets == ["clips_c0.png", "clips_c0_sync.png"], sheets
    assert json.loads((out / "summary.json").read_text())["clips"] == 1


def test_eval_with_some_failed_clips_says_so(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    helpers.make_face_video(clips / "good.mp4", 0.8, 25, audio=True, marker=False)
    (clips / "broken.mp4").write_text("not a video\n")
    code, stdout, stderr = helpers.run_cli(["eval", "--dataset", "folder", "--root", clips, "--out", tmp_path / "e",
                                            "--no-sync-expert", "-q"])
    assert code == 0, stderr
    assert "note: 1 of 2 clips failed" in stderr and "broken.mp4" in stderr
    assert "1 clips" in stdout and "1 failed" in stdout


def _fake_training(monkeypatch, effect):
    """dubber.train.train_from_corpus replaced: `effect(out)` runs instead; returns the outs it was given."""
    import dubber.train

    given = []

    def fake(name, data, cache, out, *args, **kwargs):
        given.append(Path(out))
        return effect(Path(out))

    monkeypatch.setattr(dubber.train, "train_from_corpus", fake)
    return given


def test_train_writes_under_a_run_folder_by_default(tmp_path, monkeypatch):
    """Without --out: runs/<backbone>-<date>/<backbone>.pt, never a shipped file in weights/."""
    import re

    monkeypatch.chdir(tmp_path)
    given = _fake_training(monkeypatch, lambda out: out)
    code, stdout, stderr = helpers.run_cli(["train", "--backbone", "toy_frame", "--data", tmp_path, "--cache",
                                            tmp_path / "cache", "-q"])
    assert code == 0, stderr
    assert re.fullmatch(r"runs/toy_frame-\d{8}-\d{6}/toy_frame\.pt", given[0].as_posix()), given
    assert stdout.strip() == given[0].as_posix() and given[0].parent.is_dir()


@pytest.mark.parametrize("failure, code", [(KeyboardInterrupt, 130), (DubberError("no usable clips"), 1)])
def test_train_stopped_at_once_leaves_no_run_folder(tmp_path, monkeypatch, failure, code):
    """Ctrl-C (or a failure) before anything is written: one line, exit 130 (1), and the run folder
    made for it is gone again. (The loop itself writes its checkpoint on Ctrl-C: test_adapt.)"""
    def stop(out):
        raise failure

    monkeypatch.chdir(tmp_path)
    _fake_training(monkeypatch, stop)
    code_seen, _, stderr = helpers.run_cli(["train", "--backbone", "toy_frame", "--data", tmp_path, "--cache",
                                            tmp_path / "cache", "-q"])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code_seen == code and len(lines) == 1, stderr
    assert lines[0] == ("error: interrupted" if code == 130 else "error: no usable clips"), stderr
    assert not (tmp_path / "runs").exists()


def test_no_internal_error_for_a_bad_value_in_a_real_process(tmp_path):
    """Through the console script: a click parsing error is one line and exit 2 as well."""
    code, stdout, stderr = helpers.run_cli_subprocess(["lipsync", helpers.FACE_PHOTO, helpers.SPEECH, "-o",
                                                       tmp_path / "o.mp4", "--crf", "high"])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --crf high: "), stderr
