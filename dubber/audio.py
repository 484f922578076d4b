"""Audio loading and the log-mel features every backbone and the sync expert consume.

Features follow Wav2Lip's spectrogram settings (the DCK paper reuses them): 16 kHz mono,
80 mel bands, 50 ms window, 12.5 ms hop, so 80 mel frames per second. A video frame at time t
gets the mel window centred on t, which keeps any frame rate (25, 29.97, 30, 60) in sync.
"""

from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np

from dubber import media
from dubber.errors import DubberError

SAMPLE_RATE = 16000  # Hz
N_FFT = 800  # samples (50 ms)
HOP_LENGTH = 200  # samples (12.5 ms)
N_MELS = 80
MEL_FPS = SAMPLE_RATE / HOP_LENGTH  # mel frames per second (80)
FMIN, FMAX = 55, 7600  # Hz
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MEL_MIN, MEL_MAX = -4.0, 4.0  # range of the normalised log-mel (8 units span -MIN_LEVEL_DB = 100 dB)
SILENCE_RMS = 1e-4  # full-scale RMS under which a track counts as silent
MEL_WINDOW = 16  # mel frames in one video frame's audio window (0.2 s): what the backbones and the expert take
SPEECH_LEVEL = 0.2  # a frame has speech when its envelope exceeds this fraction of the clip's 95th percentile
MEL_CHUNK = 8192  # STFT frames computed at once (~100 s of audio): memory does not grow with length


def load_audio(path: Union[str, Path], check_silence: bool = True, video_timeline: bool = False) -> np.ndarray:
    """Decode any audio ffmpeg reads (or a video's audio track) to float32 [n] at SAMPLE_RATE, mono;
    video_timeline: sample 0 at the video's first frame (media.decode_audio)."""
    wav = media.decode_audio(path, SAMPLE_RATE, video_timeline)
    if wav.size < SAMPLE_RATE // 25:
        raise DubberError("audio is shorter than one video frame", path)
    # RMS accumulated in float64 without a float64 copy of the track (16 bytes a sample for an hour of audio)
    if check_silence and float(np.sqrt(np.einsum("i,i->", wav, wav, dtype=np.float64) / wav.size)) < SILENCE_RMS:
        raise DubberError("audio track is silent", path)
    return wav


# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above.
SLANEY_HZ_PER_MEL = 200.0 / 3
SLANEY_LOG_HZ = 1000.0  # Hz where the scale turns logarithmic
SLANEY_LOG_STEP = np.log(6.4) / 27.0  # log-Hz per mel above it


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel of frequencies in Hz (float64)."""
    hz = np.asarray(hz, np.float64)
    log_mel0 = SLANEY_LOG_HZ / SLANEY_HZ_PER_MEL
    return np.where(hz >= SLANEY_LOG_HZ, log_mel0 + np.log(np.maximum(hz, 1e-12) / SLANEY_LOG_HZ) / SLANEY_LOG_STEP,
                    hz / SLANEY_HZ_PER_MEL)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Frequencies in Hz of Slaney mels (float64); inverse of hz_to_mel."""
    mel = np.asarray(mel, np.float64)
    log_mel0 = SLANEY_LOG_HZ / SLANEY_HZ_PER_MEL
    return np.where(mel >= log_mel0, SLANEY_LOG_HZ * np.exp(SLANEY_LOG_STEP * (mel - log_mel0)), mel * SLANEY_HZ_PER_MEL)


@lru_cache(maxsize=None)
def mel_basis() -> np.ndarray:
    """The mel filter bank: float32 [N_MELS, N_FFT // 2 + 1], triangles on Slaney's scale from FMIN
    to FMAX, each scaled to unit area (librosa.filters.mel's defaults; a test checks they agree)."""
    fft_hz = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(FMIN), hz_to_mel(FMAX), N_MELS + 2))
    ramps = edges[:, None] - fft_hz[None, :]
    widths = np.diff(edges)
    rising, falling = -ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


@lru_cache(maxsize=None)
def _stft_window() -> np.ndarray:
    """Periodic Hann window of N_FFT samples (scipy's get_window('hann', N_FFT), as librosa uses)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def log_mel(wav: np.ndarray) -> np.ndarray:
    """float32 [n] at SAMPLE_RATE -> normalised log-mel spectrogram float32 [N_MELS, T], values in [MEL_MIN, MEL_MAX].

    Wav2Lip's features (librosa's centred STFT of the pre-emphasised track, Slaney mel bank, dB),
    computed with numpy: librosa's numbers to float rounding (a test compares them), without the
    seconds librosa's first call spends importing scipy.signal and numba.
    """
    # Taken MEL_CHUNK frames at a time: neither a copy of the track nor its [401, T] spectrogram
    # (~50 MB a minute) is ever held whole.
    pad = N_FFT // 2
    frames = 1 + len(wav) // HOP_LENGTH
    out = np.empty((N_MELS, frames), np.float32)
    window, basis = _stft_window(), mel_basis()
    for start in range(0, frames, MEL_CHUNK):
        stop = min(frames, start + MEL_CHUNK)
        segment = _pre_emphasised(wav, start * HOP_LENGTH - pad, (stop - 1) * HOP_LENGTH + N_FFT - pad)
        windows = np.lib.stride_tricks.sliding_window_view(segment, N_FFT)[::HOP_LENGTH]
        spec = np.abs(np.fft.rfft(windows * window, axis=1)).astype(np.float32).T
        mel_db = 20 * np.log10(np.maximum(1e-5, basis @ spec)) - REF_LEVEL_DB
        out[:, start:stop] = np.clip((MEL_MAX - MEL_MIN) * (mel_db - MIN_LEVEL_DB) / -MIN_LEVEL_DB + MEL_MIN,
                                     MEL_MIN, MEL_MAX)
    return out


def _pre_emphasised(wav: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Samples lo..hi-1 of the pre-emphasised track, zeros outside it: float32 [hi - lo].

    Pre-emphasis, as in Wav2Lip (y[0] = x[0], y[n] = x[n] - 0.97 x[n-1]), lifts the high bands
    where consonants live.
    """
    out = np.zeros(hi - lo, np.float32)
    a, b = max(lo, 0), min(hi, len(wav))
    if b > a:
        first = max(a, 1)
        out[first - lo:b - lo] = wav[first:b] - 0.97 * wav[first - 1:b - 1]
        if a == 0:
            out[-lo] = wav[0]
    return out


def mel_window_starts(times_s: np.ndarray, width: int) -> np.ndarray:
    """First mel column of the `width`-column window centred on each time: times_s [N] -> int64 [N]
    (may be negative or past the end: mel_windows pads)."""
    return np.round(np.asarray(times_s, dtype=np.float64) * MEL_FPS).astype(np.int64) - width // 2


def mel_windows(mel: np.ndarray, times_s: np.ndarray, width: int) -> np.ndarray:
    """Cut one window per timestamp: mel [N_MELS, T], times_s [N] -> [N, N_MELS, width].

    Window i is centred on times_s[i]; edges are padded with the quietest value (MEL_MIN) so frames
    at the very start or past the end of the audio see silence rather than a wrap-around.
    """
    starts = mel_window_starts(times_s, width)
    index = starts[:, None] + np.arange(width)[None, :]
    inside = (index >= 0) & (index < mel.shape[1])
    # Gather, then silence what falls outside the track: no padded copy of the whole spectrogram.
    windows = mel[:, np.clip(index, 0, mel.shape[1] - 1)].transpose(1, 0, 2)
    return np.ascontiguousarray(np.where(inside[:, None, :], windows, np.float32(MEL_MIN)), dtype=mel.dtype)


def envelope(wav: np.ndarray, times_s: np.ndarray, window_s: float = 0.04) -> np.ndarray:
    """RMS speech envelope sampled at times_s: wav [n] -> [N] (full-scale RMS over window_s around each t)."""
    half = max(1, int(window_s * SAMPLE_RATE / 2))
    centres = np.round(np.asarray(times_s) * SAMPLE_RATE).astype(np.int64)
    power = np.concatenate([[0.0], np.cumsum(wav.astype(np.float64) ** 2)])
    lo = np.clip(centres - half, 0, wav.size)
    hi = np.clip(centres + half, 0, wav.size)
    return np.sqrt((power[hi] - power[lo]) / np.maximum(hi - lo, 1)).astype(np.float32)


def speech_frames(envelope: np.ndarray) -> np.ndarray:
    """The one rule for "this frame has speech": envelope [N] (see `envelope`) -> bool [N].

    Relative to the clip's own loud frames (95th percentile), so it holds for quiet and loud
    recordings alike; in a pause no audio offset is more right than another.
    """
    envelope = np.asarray(envelope, np.float64)
    if envelope.size == 0:
        return np.zeros(0, bool)
    return envelope > SPEECH_LEVEL * np.percentile(envelope, 95)
