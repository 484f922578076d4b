"""Offsets of training clips measured with the expert (dubber.train.offsets): own offset for long
confident clips, the identity's pooled offset for short ones, none when nothing is confident."""

import numpy as np

import helpers
from dubber.train.offsets import MIN_OWN_WINDOWS, measure_offsets, read_table, write_table


def clock_clip(name, identity, frames, mouth_lag, speech=True):
    """Frame t shows the mouth of audio frame t - mouth_lag (values cycle so short clips stay unambiguous)."""
    value = (np.arange(frames) - mouth_lag) % 60 + 20
    faces = np.repeat(value.astype(np.uint8), 96 * 96 * 3).reshape(frames, 96, 96, 3)
    mels = np.repeat((np.arange(frames) % 60 + 20).astype(np.float32), 80 * 16).reshape(frames, 80, 16)
    return {"name": f"{name}#0", "identity": identity, "crops": {"face96": faces}, "mels": mels,
            "speech": np.full(frames, speech)}


def test_own_pooled_and_unknown_offsets(tmp_path):
    long_frames = MIN_OWN_WINDOWS + 40
    clips = [clock_clip("long", "anna", long_frames, 3),  # its own curve decides
             clock_clip("short1", "bert", 30, -2), clock_clip("short2", "bert", 30, -2),  # pooled
             clock_clip("quiet", "carl", 40, 4, speech=False)]  # no speech: nothing to measure
    files = {"long": "wild/long.mp4", "short1": "wild/short1.mp4", "short2": "wild/short2.mp4", "quiet": "wild/quiet.mp4"}
    rows = {row["file"]: row for row in measure_offsets(clips, helpers.ClockExpert(), files, log=lambda m: None)}
    assert (rows["wild/long.mp4"]["lag"], rows["wild/long.mp4"]["source"]) == (3, "clip")
    assert (rows["wild/short1.mp4"]["lag"], rows["wild/short1.mp4"]["source"]) == (-2, "identity")
    assert rows["wild/short1.mp4"]["clip_offset"] == -2  # measured, but too few windows to trust alone
    assert (rows["wild/quiet.mp4"]["lag"], rows["wild/quiet.mp4"]["source"]) == (None, "unknown")
    table = tmp_path / "offsets.csv"
    write_table(list(rows.values()), table)
    assert read_table(table) == {"wild/long.mp4": 3, "wild/short1.mp4": -2, "wild/short2.mp4": -2, "wild/quiet.mp4": None}


def test_corpus_takes_lags_from_the_table_and_splits_val_identities(tmp_path):
    from dubber import data

    (tmp_path / "wild").mkdir()
    rows = ["file,audio,audio_silent,split,sync_lag_est,sync_peak_est,note"]
    for k in range(3):
        rows.append(f"wild/t{k}.mp4,yes,no,train,1,0.5,id=trainee{k}")
    for k, name in enumerate(("vera", "walt", "xena", "yuri")):
        rows.append(f"wild/v{k}.mp4,yes,no,val,0,0.1,id={name}")
    (tmp_path / "manifest_wild.csv").write_text("\n".join(rows) + "\n")
    table = {"wild/t0.mp4": -3, "wild/t1.mp4": None}  # t2: not measured, the manifest's estimate stands
    train = {item["path"].name: item["lag"] for item in data.corpus(tmp_path, "train", offsets=table)}
    assert train == {"t0.mp4": -3, "t2.mp4": 1}  # t1's offset is unknown: not trained on
    select = {item["identity"] for item in data.corpus(tmp_path, "val_select")}
    test = {item["identity"] for item in data.corpus(tmp_path, "val_test")}
    assert select == {"vera", "xena"} and test == {"walt", "yuri"}  # alternately, by name; never both
