"""Acceptance: with a backbone that changes nothing, the pipeline gives back its input.

The identity backbone returns the crops it is given, so whatever the pipeline does (decode,
track, align, crop, batch, paste back, encode) must reproduce the input frames: PSNR >= 40 dB over
the face (the track's box) and over the whole frame, on a made video with head motion and on a real
GRID clip. A backbone that rolls the lower half of each crop must change the frame only under the
paste-back mask.
"""

import numpy as np
import pytest

import helpers
from dubber import media
from dubber.blend import lower_face_mask
from dubber.face.align import crop_transforms, inverse_affine, transform_points
from dubber.pipeline import LipsyncOptions, analyse, lipsync, pingpong
from dubber.backbones import CROP_BOX

MIN_PSNR = 40.0


def _roundtrip(source, output, args=(), backbone="identity"):
    """Dub `source` with its own audio through the CLI; return (input frames, output frames in input order, track)."""
    code, out, err = helpers.run_cli(["lipsync", source, source, "-o", output, "--backbone", backbone, "-q", *args])
    assert code == 0, err
    assert out.strip() == str(output)
    frames_in = helpers.decode_frames(source)
    frames_out = helpers.decode_frames(output)
    # The source's own audio decodes a little longer than its video (AAC padding): the extra output
    # frames replay the source backwards, so compare each output frame with the frame it came from.
    order = pingpong(len(frames_out), len(frames_in))
    track = analyse(source).track
    return np.stack([frames_in[i] for i in order]), np.stack(frames_out), track.boxes[order], order


def _report(name, frames_in, frames_out, boxes):
    """PSNR figures of one run: over all frames and per frame, whole frame and the track's face box."""
    per_frame = [helpers.psnr(a, b) for a, b in zip(frames_in, frames_out)]
    face = [helpers.psnr(a, b, box) for a, b, box in zip(frames_in, frames_out, boxes) if not np.isnan(box[0])]
    figures = dict(frames=len(frames_out), faces=len(face), whole=helpers.psnr(frames_in, frames_out),
                   whole_min=min(per_frame), face=helpers.psnr_boxes(frames_in, frames_out, boxes),
                   face_min=min(face))
    print(f"{name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    return figures


def _check(figures):
    # The acceptance figure is over the whole clip; single frames (P-frames after a detailed I-frame)
    # may dip a little below it, but none may be broken.
    assert figures["face"] >= MIN_PSNR and figures["whole"] >= MIN_PSNR
    assert figures["face_min"] >= MIN_PSNR - 5 and figures["whole_min"] >= MIN_PSNR - 5


@pytest.fixture(scope="module")
def motion_video(media_dir):
    """256x192 (the face ~80 px), 2 s, 25 fps, head motion, own AAC audio. At 160x128 the made face
    is so detailed per pixel that re-encoding alone (at the default CRF, without dubber) costs ~39 dB;
    test_identity_output_is_a_plain_reencode covers that size, bit for bit."""
    return helpers.make_face_video(media_dir / "face_motion_256.mp4", seconds=2.0, fps=25, size=(256, 192), audio=True)


@pytest.mark.slow
def test_identity_roundtrip_on_made_video_with_head_motion(motion_video, tmp_path):
    frames_in, frames_out, boxes, order = _roundtrip(motion_video, tmp_path / "out.mp4")
    assert len(frames_out) >= 50
    figures = _report("made video, head motion", frames_in, frames_out, boxes)
    assert figures["faces"] == len(frames_out)  # the face is tracked through the motion in every frame
    _check(figures)
    marks = [helpers.read_marker(f) for f in frames_out]
    assert marks == order.tolist()  # and every frame is where it belongs


@pytest.mark.slow
def test_identity_roundtrip_on_real_grid_clip(grid_clip, tmp_path):
    frames_in, frames_out, boxes, _ = _roundtrip(grid_clip, tmp_path / "grid.mp4")
    info_in, info_out = media.probe(grid_clip), media.probe(tmp_path / "grid.mp4")
    assert (info_out.width, info_out.height) == (info_in.width, info_in.height)
    assert info_out.has_audio
    figures = _report(f"GRID {grid_clip.name}", frames_in, frames_out, boxes)
    assert figures["faces"] >= 0.9 * len(frames_out)
    _check(figures)


@pytest.mark.slow
def test_identity_output_is_a_plain_reencode(face_video_silent, speech_1s, tmp_path):
    """What the identity pipeline loses is the H.264 encode and nothing else: its output decodes to
    exactly what encoding the input's frames directly with the same writer gives."""
    output = tmp_path / "identity.mp4"
    code, _, err = helpers.run_cli(["lipsync", face_video_silent, speech_1s, "-o", output, "--backbone", "identity", "-q"])
    assert code == 0, err
    frames_in = helpers.decode_frames(face_video_silent)
    reference = tmp_path / "reference.mp4"
    with media.VideoWriter(reference, 25, frames_in[0].shape[1], frames_in[0].shape[0]) as writer:
        for frame in frames_in:
            writer.write(frame)
    ours, plain = np.stack(helpers.decode_frames(output)), np.stack(helpers.decode_frames(reference))
    print(f"160x128 identity output vs plain re-encode: {helpers.psnr(ours, plain):.2f} dB; "
          f"both vs the input: {helpers.psnr(np.stack(frames_in), ours):.2f} dB")
    assert np.array_equal(ours, plain)


@pytest.mark.slow
def test_identity_roundtrip_with_box_crops_through_the_api(motion_video, tmp_path):
    """The unrotated box crop (DCK's kind) and the alpha blend path, called through the Python API."""
    output = tmp_path / "box.mp4"
    options = LipsyncOptions(backbone=helpers.IdentityBackbone(CROP_BOX, 128), blend="alpha")
    summary = lipsync(motion_video, motion_video, output, options)
    assert summary.faces == summary.frames >= 50 and summary.passed_through == 0
    frames_in, frames_out = helpers.decode_frames(motion_video), helpers.decode_frames(output)
    order = pingpong(len(frames_out), len(frames_in))
    boxes = analyse(motion_video).track.boxes[order]
    _check(_report("box crops, alpha blend", np.stack([frames_in[i] for i in order]), np.stack(frames_out), boxes))


def _mask_footprints(source, spec, width, height):
    """Per frame, where the lower-face mask lands in the frame: float32 [N, H, W] in [0, 1]."""
    import cv2

    track = analyse(source).track
    transforms = crop_transforms(track.landmarks, spec)
    footprints = []
    for landmarks, matrix in zip(track.landmarks, transforms):
        mask = lower_face_mask(transform_points(landmarks, matrix), spec.size)
        footprints.append(cv2.warpAffine(mask, inverse_affine(matrix).astype(np.float64), (width, height),
                                         flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT))
    return np.stack(footprints)


@pytest.mark.slow
def test_a_changed_mouth_is_pasted_only_inside_the_mask(face_video_silent, speech_1s, tmp_path):
    """Lossless encodes (--crf 0) of an identity run and a shiftmouth run: outside the mask's footprint
    (plus a margin for 4:2:0 chroma) they are bit for bit the same, inside they differ clearly."""
    import cv2

    runs = {}
    for name in ("identity", "shiftmouth"):
        output = tmp_path / f"{name}.mp4"
        code, _, err = helpers.run_cli(["lipsync", face_video_silent, speech_1s, "-o", output, "--backbone", name,
                                        "--crf", "0", "-q"])
        assert code == 0, err
        runs[name] = np.stack(helpers.decode_frames(output)).astype(np.int16)
    source = np.stack(helpers.decode_frames(face_video_silent)).astype(np.int16)
    n, height, width = source.shape[:3]
    assert runs["identity"].shape == runs["shiftmouth"].shape == source.shape
    footprint = _mask_footprints(face_video_silent, helpers.ShiftMouthBackbone().crop, width, height)
    margin = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (25, 25))  # 12 px: chroma subsampling + filters
    near = np.stack([cv2.dilate((f > 1e-3).astype(np.uint8), margin) > 0 for f in footprint])
    inside = footprint > 0.5
    outside = ~near
    assert outside.mean() > 0.5 and inside.any()

    diff = np.abs(runs["shiftmouth"] - runs["identity"]).max(-1)
    changed_outside = int((diff[outside] > 0).sum())
    mean_inside = float(diff[inside].mean())
    to_source = helpers.psnr(source[outside].astype(np.uint8), runs["shiftmouth"][outside].astype(np.uint8))
    print(f"shiftmouth vs identity: {changed_outside} changed pixels outside the mask footprint "
          f"(of {int(outside.sum())}); mean change inside {mean_inside:.1f} grey levels; "
          f"outside vs the input decode {to_source:.1f} dB")
    assert changed_outside == 0
    assert mean_inside > 4.0
    assert to_source >= 50.0
    # The change is in the lower face: no pixel above the mask's top edge moved at all.
    rows_changed = np.flatnonzero((diff > 8).any(axis=(0, 2)))
    rows_mask = np.flatnonzero(near.any(axis=(0, 2)))
    assert rows_changed.min() >= rows_mask.min()
