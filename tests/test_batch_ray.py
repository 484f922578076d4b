"""Batches and their shared rules (dubber.batch.run_jobs) and batches on Ray (dubber.batch_ray).

The Ray test starts a local Ray with 2 CPUs itself and runs the real CLI on it (`--ray auto`: the
CLI keeps the connection this process has): one corrupt input, and one job whose worker process
dies on its first attempt, in the middle of writing its output. The outputs must be the local
batch's, byte for byte.
"""

import json
import os
import socket
from pathlib import Path

import pytest

import helpers
from dubber import batch, batch_ray, media
from dubber.batch import Job, JobResult

DIES = "dies"  # the job whose Ray worker dies on its first attempt
DIED_MARKER = "DUBBER_TEST_DIED_MARKER"  # test only: the file that records that it died once
LENGTHS = {"a": 0.4, "b": 0.56, DIES: 0.48}  # seconds of speech (so frames of output) per job
CORRUPT = "corrupt"


# ---------------------------------------------------------------------------------------------
# the rules every runner shares


def _runner(outcomes):
    """submit/finished for run_jobs that run a job in place: outcomes[name] lists its attempts' statuses."""
    tries = {}

    def submit(job):
        return object()

    def finished(running):
        for handle, job in running.items():
            tries[job.face.name] = tries.get(job.face.name, 0) + 1
            status = outcomes[job.face.name][tries[job.face.name] - 1]
            yield handle, JobResult(job, status, f"attempt {tries[job.face.name]}")
    return submit, finished, tries


def test_run_jobs_skips_finished_outputs_and_retries_a_failure_once(tmp_path):
    jobs = [Job(Path(name), Path("a.wav"), tmp_path / f"{name}.mp4") for name in ("ok", "flaky", "bad", "old")]
    (tmp_path / "old.mp4").write_bytes(b"finished earlier")
    stale = tmp_path / ".flaky.abcd_123.partial.mp4"  # left by a killed run
    other = tmp_path / ".flaky2.abcd_123.partial.mp4"  # another output's: kept
    stale.write_bytes(b""), other.write_bytes(b"")
    submit, finished, tries = _runner({"ok": ["done"], "flaky": ["failed", "done"], "bad": ["failed", "failed"]})
    seen, retried = [], []
    results = batch.run_jobs(jobs, False, submit, finished, seen.append, retried.append)

    by_name = {r.job.face.name: r for r in results}
    assert [r.job.face.name for r in seen] == ["old", "ok", "flaky", "bad"]  # as they come
    assert [r.job for r in results] == jobs  # in the order of the plan
    assert (by_name["old"].status, by_name["old"].attempts) == ("skipped", 0)
    assert (by_name["ok"].status, by_name["ok"].attempts) == ("done", 1)
    assert (by_name["flaky"].status, by_name["flaky"].attempts, by_name["flaky"].message) == ("done", 2, "attempt 2")
    assert (by_name["bad"].status, by_name["bad"].attempts) == ("failed", 2)
    assert tries == {"ok": 1, "flaky": 2, "bad": 2}  # retried once, never more
    assert [r.job.face.name for r in retried] == ["flaky", "bad"]
    assert not stale.exists() and other.exists()


def test_a_temporary_written_after_its_worker_died_is_removed_when_the_batch_ends(tmp_path):
    """A dead worker's encoder finishes its temporary on its own time: here after the failure was
    reported and its retry had begun."""
    jobs = [Job(Path("dies"), Path("a.wav"), tmp_path / "dies.mp4")]
    late = tmp_path / ".dies.orphan_1.partial.mp4"
    submit, finished_in_place, _ = _runner({"dies": ["failed", "done"]})

    def finished(running):
        for handle, result in finished_in_place(running):
            if result.status == "done":
                late.write_bytes(b"the first attempt's last frames")  # while the retry runs
            yield handle, result

    results = batch.run_jobs(jobs, False, submit, finished)
    assert [(r.status, r.attempts) for r in results] == [("done", 2)]
    assert not late.exists()


def test_remove_partials_takes_only_the_given_outputs_temporaries(tmp_path):
    with media.atomic_output(tmp_path / "x.y.mp4") as tmp:
        tmp.write_bytes(b"half")
        kept = [tmp_path / ".x.abcdefgh.partial.mp4", tmp_path / ".x.y.abcdefgh.partial.wav", tmp_path / "x.y.mp4"]
        for path in kept:
            path.write_bytes(b"")
        media.remove_partials([tmp_path / "x.y.mp4", tmp_path / "missing" / "z.mp4"])
        assert not tmp.exists() and all(p.exists() for p in kept)
        tmp.write_bytes(b"")  # atomic_output renames it when the block ends


# ---------------------------------------------------------------------------------------------
# the --ray options


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Tiny inputs made once: a folder of faces with one audio file per face (paired by stem)."""
    root = tmp_path_factory.mktemp("ray_batch")
    faces, audios = root / "faces", root / "audios"
    faces.mkdir(), audios.mkdir()
    video = helpers.make_face_video(root / "face.mp4", 0.6, 25)
    for name, seconds in LENGTHS.items():
        (faces / f"{name}.mp4").write_bytes(video.read_bytes())
        helpers.make_tone_speech(audios / f"{name}.wav", seconds)
    (faces / f"{CORRUPT}.mp4").write_text("not a video")
    helpers.make_tone_speech(audios / f"{CORRUPT}.wav", 0.4)
    return {"faces": faces, "audios": audios, "video": video}


@pytest.mark.parametrize("extra, words", [
    (["--ray-cpus", "2"], "--ray-cpus 2: applies with --ray"),
    (["--ray", "local", "--jobs", "2"], "--jobs 2: does not apply with --ray"),
    (["--ray", "local:x"], "--ray local:x: must be local"),
    (["--ray", "local", "--ray-cpus", "0"], "--ray-cpus 0: must be greater than 0"),
    (["--ray", "local", "--ray-gpus", "1", "--device", "cpu"], "--ray-gpus 1: reserves GPUs that --device cpu"),
    (["--ray", "local", "--half"], "--half with --ray-gpus 0: fp16 needs a GPU"),
])
def test_ray_options_are_checked_before_any_work(small, tmp_path, extra, words):
    out = tmp_path / "out"
    code, stdout, stderr = helpers.run_cli(["lipsync", small["faces"], small["audios"], "-o", out, *extra, "-q"])
    assert code == 2 and stderr.strip().startswith(f"error: {words}"), stderr
    assert stdout == "" and not out.exists()


def test_ray_address_where_nothing_answers(small, tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    code, stdout, stderr = helpers.run_cli(["lipsync", small["faces"], small["audios"], "-o", out, "--ray",
                                            f"127.0.0.1:{port}", "-q"])
    assert code == 2 and stderr.strip().startswith(f"error: --ray 127.0.0.1:{port}: nothing answers there"), stderr
    assert stdout == "" and not out.exists()


def test_ray_needs_a_batch_and_says_how_to_install_ray(small, tmp_path, monkeypatch):
    out = tmp_path / "o.mp4"
    code, _, stderr = helpers.run_cli(["lipsync", small["video"], small["audios"] / "a.wav", "-o", out, "--ray",
                                       "local", "-q"])
    assert code == 2 and "--ray local: runs batches" in stderr
    monkeypatch.setattr(batch_ray, "available", lambda: False)
    code, _, stderr = helpers.run_cli(["lipsync", small["faces"], small["audios"], "-o", tmp_path, "--ray", "auto"])
    assert code == 2 and stderr.strip() == "error: --ray auto: needs Ray, which is not installed: " \
                                           "pip install 'dubber[ray]'"


# ---------------------------------------------------------------------------------------------
# a batch on Ray: a corrupt input, a worker that dies, the local batch's results


def _dying_worker_setup():
    """Ray's worker setup hook in the test (runs in each worker process): registers the test
    backbones (importing this module imports helpers) and makes the DIES job's worker process exit
    (os._exit, as a crash or the OOM killer would end it) after its first frame is written, once."""
    import dubber.batch

    real = dubber.batch.lipsync

    def lipsync(face, audio, output, options, progress=None):
        marker = Path(os.environ[DIED_MARKER])

        def hook(stage, advance, total):
            if face.stem == DIES and stage == "lip sync" and advance and not marker.exists():
                marker.touch()
                os._exit(1)
        return real(face, audio, output, options, hook)

    dubber.batch.lipsync = lipsync


def _rows(stdout):
    return {Path(row["face"]).stem: row for row in json.loads(stdout)}


@pytest.mark.slow
def test_a_batch_on_ray_matches_the_local_batch(small, tmp_path):
    ray = pytest.importorskip("ray")
    local_out, ray_out, marker = tmp_path / "local", tmp_path / "ray", tmp_path / "died"
    args = ["lipsync", small["faces"], small["audios"], "--backbone", "identity", "--json"]
    code, stdout, stderr = helpers.run_cli(args + ["-o", local_out, "-q"])
    assert code == 1 and stderr.strip() == "error: 1 of 4 items failed", stderr
    local = _rows(stdout)
    assert {k: (r["status"], r["attempts"]) for k, r in local.items()} == {
        "a": ("done", 1), "b": ("done", 1), DIES: ("done", 1), CORRUPT: ("failed", 2)}

    paths = os.pathsep.join([str(helpers.TESTS), str(helpers.REPO), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=batch_ray.LOCAL_OBJECT_STORE_BYTES,
             runtime_env={"env_vars": {"PYTHONPATH": paths, DIED_MARKER: str(marker), "OMP_NUM_THREADS": "1"},
                          "worker_process_setup_hook": _dying_worker_setup})
    try:
        code, stdout, stderr = helpers.run_cli(args + ["-o", ray_out, "--ray", "auto"])
        finished = helpers.tree_hashes(ray_out)
        again = helpers.run_cli(args + ["-o", ray_out, "--ray", "auto", "-q"])
    finally:
        ray.shutdown()
    print(stderr)
    assert code == 1 and stderr.strip().endswith("error: 1 of 4 items failed"), stderr
    assert marker.exists() and f"[retry] {DIES}.mp4: " in stderr and "its Ray worker died" in stderr
    rows = _rows(stdout)  # JSON only: Ray's own report of the dead worker went to stderr
    assert {k: (r["status"], r["attempts"]) for k, r in rows.items()} == {
        "a": ("done", 1), "b": ("done", 1), DIES: ("done", 2), CORRUPT: ("failed", 2)}
    assert rows[CORRUPT]["detail"] == local[CORRUPT]["detail"] and CORRUPT in rows[CORRUPT]["detail"]
    for name in LENGTHS:
        assert rows[name]["detail"] == local[name]["detail"]  # frames, frames without a face
        assert len(helpers.decode_frames(ray_out / f"{name}.mp4")) == round(LENGTHS[name] * 25)
    # The same files, byte for byte: the encoder is deterministic for the same frames and settings.
    assert sorted(os.listdir(ray_out)) == sorted(os.listdir(local_out)) == [f"{n}.mp4" for n in sorted(LENGTHS)]
    assert finished == helpers.tree_hashes(local_out)

    # A rerun skips every finished output (untouched) and tries the corrupt input again.
    code, stdout, stderr = again
    assert code == 1 and stderr.strip() == "error: 1 of 4 items failed", stderr
    assert {k: (r["status"], r["attempts"]) for k, r in _rows(stdout).items()} == {
        "a": ("skipped", 0), "b": ("skipped", 0), DIES: ("skipped", 0), CORRUPT: ("failed", 2)}
    assert helpers.tree_hashes(ray_out) == finished
