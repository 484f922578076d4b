"""Several people in one video, each dubbed with their own speech in one pass:
`dubber lipsync interview.mp4 [MIX] -o out.mp4 --face 0=host.wav --face 1=guest.wav`."""

import numpy as np
import pytest

import helpers
from dubber import media
from dubber.backbones import Backbone, Generated, register
from dubber.face.crops import CROP_FACE, CropSpec

FPS = 25


@register
class LoudMouthBackbone(Backbone):
    """Paints a patch over the mouth (inside the paste mask, away from its edge) black in silence and
    bright when its speech window is loud: which voice drove which face shows in the pixels."""

    name = "loudmouth"
    needs_weights = False
    conditioning = "none"
    crop = CropSpec(CROP_FACE, 96)

    def forward(self, faces, mels, identity=None, state=None) -> Generated:
        out = faces.clone()
        level = ((mels.mean(dim=(-1, -2, -3)) + 4) / 4).clamp(0, 1)  # [B, T]: 0 in silence (-4)
        size = faces.shape[-1]
        rows, cols = slice(int(0.68 * size), int(0.82 * size)), slice(int(0.38 * size), int(0.62 * size))
        out[..., rows, cols] = level[..., None, None, None]
        return Generated(out)


def _speech(path, speaking_from: float, speaking_to: float, seconds: float = 1.0):
    """Speech between the two times, digital silence elsewhere."""
    rate = 16000
    wav = np.zeros(int(seconds * rate), np.float32)
    a, b = int(speaking_from * rate), int(speaking_to * rate)
    wav[a:b] = helpers.speech_like(speaking_to - speaking_from, rate, amplitude=0.5)[:b - a, 0]
    helpers.run_ffmpeg(["-f", "f32le", "-ar", str(rate), "-ac", "1", "-i", "-", "-c:a", "pcm_s16le", str(path)],
                       stdin=wav.tobytes())
    return path


@pytest.fixture(scope="module")
def interview(tmp_path_factory):
    d = tmp_path_factory.mktemp("speakers")
    return {"video": helpers.encode_frames(d / "two.mp4", [helpers.two_faces_frame() for _ in range(FPS)], FPS),
            "host": _speech(d / "host.wav", 0.55, 1.0),  # the left (largest, id 0) face speaks second
            "guest": _speech(d / "guest.wav", 0.0, 0.45),  # the right one first
            "mix": helpers.make_tone_speech(d / "mix.wav", 1.0)}


def _patch_brightness(frames, source):
    """Per frame, the mean grey of the painted patch of the left and of the right person (the pixels
    that differ from the source in any frame)."""
    grey = np.stack(frames).mean(-1)
    painted = (np.abs(grey - source.mean(-1)) > 40).any(0)
    left, right = painted.copy(), painted.copy()
    left[:, 130:], right[:, :130] = False, False
    assert left.sum() > 20 and right.sum() > 20
    return [(g[left].mean(), g[right].mean()) for g in grey]


@pytest.mark.slow
def test_each_face_speaks_its_own_track(interview, tmp_path):
    output = tmp_path / "o.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", interview["video"], "-o", output, "--backbone", "loudmouth",
                                            "--face", f"0={interview['host']}", "--face", f"1={interview['guest']}",
                                            "--blend", "alpha", "-q"])  # alpha: no colour matching hides the level
    assert code == 0, stderr
    frames = helpers.decode_frames(output)
    assert len(frames) == FPS
    levels = _patch_brightness(frames, helpers.two_faces_frame().astype(np.float64))
    left_early, right_early = np.mean(levels[2:9], 0)  # guest speaking, host silent
    left_late, right_late = np.mean(levels[17:23], 0)  # host speaking, guest silent
    print(f"left {left_early:.0f} -> {left_late:.0f}, right {right_early:.0f} -> {right_late:.0f}")
    assert left_late > left_early + 20 and right_early > right_late + 20
    info = media.probe(output)
    assert info.has_audio and abs(info.duration - 1.0) < 0.1  # the two tracks mixed


@pytest.mark.slow
def test_speakers_with_a_mix_as_the_soundtrack(interview, tmp_path):
    output = tmp_path / "o.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", interview["video"], interview["mix"], "-o", output,
                                            "--backbone", "loudmouth", "--face", f"1={interview['guest']}", "-q"])
    assert code == 0, stderr
    assert len(helpers.decode_frames(output)) == FPS and media.probe(output).has_audio


@pytest.mark.parametrize("faces, says", [
    (["0=nowhere.wav"], ["--face 0=nowhere.wav", "file not found"]),
    (["0={host}", "0={guest}"], ["face 0 is given twice"]),
    (["0", "1={guest}"], ["give one face id, or ID=AUDIO"]),
    (["x={host}"], ["must be ID", "ID=AUDIO"]),
    (["5={host}"], ["--face 5", "2 faces (ids 0-1)"]),
])
def test_speaker_values_are_checked(interview, tmp_path, faces, says):
    args = []
    for value in faces:
        args += ["--face", value.format(host=interview["host"], guest=interview["guest"])]
    code, stdout, stderr = helpers.run_cli(["lipsync", interview["video"], "-o", tmp_path / "o.mp4", "--backbone",
                                            "loudmouth", "-q", *args])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    for text in says:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "o.mp4").exists()
