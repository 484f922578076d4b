"""The lip reader (dubber.backbones.lipreader) and its recipe: GRID's 51 words, words resampled to
a fixed length, samples only where an alignment gives words, training through the one loop (it
learns words that look different apart), the selected file loading back, and `dubber eval`'s
word accuracy on a real GRID clip."""

import numpy as np
import torch

from dubber.backbones import load
from dubber.backbones.lipreader import GRID_WORDS, MOUTH_CROP, WORD_FRAMES, LipReader, word_frames
from dubber.train.loop import train
from dubber.train.recipes import recipe_for
from dubber.train.recipes.lipreader import word_accuracy

torch.set_num_threads(1)
KEY = MOUTH_CROP.key
SIZE = MOUTH_CROP.size


def worded_clip(seed: int, words=("bin", "red", "soon", "bin", "red", "soon")) -> dict:
    """Lips crops where each word has a look of its own (a dark mouth of a height per word, opening
    over the word), with the alignment's words as frame ranges: what dubber.data gives a GRID clip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    heights = {"bin": 0.05, "red": 0.15, "soon": 0.3}
    spans, frames, t = [], [], 0
    for word in words:
        length = int(rng.integers(4, 9))
        for k in range(length):
            image = np.full((SIZE, SIZE, 3), rng.uniform(120, 200), np.float32)
            height = heights[word] * (0.5 + 0.5 * k / length)
            image[(((xx - 0.5) / 0.3) ** 2 + ((yy - 0.5) / height) ** 2) < 1] = (40, 10, 20)
            frames.append(image.astype(np.uint8))
        spans.append((t, t + length, word))
        t += length
    count = len(frames)
    return {"crops": {KEY: np.stack(frames)}, "mels": np.zeros((count, 80, 16), np.float32), "identity": "grid_s1",
            "name": f"w{seed}", "speech": np.ones(count, bool), "landmarks": np.zeros((count, 68, 2), np.float32),
            "transforms": {KEY: np.tile(np.eye(2, 3, dtype=np.float32), (count, 1, 1))}, "words": spans}


def test_vocabulary_and_word_frames():
    assert len(GRID_WORDS) == 51 and "w" not in GRID_WORDS and {"bin", "zero", "please", "z"} <= set(GRID_WORDS)
    short = word_frames(10, 13)  # a 3-frame word stretched: every frame kept, in order
    assert len(short) == WORD_FRAMES and set(short.tolist()) == {10, 11, 12} and np.all(np.diff(short) >= 0)
    frames = word_frames(10, 30)
    assert len(frames) == WORD_FRAMES and frames[0] == 10 and frames[-1] == 29 and np.all(np.diff(frames) >= 0)
    assert LipReader()(torch.rand(2, WORD_FRAMES, 1, SIZE, SIZE)).shape == (2, 51)


def test_only_aligned_words_are_samples():
    recipe = recipe_for("lipreader")
    clip = worded_clip(0)
    assert recipe.anchors(clip).tolist() == [first for first, _, _ in clip["words"]]
    assert len(recipe.anchors({"mels": np.zeros((30, 80, 16))})) == 0  # a wild clip: no words


def test_training_reads_words_that_look_apart(tmp_path):
    clips = [worded_clip(seed) for seed in range(4)]
    recipe = recipe_for("lipreader", batch_size=12, lr=3e-3)
    out = tmp_path / "lipreader.pt"
    history = train(recipe, clips, out, 40, val_clips=[worded_clip(9)], val_every=20, log_every=20, log=lambda m: None)
    losses = [h["ce"] for h in history if "ce" in h]
    accuracies = [h["val_word_accuracy"] for h in history if "val_word_accuracy" in h]
    assert losses[-1] < 0.7 * losses[0] and len(accuracies) == 2, history
    model = load("lipreader", out)
    assert model.meta["recipe"]["batch_size"] == 12
    assert word_accuracy(model, [worded_clip(9)], torch.device("cpu")) >= 2 / 3


def test_no_words_no_accuracy():
    assert word_accuracy(LipReader(), [{"crops": {KEY: np.zeros((5, SIZE, SIZE, 3), np.uint8)}}], "cpu") == 0.0


def test_the_shipped_lip_reader_loads_and_says_what_trained_it():
    model = load("lipreader")
    assert model.vocabulary == GRID_WORDS and not model.training
    assert model.meta["selected_step"] == 500 and model.meta["validation"]["val_word_accuracy"] > 0.6
    assert model(torch.rand(1, WORD_FRAMES, 1, SIZE, SIZE)).shape == (1, 51)


def test_eval_reads_the_words_of_a_grid_clip(grid_clip, tmp_path):
    """`dubber eval`'s word_accuracy on GRID: the shipped lip reader reads most of a real clip's
    words (the lips cut from the frames at the clip's landmarks) and hardly any on a still frame."""
    from dubber.eval.run import Clip, Evaluator

    rows = {r["system"]: r for r in Evaluator([]).score_clip(Clip(grid_clip, grid_clip.stem), tmp_path)}
    assert rows["ground_truth"]["word_accuracy"] >= 0.5 > 0.2 >= rows["static_frame"]["word_accuracy"]
