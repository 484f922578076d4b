"""`dubber train`, `dubber lipsync` and `dubber eval` through the real CLI, on a tiny corpus the
test makes: DCK, the sync expert, and the two reference backbones of the temporal contract
(toy_frame: window 1; toy_clip: window 16 with overlap and carried state).

The corpus has the layout of ../shared/data (grid/<speaker>/*.mp4, wild/, manifest_wild.csv with a
val identity), so the same loaders, cache, loop and recipes run as on the real data, for a few steps.
"""

import csv
import json
import math

import pytest

import helpers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    speaker = root / "grid" / "s9"
    speaker.mkdir(parents=True)
    for k in range(3):
        helpers.make_face_video(speaker / f"utt{k}.mp4", seconds=1.4, fps=25, size=(192, 160), audio=True, marker=False)
    (root / "wild").mkdir()
    helpers.make_face_video(root / "wild" / "held_out.mp4", seconds=1.4, fps=25, size=(192, 160), audio=True, marker=False)
    (root / "manifest_wild.csv").write_text("file,audio,audio_silent,split,sync_lag_est,sync_peak_est,note\n"
                                            "wild/held_out.mp4,yes,no,val,0,0.5,id=someone_else; made by the test\n")
    return root


def train(backbone, corpus, tmp_path, steps, batch_size, *extra):
    """`dubber train` on the tiny corpus -> (exit code, stdout, stderr, weights path)."""
    weights = tmp_path / "weights" / f"{backbone}.pt"
    code, out, err = helpers.run_cli_subprocess(
        ["train", "--backbone", backbone, "--data", corpus, "--cache", tmp_path / "cache", "--out", weights,
         "--steps", str(steps), "--batch-size", str(batch_size), "--grid-every", "1", "--device", "cpu",
         "--workers", "1", "-q", *extra])
    return code, out, err, weights


@pytest.mark.slow
def test_train_dck_then_dub_with_the_trained_weights(corpus, tmp_path):
    code, out, err, weights = train("dck", corpus, tmp_path, steps=2, batch_size=2)
    assert code == 0, err
    assert weights.is_file() and out.strip().endswith("dck.pt")
    from dubber.checkpoint import load_package

    meta = load_package(weights)["meta"]
    assert meta["steps"] == 2 and meta["recipe"]["size"] == 128 and meta["data"]["identities"] == 1
    # Resume: asking for more steps continues from the training checkpoint.
    code, _, err, _ = train("dck", corpus, tmp_path, steps=3, batch_size=2)
    assert code == 0, err
    assert load_package(weights)["meta"]["steps"] == 3

    video = next((corpus / "grid" / "s9").glob("*.mp4"))
    output = tmp_path / "dubbed.mp4"
    code, out, err = helpers.run_cli_subprocess(["lipsync", video, video, "-o", output, "--weights", weights, "-q"])
    assert code == 0, err
    frames = helpers.decode_frames(output)
    assert len(frames) == 35 and frames[0].shape == (160, 192, 3)


@pytest.mark.slow
def test_train_syncnet_then_eval_with_it(corpus, tmp_path):
    code, _, err, weights = train("syncnet", corpus, tmp_path, steps=2, batch_size=8)
    assert code == 0, err
    from dubber.checkpoint import load_package

    package = load_package(weights)
    assert package["name"] == "syncnet" and package["meta"]["steps"] == 2 and package["meta"]["data"]["clips"] == 3
    split = tmp_path / "val.txt"
    split.write_text("s9/utt0.mp4\n")
    code, out, err = helpers.run_cli_subprocess(
        ["eval", "--dataset", "grid", "--root", corpus / "grid", "--split", split, "--sync-expert", weights,
         "--out", tmp_path / "report", "-q"])
    assert code == 0, err
    ground_truth = json.loads((tmp_path / "report" / "summary.json").read_text())["systems"]["ground_truth"]
    assert 0 <= ground_truth["lse_d"] <= 2 and 0 <= ground_truth["offset_accuracy"] <= 1


@pytest.mark.slow
def test_eval_writes_table_csv_json_and_images(corpus, tmp_path):
    out_dir = tmp_path / "report"
    split = tmp_path / "val.txt"  # three sentences are too few for GRID's 10 % validation tail
    split.write_text("s9/utt0.mp4\ns9/utt1.mp4\n")
    code, out, err = helpers.run_cli_subprocess(
        ["eval", "--dataset", "grid", "--root", corpus / "grid", "--split", split, "--no-sync-expert",
         "--out", out_dir, "-q"])
    assert code == 0, err
    assert "ground_truth" in out and "static_frame" in out
    summary = json.loads((out_dir / "summary.json").read_text())["systems"]
    assert summary["ground_truth"]["lmd"] == 0 and summary["ground_truth"]["psnr"] == 100
    assert summary["static_frame"]["lmd"] > 0  # the made face moves, so a frozen frame is wrong
    assert summary["static_frame"]["lmd_mean_mouth"] > 0 and "lmd_mean_mouth" not in summary["ground_truth"]
    rows = list(csv.DictReader(open(out_dir / "clips.csv")))
    assert {r["system"] for r in rows} == {"ground_truth", "static_frame", "shifted_audio"}
    assert len(list((out_dir / "sheets").glob("*.png"))) == 4  # a contact sheet and a sync plot per clip


@pytest.mark.slow
def test_eval_scores_a_backbone_and_its_dub(dck_eval):
    out_dir, out = dck_eval
    assert "forgiven" in out  # the table's note on what lse_c does with a shift
    rows = list(csv.DictReader(open(out_dir / "clips.csv")))
    assert {r["system"] for r in rows} == {"ground_truth", "static_frame", "shifted_audio", "dck", "dck:dub"}
    for row in rows:
        assert row["lse_c0"] != "" and row["av_corr"] != ""
        if row["system"] == "dck:dub":  # judged against the next clip's speech, and against its own
            assert row["lse_c0_original"] != "" and row["av_corr_original"] != ""
            assert row["lse_c0"] != row["lse_c0_original"]
        if row["system"] == "dck":
            assert float(row["psnr"]) < 100 and float(row["fps_model"]) > 0
    # The mouth metrics: every system but the dub is compared with the real mouth frame by frame;
    # a dub has no real reference in its new speech's silence.
    by_system = {}
    for row in rows:
        by_system.setdefault(row["system"], []).append(row)
        compared = not row["system"].endswith(":dub")
        columns = ["mouth_sharpness", "mouth_sharpness_ratio", "silence_opening"]
        columns += ["mouth_corr", "mouth_psnr", "silence_opening_real"] if compared else []
        for column in columns:
            assert math.isfinite(float(row[column])), (row["system"], column, row[column])
        if not compared:
            assert row["mouth_corr"] == row["mouth_psnr"] == row["silence_opening_real"] == ""
    for truth in by_system["ground_truth"]:
        assert float(truth["mouth_corr"]) == pytest.approx(1.0) and float(truth["mouth_sharpness_ratio"]) == 1.0
        assert float(truth["mouth_psnr"]) == 100 and truth["silence_opening"] == truth["silence_opening_real"]
    for still in by_system["static_frame"]:
        assert float(still["mouth_corr"]) == 0.0  # a mouth that never moves follows none of the real one
    summary = json.loads((out_dir / "summary.json").read_text())["systems"]
    assert summary["ground_truth"]["mouth_corr"] == pytest.approx(1.0)
    assert summary["ground_truth"]["mouth_sharpness_ratio"] == 1.0 and summary["dck"]["mouth_psnr"] < 100
    assert sorted(p.name for p in (out_dir / "sheets" / "mouths").glob("*.png")) == ["clips_clip0.png", "clips_clip1.png"]


def test_eval_without_sync_expert_weights_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("DUBBER_WEIGHTS", str(tmp_path))
    helpers.make_face_video(tmp_path / "a.mp4", seconds=0.5, audio=True, marker=False)
    code, _, err = helpers.run_cli_subprocess(["eval", "--dataset", "folder", "--root", tmp_path, "-q"])
    assert code == 1 and "sync expert" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["toy_frame", "toy_clip"])
def test_contract_backbones_train_dub_and_evaluate(backbone, corpus, tmp_path, monkeypatch):
    """A window-1 and a window-16 stateful backbone through train (with validation on the held-out
    identity), lipsync (photo; video with a faceless stretch mid-way and audio longer than it) and eval."""
    offsets = tmp_path / "offsets.csv"
    offsets.write_text("file,lag\nwild/held_out.mp4,1\n")
    code, out, err, weights = train(backbone, corpus, tmp_path, 3, 2, "--val-every", "2", "--offsets", offsets,
                                    "--set", "lr=0.002")
    assert code == 0, err
    from dubber.checkpoint import load_package

    meta = load_package(weights)["meta"]
    assert meta["steps"] == 3 and meta["selected_step"] in (2, 3) and "val_lmd" in meta["validation"]
    assert meta["data"]["validation_clips"] == ["held_out#0"]
    assert meta["recipe"]["lr"] == 0.002 and meta["data"]["offsets_table"] == {"wild/held_out.mp4": 1}

    speech = helpers.make_tone_speech(tmp_path / "speech.wav", 2.6)
    photo_out = tmp_path / "photo.mp4"
    code, _, err = helpers.run_cli_subprocess(["lipsync", helpers.FACE_PHOTO, speech, "-o", photo_out,
                                               "--backbone", backbone, "--weights", weights])
    assert code == 0, err
    assert helpers.summary_counts(err) == (65, 65, 0)

    video = helpers.make_face_video(tmp_path / "gap.mp4", seconds=1.2, fps=25, blank=range(12, 18), marker=False)
    video_out = tmp_path / "video.mp4"
    code, _, err = helpers.run_cli_subprocess(["lipsync", video, speech, "-o", video_out,
                                               "--backbone", backbone, "--weights", weights])
    assert code == 0, err
    # 65 frames: forward 0..29, back 28..0, forward 1..5; frames 12-17 have no face each way.
    frames, dubbed, faceless = helpers.summary_counts(err)
    assert frames == 65 and faceless == 12 and dubbed == 53
    assert "played forward and back" in err

    monkeypatch.setenv("DUBBER_WEIGHTS", str(weights.parent))
    clips = tmp_path / "clips"
    clips.mkdir()
    helpers.make_face_video(clips / "a.mp4", seconds=1.2, fps=25, audio=True, marker=False)
    code, out, err = helpers.run_cli_subprocess(["eval", "--dataset", "folder", "--root", clips, "--backbone", backbone,
                                                 "--no-sync-expert", "--out", tmp_path / "report", "-q"])
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "report" / "clips.csv")))
    assert [r["system"] for r in rows] == ["ground_truth", "static_frame", "shifted_audio", backbone]
    assert float(rows[-1]["psnr"]) < 100 and float(rows[-1]["lmd"]) >= 0
