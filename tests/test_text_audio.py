"""The shipped tokenizer and the on-device log-mel features, against references computed another way."""
from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np

from jaxaccel import audio, text


def test_tokenize_hashes_lowercased_words_pads_and_marks_truncation():
    ids = text.tokenize(["The cat, the CAT!", b"don't stop", "a b c d e f"], vocab_size=100, max_length=5)
    assert ids.dtype == np.int32 and ids.shape == (3, 5)
    the, cat = (2 + zlib.crc32(w.encode()) % 98 for w in ("the", "cat"))
    np.testing.assert_array_equal(ids[0], [the, cat, the, cat, text.PAD])
    assert ids[1, 0] == 2 + zlib.crc32(b"don't") % 98 and ids[1, 2] == text.PAD
    assert ids[2, -1] == text.TRUNCATED and (ids[2, :4] >= 2).all()  # first 4 words, then the mark
    assert ids.max() < 100


def test_fix_length_cuts_and_zero_pads_int16():
    out = audio.fix_length([np.arange(5, dtype=np.int16), np.arange(20, dtype=np.int16)], 8)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out[0], [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(out[1], np.arange(8))


def test_mel_filters_peak_at_their_centres():
    m = audio.mel_matrix(512, 40)
    assert m.shape == (257, 40) and m.min() >= 0 and np.all(m.max(axis=0) <= 1 + 1e-6)
    # Centres rise monotonically with the band index (the mel scale is increasing).
    assert np.all(np.diff(np.argmax(m, axis=0)) >= 0)
    np.testing.assert_allclose(audio.mel_to_hz(audio.hz_to_mel([100.0, 1000.0, 8000.0])), [100, 1000, 8000])


def test_log_mel_matches_a_numpy_frame_loop_and_finds_a_tone():
    t = np.arange(16000) / 16000
    tone = (0.5 * 32767 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    noise = np.random.default_rng(0).integers(-3000, 3000, 16000).astype(np.int16)
    clips = np.stack([tone, noise])
    got = np.asarray(audio.log_mel(jnp.asarray(clips)))
    assert got.shape == (2, 98, 40)  # 1 + (16000 - 400) // 160 frames
    window, mel = np.hanning(400), audio.mel_matrix()
    for b in range(2):
        for f in (0, 50, 97):
            frame = clips[b, f * 160: f * 160 + 400] / 32768.0 * window
            want = np.log(np.abs(np.fft.rfft(frame, 512)) ** 2 @ mel + 1e-6)
            np.testing.assert_allclose(got[b, f], want, rtol=1e-3, atol=1e-3)
    # The 1 kHz tone's loudest band is the one whose centre is nearest 1 kHz.
    centres = audio.mel_to_hz(np.linspace(audio.hz_to_mel(20), audio.hz_to_mel(8000), 42))[1:-1]
    assert np.argmax(got[0].mean(0)) == np.argmin(np.abs(centres - 1000))
