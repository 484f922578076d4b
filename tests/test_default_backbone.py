"""Which backbone a lipsync uses when none is named: rewrite for a video (from its own mouths), dck
for a photo or a video part too short for a bank of mouths (with a note), and whatever model a
--weights file holds (an adapted file names its own)."""

from pathlib import Path

from dubber.backbones import DEFAULT_PHOTO_BACKBONE, DEFAULT_VIDEO_BACKBONE, weights_path
from dubber.media import MediaInfo
from dubber.mouthbank import MIN_ENTRIES
from dubber.pipeline import LipsyncOptions, resolve_backbone


def _video(seconds: float, fps: float = 25.0) -> MediaInfo:
    return MediaInfo(Path("talk.mp4"), seconds, has_video=True, width=640, height=480, fps=fps, has_audio=True)


def test_a_video_dubs_with_the_video_default():
    notes = []
    assert resolve_backbone(LipsyncOptions(), _video(10.0), notes).name == DEFAULT_VIDEO_BACKBONE == "rewrite"
    assert notes == []


def test_a_photo_dubs_with_the_photo_default():
    photo = MediaInfo(Path("face.jpg"), 0.0, has_video=True, width=256, height=256)
    assert resolve_backbone(LipsyncOptions(), photo).name == DEFAULT_PHOTO_BACKBONE == "dck"


def test_a_part_too_short_for_a_bank_dubs_with_the_photo_default_and_says_so():
    notes = []
    short = _video((MIN_ENTRIES - 1) / 25.0)
    assert resolve_backbone(LipsyncOptions(), short, notes).name == DEFAULT_PHOTO_BACKBONE
    assert len(notes) == 1 and "talk.mp4" in notes[0] and "dubbed with dck" in notes[0], notes
    # the part --start/--duration names counts, not the whole video
    notes = []
    assert resolve_backbone(LipsyncOptions(start=2.0, duration=0.5), _video(10.0), notes).name == DEFAULT_PHOTO_BACKBONE
    assert notes
    # named explicitly, the backbone is what was asked for (the bank then says what it lacks)
    assert resolve_backbone(LipsyncOptions(backbone="rewrite"), short).name == "rewrite"


def test_a_weights_file_names_its_backbone():
    assert resolve_backbone(LipsyncOptions(weights=str(weights_path("dck"))), _video(10.0)).name == "dck"
