"""Acceptance: the output lasts as long as the audio, to within one frame, at the input's frame rate.

Videos at 25, 29.97 (30000/1001) and 30 fps, with audio shorter (the video is cut) and longer
(the video plays forward and back: ping-pong) than the video; a photo at --fps 25 and 60. Each
source frame carries its index in a marker strip, so the order of the output frames is read back
from the pixels and compared with `pipeline.pingpong`.
"""

import numpy as np
import pytest

import helpers
from dubber import media
from dubber.pipeline import pingpong

NTSC = 30000 / 1001
SOURCE_SECONDS = 1.0


@pytest.fixture(scope="module")
def sources(media_dir):
    """One marked 1 s video (no audio) per frame rate."""
    return {fps: helpers.make_face_video(media_dir / f"marked_{fps:.3f}.mp4", SOURCE_SECONDS, fps)
            for fps in (25.0, NTSC, 30.0)}


def _dub(face, speech, output, *args):
    code, out, err = helpers.run_cli(["lipsync", face, speech, "-o", output, "--backbone", "identity", "-q", *args])
    assert code == 0, err
    assert out.strip() == str(output) and err == ""
    return output


def _check_length(output, audio_seconds, fps, exact=True):
    """Frame count (decoded), container duration and frame rate of `output` against the audio.
    exact: the count is round(seconds x fps), as it must be for PCM audio whose length is known to
    the sample; otherwise (compressed audio) within one frame."""
    info = media.probe(output)
    frames = helpers.decode_frames(output)
    print(f"{fps:.3f} fps, audio {audio_seconds:.3f} s -> {len(frames)} frames = {len(frames) / fps:.4f} s, "
          f"container {info.duration:.2f} s")
    assert abs(info.fps - fps) < 1e-3
    if exact:
        assert len(frames) == max(1, round(audio_seconds * fps))
    assert abs(len(frames) / fps - audio_seconds) <= 1 / fps + 1e-9
    # ffmpeg prints durations truncated to 10 ms
    assert abs(info.duration - audio_seconds) <= 1 / fps + 0.01
    assert info.has_audio
    return frames


@pytest.mark.slow
@pytest.mark.parametrize("fps", [25.0, NTSC, 30.0], ids=["25", "29.97", "30"])
@pytest.mark.parametrize("audio_seconds", [0.6, 2.3], ids=["shorter", "longer"])
def test_output_lasts_as_long_as_the_audio(sources, fps, audio_seconds, tmp_path):
    speech = helpers.make_tone_speech(tmp_path / "speech.wav", audio_seconds)
    assert abs(media.probe(speech).duration - audio_seconds) < 0.011
    output = _dub(sources[fps], speech, tmp_path / "out.mp4")
    frames = _check_length(output, audio_seconds, fps)
    n_source = int(round(SOURCE_SECONDS * fps))
    order = pingpong(len(frames), n_source)
    if audio_seconds < SOURCE_SECONDS:
        assert order.tolist() == list(range(len(frames)))  # cut, in order
    else:
        assert order.max() == n_source - 1 and np.any(np.diff(order) < 0)  # forward, back and forward again
    assert [helpers.read_marker(f) for f in frames] == order.tolist()


def test_pingpong_order():
    assert pingpong(7, 3).tolist() == [0, 1, 2, 1, 0, 1, 2]
    assert pingpong(4, 10).tolist() == [0, 1, 2, 3]
    assert pingpong(3, 1).tolist() == [0, 0, 0]
    order = pingpong(100, 25)
    assert np.all(np.abs(np.diff(order)) == 1)  # no jumps: the playback is smooth at the turns
    assert order.min() == 0 and order.max() == 24


@pytest.mark.slow
@pytest.mark.parametrize("fps", [25.0, 60.0])
def test_photo_input_at_the_given_frame_rate(face_still, fps, tmp_path):
    speech = helpers.make_tone_speech(tmp_path / "speech.wav", 1.3)
    output = _dub(face_still, speech, tmp_path / "photo.mp4", "--fps", str(fps))
    frames = _check_length(output, 1.3, fps)
    still = helpers.decode_frames(output)[0]
    assert still.shape == (128, 160, 3)
    # The identity backbone leaves the photo still. x264's ultrafast preset (media.VIDEO_PRESET) lets
    # a still picture drift a little over its P-frames: 44.0 dB from the first frame after 1.3 s
    # here at --crf 16 (veryfast: > 57 dB); a moving picture would fall far below.
    assert all(helpers.psnr(still, f) > 43 for f in frames)


@pytest.mark.slow
@pytest.mark.parametrize("name, rate", [("speech.m4a", 16000), ("speech.mp3", 44100)])
def test_compressed_audio_keeps_its_real_length(face_still, name, rate, tmp_path):
    """AAC decodes with up to 1024 samples of encoder padding (64 ms at 16 kHz, ~4 frames at 60 fps)
    and an MP3's container duration is only a bitrate estimate: the output follows the real speech."""
    speech = helpers.make_tone_speech(tmp_path / name, 0.6, rate)
    output = _dub(face_still, speech, tmp_path / "photo.mp4", "--fps", "60")
    _check_length(output, 0.6, 60.0, exact=False)
