"""Acceptance: bad input through the CLI gives a one-line error or a correct output, never a mess.

Each case builds its inputs in its own `in/` folder and runs `dubber lipsync` (in this process,
with the test's identity backbone unless the case is about backbones) into its own `out/` folder.
Whatever the outcome:

- an error is exactly one non-empty stderr line, `error: <file>: <problem>` naming the file at
  fault (when there is one) or `error: <option> <value>: <what is allowed>`, no traceback, and
  exit code 1 for an input error or 2 for a usage error (an option's value);
- a success is exit 0 with the output path on stdout and an output that decodes to the audio's length;
- nothing is left behind in `out/` but finished outputs (no partial or temporary files), and every
  input is byte for byte what it was (sha256 before and after).

A few cases also go through the real console script in a subprocess.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytest

import helpers
from dubber import media

SECONDS = 1.0
FPS = 25


@dataclass
class Case:
    args: List  # CLI arguments after `lipsync`
    expect: str  # "error", "ok" or "either"
    names: Optional[Path] = None  # the file an error must name
    frames: int = int(SECONDS * FPS)  # frames a successful output must have
    backbone: Optional[str] = "identity"  # None: the case sets its own
    check: Optional[Callable] = None  # more checks on success: check(output, stdout, stderr)
    output: Optional[Path] = None
    keep: List[Path] = field(default_factory=list)  # files in out/ that were there before the run
    code: int = 1  # exit code of an error: 1 input error, 2 usage error (the line names the option)


@pytest.fixture(scope="module")
def base(media_dir):
    """Inputs copied into each case: a 1 s face video (marked, head motion) and 1 s of speech."""
    return {"video": helpers.make_face_video(media_dir / "bad_base.mp4", SECONDS, FPS),
            "video_faststart": helpers.make_face_video(media_dir / "bad_base_fs.mp4", SECONDS, FPS, faststart=True),
            "speech": helpers.make_tone_speech(media_dir / "bad_speech.wav", SECONDS)}


def _copy(source: Path, folder: Path, name: Optional[str] = None) -> Path:
    target = folder / (name or source.name)
    shutil.copyfile(source, target)
    return target


# ---------------------------------------------------------------------------------------------
# the cases: each gets (base, in_dir, out_dir) and returns a Case


def case_nonexistent_face(base, d, out):
    missing = d / "nope.mp4"
    return Case([missing, _copy(base["speech"], d), "-o", out / "o.mp4"], "error", missing)


def case_nonexistent_audio(base, d, out):
    missing = d / "nope.wav"
    return Case([_copy(base["video"], d), missing, "-o", out / "o.mp4"], "error", missing)


def case_empty_file(base, d, out):
    empty = d / "empty.mp4"
    empty.touch()
    return Case([empty, _copy(base["speech"], d), "-o", out / "o.mp4"], "error", empty)


def case_truncated_video(base, d, out):
    """Cut in half with the index (moov) at the end: nothing can be decoded."""
    data = base["video"].read_bytes()
    cut = d / "cut.mp4"
    cut.write_bytes(data[:len(data) // 2])
    return Case([cut, _copy(base["speech"], d), "-o", out / "o.mp4"], "error", cut)


def case_truncated_faststart_video(base, d, out):
    """Cut in half with the index first: the first half decodes; either an error or a full-length output."""
    data = base["video_faststart"].read_bytes()
    cut = d / "cut_fs.mp4"
    cut.write_bytes(data[:len(data) // 2])
    return Case([cut, _copy(base["speech"], d), "-o", out / "o.mp4"], "either", cut)


def case_text_renamed_mp4(base, d, out):
    text = d / "notes.mp4"
    text.write_text("This is not a video.\n" * 20)
    return Case([text, _copy(base["speech"], d), "-o", out / "o.mp4"], "error", text)


def case_video_without_audio_as_audio(base, d, out):
    video = _copy(base["video"], d)
    other = _copy(base["video"], d, "other.mp4")
    return Case([video, other, "-o", out / "o.mp4"], "error", other)


def case_audio_is_a_folder(base, d, out):
    folder = d / "speech_folder"
    folder.mkdir()
    return Case([_copy(base["video"], d), folder, "-o", out / "o.mp4"], "error", folder)


def case_silent_audio(base, d, out):
    silent = helpers.make_tone_speech(d / "silence.wav", SECONDS, amplitude=0)
    return Case([_copy(base["video"], d), silent, "-o", out / "o.mp4"], "either", silent)


def case_image_without_face_flat(base, d, out):
    image = helpers.write_image(d / "flat.png", np.full((128, 160, 3), (40, 120, 200), np.uint8))
    return Case([image, _copy(base["speech"], d), "-o", out / "o.mp4"], "error", image)


def case_image_without_face_noise(base, d, out):
    noise = np.random.default_rng(1).integers(0, 256, (128, 160, 3), dtype=np.uint8)
    image = helpers.write_image(d / "noise.jpg", noise)
    return Case([image, _copy(base["speech"], d), "-o", out / "o.mp4"], "error", image)


def case_video_without_any_face(base, d, out):
    frames = [np.full((128, 160, 3), 30 + 4 * i, np.uint8) for i in range(FPS)]
    video = helpers.encode_frames(d / "noface.mp4", frames, FPS)
    return Case([video, _copy(base["speech"], d), "-o", out / "o.mp4"], "error", video)


BLANK = list(range(8, 13))


def case_frames_without_face_mid_video(base, d, out):
    """Frames 8-12 blanked: all frames come out, those five unchanged, the summary counts them."""
    video = helpers.make_face_video(d / "gap.mp4", SECONDS, FPS, blank=BLANK)

    def check(output, stdout, stderr):
        assert helpers.summary_counts(stderr) == (FPS, FPS - len(BLANK), len(BLANK))
        source, result = helpers.decode_frames(video), helpers.decode_frames(output)
        for i, (a, b) in enumerate(zip(source, result)):
            if i in BLANK:
                assert helpers.psnr(a, b) > 45, i  # passed through
            else:
                assert helpers.psnr(a, b) < 40, i  # dubbed (the shiftmouth backbone moves the mouth)
    # Not quiet: the summary line on stderr is part of what is checked.
    return Case([video, _copy(base["speech"], d), "-o", out / "o.mp4", "--backbone", "shiftmouth"], "ok",
                backbone=None, check=check)


def _two_faces(d):
    """A 240x128 photo: a large face on the left, a smaller one on the right."""
    frame = np.full((128, 240, 3), 90, np.uint8)
    frame[:, :128] = helpers.face_frame(0, (128, 128), motion=False)
    frame[14:114, 134:234] = helpers.face_frame(0, (100, 100), motion=False)
    return helpers.write_image(d / "two_faces.png", frame)


def _changed_side(image, output):
    """Which half of the frame (left/right) the dub changed."""
    source = media.read_image(image).astype(np.int16)
    result = helpers.decode_frames(output)[len(helpers.decode_frames(output)) // 2].astype(np.int16)
    moved = np.abs(result - source).mean(-1) > 20  # the re-encode alone stays well under this
    left, right = int(moved[:, :130].sum()), int(moved[:, 132:].sum())
    print(f"pixels changed by the dub: left face {left}, right face {right}")
    return "left" if left > 100 and right < 30 else "right" if right > 100 and left < 30 else "both"


def case_two_faces_largest(base, d, out):
    image = _two_faces(d)

    def check(output, *_):
        assert _changed_side(image, output) == "left", "the largest face was not the one dubbed"
    return Case([image, _copy(base["speech"], d), "-o", out / "o.mp4", "-q", "--backbone", "shiftmouth"], "ok",
                backbone=None, check=check)


def case_two_faces_index_1(base, d, out):
    image = _two_faces(d)

    def check(output, *_):
        assert _changed_side(image, output) == "right", "--face-index 1 did not dub the other face"
    return Case([image, _copy(base["speech"], d), "-o", out / "o.mp4", "-q", "--backbone", "shiftmouth",
                 "--face-index", "1"], "ok", backbone=None, check=check)


def case_face_index_out_of_range(base, d, out):
    image = _two_faces(d)
    return Case([image, _copy(base["speech"], d), "-o", out / "o.mp4", "--face-index", "5"], "error", image, code=2)


def _audio_check(output, *_):
    assert media.probe(output).has_audio


def case_audio_8k_mono(base, d, out):
    speech = helpers.make_tone_speech(d / "phone.wav", SECONDS, rate=8000, channels=1)
    return Case([_copy(base["video"], d), speech, "-o", out / "o.mp4"], "ok", check=_audio_check)


def case_audio_48k_6ch(base, d, out):
    speech = helpers.make_tone_speech(d / "surround.wav", SECONDS, rate=48000, channels=6)
    info = media.probe(speech)
    assert (info.sample_rate, info.channels) == (48000, 6)
    return Case([_copy(base["video"], d), speech, "-o", out / "o.mp4"], "ok", check=_audio_check)


def case_rotated_phone_video(base, d, out):
    """Stored 160x128 with a 90° display matrix: the output is upright, 128 wide and 160 high."""
    video = helpers.make_face_video(d / "portrait.mp4", SECONDS, FPS, size=(128, 160), rotate=90)
    assert media.probe(video).rotation in (90, 270)

    def check(output, stdout, stderr):
        info = media.probe(output)
        assert (info.width, info.height, info.rotation) == (128, 160, 0)
        assert helpers.summary_counts(stderr) == (FPS, FPS, 0)  # upright faces: found in every frame
        assert helpers.psnr(np.stack(helpers.decode_frames(video)), np.stack(helpers.decode_frames(output))) > 38
    return Case([video, _copy(base["speech"], d), "-o", out / "o.mp4"], "ok", check=check)


def case_non_ascii_paths(base, d, out):
    folder = out / "résultats 脸"
    return Case([_copy(base["video"], d, "tëst_脸.mp4"), _copy(base["speech"], d, "声音 ü.wav"),
                 "-o", folder / "输出 ë.mp4"], "ok")


def case_read_only_output_folder(base, d, out):
    """As root the folder is still writable (either outcome); as a user it must be a one-line error."""
    locked = out / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return Case([_copy(base["video"], d), _copy(base["speech"], d), "-o", locked / "o.mp4"],
                "either" if os.geteuid() == 0 else "error", locked, code=2)


def case_output_folder_is_a_file(base, d, out):
    blocker = out / "not_a_folder"
    blocker.write_text("x")
    return Case([_copy(base["video"], d), _copy(base["speech"], d), "-o", blocker / "o.mp4"], "error", blocker,
                keep=[blocker], code=2)


def case_existing_output_without_overwrite(base, d, out):
    existing = out / "o.mp4"
    existing.write_bytes(b"an older result")
    return Case([_copy(base["video"], d), _copy(base["speech"], d), "-o", existing], "error", existing,
                keep=[existing], code=2)


def case_existing_output_with_overwrite(base, d, out):
    existing = out / "o.mp4"
    existing.write_bytes(b"an older result")
    return Case([_copy(base["video"], d), _copy(base["speech"], d), "-o", existing, "--overwrite"], "ok")


def case_output_equals_input(base, d, out):
    video = _copy(base["video"], d)
    return Case([video, _copy(base["speech"], d), "-o", video, "--overwrite"], "error", video, code=2)


def case_output_not_mp4(base, d, out):
    target = out / "o.mkv"
    return Case([_copy(base["video"], d), _copy(base["speech"], d), "-o", target], "error", target, code=2)


def case_unknown_backbone(base, d, out):
    return Case([_copy(base["video"], d), _copy(base["speech"], d), "-o", out / "o.mp4", "--backbone", "nosuch"],
                "error", backbone=None, code=2)


def case_missing_weights(base, d, out):
    missing = d / "nowhere" / "dck.pt"
    return Case([_copy(base["video"], d), _copy(base["speech"], d), "-o", out / "o.mp4", "--backbone", "dck",
                 "--weights", missing], "error", missing, backbone=None, code=2)


def case_corrupt_checkpoint(base, d, out):
    corrupt = d / "dck.pt"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(3000))  # looks like a zip, is not a checkpoint
    return Case([_copy(base["video"], d), _copy(base["speech"], d), "-o", out / "o.mp4", "--backbone", "dck",
                 "--weights", corrupt], "error", corrupt, backbone=None)


def case_foreign_checkpoint(base, d, out):
    import torch

    foreign = d / "model.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)  # a real torch file, not a dubber checkpoint
    return Case([_copy(base["video"], d), _copy(base["speech"], d), "-o", out / "o.mp4", "--backbone", "dck",
                 "--weights", foreign], "error", foreign, backbone=None)


def case_bad_face_box(base, d, out):
    return Case([_copy(base["video"], d), _copy(base["speech"], d), "-o", out / "o.mp4", "--face-box", "1,2,oops"],
                "error", code=2)


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def _leftovers(folder: Path, expected: List[Path]) -> List[Path]:
    """Files under `folder` other than `expected` (partial outputs, temporaries)."""
    expected = {p.resolve() for p in expected}
    return [p for p in folder.rglob("*") if p.is_file() and p.resolve() not in expected]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, base, tmp_path):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    case = CASES[name](base, in_dir, out_dir)
    args = ["lipsync", *case.args] + (["--backbone", case.backbone] if case.backbone else [])
    if not any(str(a) in ("-q", "--quiet") for a in args) and case.check is None:
        args.append("-q")
    before_in, before_out = helpers.tree_hashes(in_dir), helpers.tree_hashes(out_dir)
    try:
        code, stdout, stderr = helpers.run_cli(args)
    finally:
        for folder in out_dir.rglob("*"):
            if folder.is_dir():
                folder.chmod(0o755)
    lines = [line for line in stderr.splitlines() if line.strip()]
    output = Path(args[args.index("-o") + 1])
    outcome = "ok" if code == 0 else "error"
    print(f"{name}: exit {code}; " + (lines[-1] if outcome == "error" else f"wrote {output.name}"))

    assert "Traceback" not in stderr
    assert case.expect in (outcome, "either"), f"expected {case.expect}, got exit {code}: {stderr}"
    if outcome == "error":
        assert code == case.code, stderr  # 1: input error, 2: usage error (3 would be an internal error)
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        if case.names is not None:
            assert str(case.names) in lines[0]
        assert not output.exists() or output.resolve() in {p.resolve() for p in case.keep} | \
            {Path(a).resolve() for a in case.args if isinstance(a, Path) and a.parent == in_dir}
        assert helpers.tree_hashes(out_dir) == before_out  # nothing written, nothing changed
    else:
        assert stdout.strip() == str(output)
        info = media.probe(output)
        assert info.has_video and info.has_audio
        assert len(helpers.decode_frames(output)) == case.frames
        if case.check is not None:
            case.check(output, stdout, stderr)
        assert _leftovers(out_dir, [output] + case.keep) == []
    assert helpers.tree_hashes(in_dir) == before_in  # inputs untouched
    assert not [p for p in tmp_path.rglob("*partial*")]


@pytest.mark.slow
def test_a_crash_mid_run_leaves_no_partial_output(base, tmp_path):
    """The generator fails after frames were encoded: an internal error (exit 3) in one line, and the
    half-written temporary file is gone."""
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, stderr = helpers.run_cli(["lipsync", base["video"], base["speech"], "-o", out / "o.mp4",
                                            "--backbone", "crashing", "--batch-size", "8", "-q"])
    lines = [line for line in stderr.splitlines() if line.strip()]
    print(f"crash mid-run: exit {code}; {lines}")
    assert code == 3 and stdout == ""
    assert len(lines) == 1 and lines[0].startswith("error: internal error") and "simulated failure" in lines[0]
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# batches: one bad item among good ones


def _batch_check(code, stdout, stderr, good: List[str], bad: str, status_good: str):
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "1 of" in lines[0], stderr
    rows = {line.split("│")[1].strip(): line for line in stdout.splitlines() if line.count("│") >= 5}
    assert set(rows) >= set(good) | {bad}, stdout
    assert "failed" in rows[bad] and bad in rows[bad].split("│")[5]  # the detail names the file
    for name in good:
        assert status_good in rows[name], rows[name]


@pytest.mark.slow
def test_batch_folders_with_one_bad_item(base, tmp_path):
    faces, audios, out = tmp_path / "faces", tmp_path / "audio", tmp_path / "out"
    faces.mkdir(), audios.mkdir()
    for stem in ("a", "b"):
        _copy(base["video"], faces, f"{stem}.mp4")
        _copy(base["speech"], audios, f"{stem}.wav")
    (faces / "c.mp4").write_text("not a video")
    _copy(base["speech"], audios, "c.wav")
    before = helpers.tree_hashes(tmp_path)

    code, stdout, stderr = helpers.run_cli(["lipsync", faces, audios, "-o", out, "--backbone", "identity", "-q"])
    print(stdout)
    _batch_check(code, stdout, stderr, ["a.mp4", "b.mp4"], "c.mp4", "done")
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4"]  # no partial c.mp4
    for stem in ("a", "b"):
        assert len(helpers.decode_frames(out / f"{stem}.mp4")) == FPS
    finished = helpers.tree_hashes(out)

    # A rerun skips what is finished (outputs untouched) and tries the failed item again.
    code, stdout, stderr = helpers.run_cli(["lipsync", faces, audios, "-o", out, "--backbone", "identity", "-q"])
    _batch_check(code, stdout, stderr, ["a.mp4", "b.mp4"], "c.mp4", "skipped")
    assert helpers.tree_hashes(out) == finished
    assert {k: v for k, v in helpers.tree_hashes(tmp_path).items() if not k.startswith("out/")} == before


@pytest.mark.slow
def test_batch_manifest_with_one_bad_row(base, tmp_path):
    _copy(base["video"], tmp_path, "good.mp4")
    _copy(base["speech"], tmp_path, "good.wav")
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("face,audio,output\ngood.mp4,good.wav,first.mp4\nmissing.mp4,good.wav,second.mp4\n"
                        "good.mp4,good.wav,third.mp4\n")
    out = tmp_path / "out"
    before = helpers.tree_hashes(tmp_path)

    # Not quiet: the per-item log lines keep their [status] tag; a bar counts the items.
    code, stdout, stderr = helpers.run_cli(["lipsync", manifest, "-o", out, "--backbone", "identity"])
    assert "[done] good.mp4" in stderr and "[retry] missing.mp4" in stderr and "[failed] missing.mp4" in stderr
    bars = [line for line in stderr.splitlines() if line.strip().startswith("jobs ")]
    assert bars and bars[-1].split()[-2] == "3/3", stderr
    stderr = "\n".join(line for line in stderr.splitlines() if not line.startswith("[") and line not in bars)
    _batch_check(code, stdout, stderr, ["good.mp4"], "missing.mp4", "done")
    assert sorted(p.name for p in out.iterdir()) == ["first.mp4", "third.mp4"]

    code, stdout, stderr = helpers.run_cli(["lipsync", manifest, "-o", out, "--backbone", "identity", "-q"])
    _batch_check(code, stdout, stderr, ["good.mp4"], "missing.mp4", "skipped")
    assert {k: v for k, v in helpers.tree_hashes(tmp_path).items() if not k.startswith("out/")} == before


# ---------------------------------------------------------------------------------------------
# the real console script: one line on stderr, nothing from libraries, no traceback


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nonexistent_face", "text_renamed_mp4", "corrupt_checkpoint"])
def test_bad_input_in_a_real_process(name, base, tmp_path):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir(), out_dir.mkdir()
    case = CASES[name](base, in_dir, out_dir)
    # The console script knows only the real backbones: these cases run with dck and its shipped
    # weights (a missing --weights would be reported first, as a usage error, before any input is read).
    args = ["lipsync", *case.args, "-q"]
    code, stdout, stderr = helpers.run_cli_subprocess(args)
    lines = [line for line in stderr.splitlines() if line.strip()]
    print(f"{name} (subprocess): exit {code}; {lines}")
    assert code == 1 and stdout == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(case.names) in lines[0], stderr
    assert list(out_dir.iterdir()) == []
