"""Run a backbone over a stream of frames: the one runner lipsync, blend, eval and training-time
validation share (as demucs keeps chunked, overlapped inference apart from its models).

The stream is cut into runs of consecutive frames with a face; frames without one pass through
unchanged. Within a run the backbone sees contiguous windows of `window` frames, starting every
`window - overlap` frames; frames two windows share are cross-faded (linear ramps), the tail of a
run is padded with its last frame and trimmed, and a stateful backbone's state is carried from
window to window and reset at every gap. Stateless backbones get several windows per call.
Memory is bounded by one call's frames whatever the length of the stream.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, List, Optional, Tuple

import numpy as np

if TYPE_CHECKING:  # torch is imported when a Generator is built, not when the CLI starts
    from dubber.backbones.base import Backbone

BATCH_FRAMES = 16  # frames per backbone call (stateless backbones: whole windows up to this many)


@dataclass
class Step:
    """One frame of the stream: crop uint8 BGR [S, S, 3] or None (no face: passes through), its
    mel window [80, W], and a payload the runner hands back untouched (the frame, its transform...)."""

    crop: Optional[np.ndarray]
    mel: np.ndarray
    payload: Any = None


def crossfade_weights(window: int, overlap: int) -> np.ndarray:
    """[window] weights: linear ramps over the first and last `overlap` frames, 1 between.

    Where two windows overlap their ramps sum to a constant, so the blend is a plain cross-fade."""
    k = np.arange(window, dtype=np.float32)
    ramp = np.minimum(k + 1, window - k) / (overlap + 1)
    return np.minimum(ramp, 1.0).astype(np.float32)


class Generator:
    """A backbone on its device, turning uint8 crop windows into new crops."""

    def __init__(self, backbone: "Backbone", device, precision: str = "fp32", channels_last: bool = False):
        """precision (dubber.options.precision): "fp32"; "fp16", the model converted (CUDA); or
        "bf16", autocast: convolutions and matrix products in bfloat16, the rest in fp32 (pure bf16
        weights moved DCK's output 5x further from fp32's for 13 % less time)."""
        import torch

        self.backbone = backbone
        self.device = device
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.autocast_bf16 = precision == "bf16"
        self.backbone.to(device=device, dtype=self.dtype).eval()
        # NHWC is a layout of 4-D tensors: a model with 3-D convolutions (Glance's 5-D kernels) keeps its own
        flat = all(p.dim() <= 4 for p in self.backbone.parameters())
        if channels_last and device.type == "cpu" and flat:  # NHWC convolutions: DCK 107 -> 117 frames/s with 2
            # threads, 21 -> 25 with 1 (batch 16), the same numbers to 4e-6; a model in training keeps its layout
            self.backbone.to(memory_format=torch.channels_last)
        self.seconds = 0.0

    def __call__(self, crops: np.ndarray, mels: np.ndarray, identity: Optional[np.ndarray] = None,
                 state: Any = None) -> Tuple[np.ndarray, Any]:
        """crops uint8 BGR [B, T, S, S, 3]; mels [B, T, 80, W]; identity uint8 BGR [S, S, 3] or None
        -> (float32 BGR [B, T, S, S, 3] in [0, 255], state). A backbone's α is already applied. A
        returns_points backbone (which never sees the crops) gives its points [B, T, 20, 2] instead."""
        import torch

        start = time.perf_counter()
        points = self.backbone.returns_points
        # autocast is per thread: entered here, in the thread that runs the model
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast_bf16):
            faces = None if points else self._tensor(crops)
            mel = torch.from_numpy(np.ascontiguousarray(mels[:, :, None])).to(device=self.device, dtype=self.dtype)
            reference = None if identity is None else self._tensor(identity[None, None])[:, 0].expand(len(crops), -1, -1, -1)
            out = self.backbone(faces, mel, reference, state)
            if points:
                result = out.points.detach().float().cpu().numpy()
            else:
                images = out.images.detach().float().clamp(0, 1).mul(255).cpu().numpy()
                result = np.ascontiguousarray(images.transpose(0, 1, 3, 4, 2)[..., ::-1])
        self.seconds += time.perf_counter() - start
        return result, out.state

    def _tensor(self, crops: np.ndarray):
        """uint8 BGR [B, T, S, S, 3] -> float [B, T, 3, S, S] RGB in [0, 1] on the device."""
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1]))
        return batch.to(self.device).permute(0, 1, 4, 2, 3).to(self.dtype).div(255)


class _Run:
    """The frames of one face run not yet handed back, with their accumulated outputs."""

    def __init__(self):
        self.steps: List[Step] = []
        self.sums: List[Optional[np.ndarray]] = []
        self.weights: List[float] = []
        self.first = 0  # run index of steps[0]
        self.next_start = 0  # run index where the next window starts
        self.state: Any = None

    def __len__(self) -> int:
        return self.first + len(self.steps)


def apply_backbone(generator: Generator, steps: Iterable[Step], identity: Optional[np.ndarray] = None,
                   batch_frames: int = BATCH_FRAMES) -> Iterator[Tuple[Any, Optional[np.ndarray], Optional[np.ndarray]]]:
    """Yield (payload, crop, generated uint8 BGR [S, S, 3]) for every step in order; crop and
    generated are None for frames without a face; a returns_points backbone's generated is its
    float32 points [20, 2]. identity: the backbone's identity crop (one per
    video, dubber.conditioning) or None.

    A stateless backbone's call runs on a worker thread while the caller's loop goes on (the
    next frames decoded and cropped, the previous ones pasted and encoded): one call in flight at
    a time, so memory stays at two calls' frames. Torch releases the GIL while it computes. A
    stateful backbone needs each call's state for the next, so its calls run in turn.
    """
    backbone = generator.backbone
    window, stride = backbone.window, backbone.window - backbone.overlap
    fade = crossfade_weights(window, backbone.overlap)
    windows_per_call = 1 if backbone.stateful else max(1, batch_frames // window)
    run = _Run()

    def submit(starts: List[int]):
        """Start the windows beginning at these run indices (padding past the run's end) on the
        worker; -> the call's record for `collect`."""
        last = len(run) - 1
        index = [[min(s + k, last) for k in range(window)] for s in starts]  # run indices, not list positions:
        crops = np.stack([[run.steps[i - run.first].crop for i in row] for row in index])  # frames may be
        mels = np.stack([[run.steps[i - run.first].mel for i in row] for row in index])  # released meanwhile
        future = worker.submit(generator, crops, mels, identity, run.state if backbone.stateful else None)
        run.next_start = starts[-1] + stride
        return index, starts, last, future

    def collect(call) -> int:
        """Wait for a call and accumulate its outputs; -> run index before which every frame is
        final (no later window covers it)."""
        index, starts, last, future = call
        images, run.state = future.result()
        for row, start, frames in zip(index, starts, images):
            for k, image in enumerate(frames):
                if start + k > last:
                    break  # padding: trimmed
                i = row[k] - run.first
                run.sums[i] = fade[k] * image if run.sums[i] is None else run.sums[i] + fade[k] * image
                run.weights[i] += float(fade[k])
        return starts[-1] + stride

    def release(upto: int):
        """Hand back the frames before run index `upto`."""
        count = upto - run.first
        for step, total, weight in zip(run.steps[:count], run.sums[:count], run.weights[:count]):
            generated = total / weight if backbone.returns_points else np.clip(np.round(total / weight), 0, 255).astype(np.uint8)
            yield step.payload, step.crop, generated
        del run.steps[:count], run.sums[:count], run.weights[:count]
        run.first = upto

    in_flight = None  # the stateless call running while the loop goes on

    def finish():
        nonlocal run, in_flight
        if in_flight is not None:
            collect(in_flight)
            in_flight = None
        while run.next_start < len(run) - (window - stride) or run.next_start == 0 and len(run):
            starts = [run.next_start + j * stride for j in range(windows_per_call)]
            collect(submit([s for s in starts if s == starts[0] or s < len(run) - (window - stride)]))
        yield from release(len(run))
        run = _Run()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dubber-model") as worker:
        for step in steps:
            if step.crop is None:
                yield from finish()
                yield step.payload, None, None
                continue
            run.steps.append(step)
            run.sums.append(None)
            run.weights.append(0.0)
            ready = run.next_start + (windows_per_call - 1) * stride + window
            if len(run) >= ready:
                call = submit([run.next_start + j * stride for j in range(windows_per_call)])
                if backbone.stateful:  # the next call needs this one's state
                    yield from release(collect(call))
                else:
                    previous, in_flight = in_flight, call
                    if previous is not None:
                        yield from release(collect(previous))
        yield from finish()
