"""Identity-balanced sampling, the one sampler every recipe draws from.

One speaker (GRID s1) owns most of the frames of ../shared/data: drawing clips or frames uniformly
would teach his face. An identity is drawn with probability proportional to (its usable anchor
frames) ** power -- 0 draws identities uniformly, 1 frames uniformly, 0.5 in between -- then one
of its clips uniformly, then an anchor frame of that clip uniformly. A recipe says which frames
are anchors (every frame a window fits at, or only frames with speech).
"""

from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from dubber.errors import DubberError

Clip = Dict[str, object]


class IdentitySampler:
    """anchors(clip) -> int array of frames a sample may be built around (empty: clip unusable)."""

    def __init__(self, clips: Sequence[Clip], anchors: Callable[[Clip], np.ndarray], power: float):
        self.clips = list(clips)
        self.anchors = [np.asarray(anchors(clip), np.int64) for clip in self.clips]
        by_identity: Dict[str, List[int]] = defaultdict(list)
        for index, frames in enumerate(self.anchors):
            if frames.size:
                by_identity[str(self.clips[index]["identity"])].append(index)
        if not by_identity:
            raise DubberError("no training clip has a usable frame (too short, or no speech)")
        self.identities = sorted(by_identity)
        self.by_identity = dict(by_identity)
        counts = np.array([sum(self.anchors[i].size for i in self.by_identity[name]) for name in self.identities], float)
        weights = counts ** power
        self.probability = weights / weights.sum()
        self.skipped = len(self.clips) - sum(len(group) for group in self.by_identity.values())

    def draw(self, rng: np.random.Generator) -> Tuple[int, int]:
        """-> (clip index, anchor frame)."""
        identity = self.identities[rng.choice(len(self.identities), p=self.probability)]
        pool = self.by_identity[identity]
        clip = pool[rng.integers(len(pool))]
        frames = self.anchors[clip]
        return clip, int(frames[rng.integers(frames.size)])

    def describe(self) -> Dict[str, object]:
        used = [i for group in self.by_identity.values() for i in group]
        return {
            "clips": len(used),
            "identities": len(self.identities),
            "frames": int(sum(len(self.clips[i]["mels"]) for i in used)),
            "skipped_clips": self.skipped,
        }


def distant_frame(length: int, start: int, span: int, gap: int, rng: np.random.Generator) -> int:
    """A random frame of a clip of `length` frames at least `gap` frames from each of frames start ..
    start + span - 1: a sample's identity face, never one of the frames it is asked to generate (that
    frame's mouth would be the answer). `sequence_anchors` gives the starts where one exists."""
    frames = np.arange(length)
    candidates = np.flatnonzero((frames <= start - gap) | (frames >= start + span - 1 + gap))
    return int(candidates[rng.integers(candidates.size)])


def sequence_anchors(length: int, span: int, gap: int) -> np.ndarray:
    """Starts of runs of `span` frames in a clip of `length` frames, when every run leaves a
    distant_frame `gap` frames away (length >= span + 2 * gap - 1); none otherwise."""
    if length < span + 2 * gap - 1:
        return np.zeros(0, int)
    return np.arange(length - span + 1)
