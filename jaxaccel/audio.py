"""Audio for keyword spotting: fixed-length int16 clips on the host, log-mel features on device.

The dataset keeps raw int16 samples (half the bytes of float32); the model computes the features
in its first layer, so they run on the accelerator inside the compiled step:

    frames   25 ms windows (400 samples at 16 kHz) every 10 ms (160), Hann-weighted
    power    |rfft(frame, 512)|^2
    mel      a triangular HTK-mel filter bank (40 bands, 20 Hz - 8 kHz), built once in NumPy
    log      log(mel energy + 1e-6), samples scaled to [-1, 1) first
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

__all__ = ["SAMPLE_RATE", "fix_length", "hz_to_mel", "mel_to_hz", "mel_matrix", "frame_indices", "log_mel"]

SAMPLE_RATE = 16000
FRAME, HOP, N_FFT, N_MELS = 400, 160, 512, 40


def fix_length(clips: list[np.ndarray], length: int) -> np.ndarray:
    """int16 ``[N, length]``: each clip cut to its first ``length`` samples or padded with zeros."""
    out = np.zeros((len(clips), length), np.int16)
    for i, clip in enumerate(clips):
        clip = np.asarray(clip).reshape(-1)[:length]
        out[i, :clip.size] = clip
    return out


def hz_to_mel(hz):
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_matrix(n_fft: int = N_FFT, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE,
               fmin: float = 20.0, fmax: float | None = None) -> np.ndarray:
    """float32 ``[n_fft // 2 + 1, n_mels]``: triangular filters on the mel scale, each 1 at its
    centre frequency and 0 at its neighbours' centres."""
    fmax = fmax or sample_rate / 2
    centres = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = centres[:-2, None], centres[1:-1, None], centres[2:, None]
    rising = (freqs[None] - lower) / (centre - lower)
    falling = (upper - freqs[None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).T.astype(np.float32)


def frame_indices(num_samples: int, frame: int = FRAME, hop: int = HOP) -> np.ndarray:
    """int32 ``[num_frames, frame]`` sample indices of every whole frame."""
    count = 1 + (num_samples - frame) // hop
    return (np.arange(count)[:, None] * hop + np.arange(frame)[None]).astype(np.int32)


def log_mel(audio: jnp.ndarray, n_mels: int = N_MELS) -> jnp.ndarray:
    """float32 ``[B, frames, n_mels]`` log-mel energies of int16 audio ``[B, T]``."""
    x = audio.astype(jnp.float32) / 32768.0
    frames = x[:, frame_indices(audio.shape[-1])] * np.hanning(FRAME).astype(np.float32)
    power = jnp.abs(jnp.fft.rfft(frames, n=N_FFT)) ** 2
    return jnp.log(power @ mel_matrix(N_FFT, n_mels) + 1e-6)
