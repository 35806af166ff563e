"""gemma_rvq.audio: PCM conversion, downmix, resampling (soxr), decoding (soundfile), validation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch

from gemma_rvq.audio import decode_audio, prepare_waveform, resample, to_float_mono


def test_int_pcm_is_scaled_to_unit_range():
    pcm16 = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_allclose(to_float_mono(pcm16), [0.0, 0.5, -1.0, 32767 / 32768], rtol=0, atol=1e-7)
    pcm32 = np.array([2**30, -(2**31)], dtype=np.int32)
    np.testing.assert_allclose(to_float_mono(pcm32), [0.5, -1.0], atol=1e-7)
    pcm8 = np.array([128, 0, 255], dtype=np.uint8)
    np.testing.assert_allclose(to_float_mono(pcm8), [0.0, -1.0, 127 / 128], atol=1e-7)


def test_float_is_kept_and_result_is_float32_contiguous():
    wave = np.linspace(-2, 2, 11, dtype=np.float64)  # out-of-range floats are not clipped
    out = to_float_mono(wave)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(out, wave, rtol=1e-6)
    out_t = to_float_mono(torch.tensor(wave, dtype=torch.bfloat16))
    assert out_t.dtype == np.float32 and out_t.shape == (11,)


def test_downmix_is_the_channel_mean_and_detects_the_channel_axis():
    left = np.sin(np.arange(1000) / 10).astype(np.float32)
    right = np.cos(np.arange(1000) / 7).astype(np.float32)
    expected = (left + right) / 2
    np.testing.assert_allclose(to_float_mono(np.stack([left, right])), expected, atol=1e-7)  # [C, S]
    np.testing.assert_allclose(to_float_mono(np.stack([left, right], axis=1)), expected, atol=1e-7)  # [S, C]
    square = np.zeros((4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="channels_first"):
        to_float_mono(square)
    assert to_float_mono(square, channels_first=True).shape == (4,)
    with pytest.raises(ValueError, match="1-D"):
        to_float_mono(np.zeros((2, 3, 4)))


def test_resample_changes_length_and_keeps_pitch():
    sr_in, sr_out, freq = 22050, 16000, 440.0
    t = np.arange(sr_in) / sr_in
    wave = np.sin(2 * np.pi * freq * t).astype(np.float32)
    out = resample(wave, sr_in, sr_out)
    assert out.dtype == np.float32 and abs(len(out) - sr_out) <= 1
    spectrum = np.abs(np.fft.rfft(out))
    peak_hz = np.argmax(spectrum) * sr_out / len(out)
    assert abs(peak_hz - freq) < 2.0
    assert resample(wave, 16000, 16000) is wave


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_decode_audio_from_path_and_bytes(tmp_path, fmt):
    rng = np.random.default_rng(0)
    stereo = np.clip(0.2 * rng.standard_normal((2205, 2)), -0.99, 0.99).astype(np.float32)
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, stereo, 22050, format=fmt, subtype="PCM_16")
    wave, sr = decode_audio(path)
    assert sr == 22050 and wave.shape == (2205, 2) and wave.dtype == np.float32
    np.testing.assert_allclose(wave, stereo, atol=1 / 32768 + 1e-6)
    wave_b, sr_b = decode_audio(path.read_bytes())
    assert sr_b == 22050
    np.testing.assert_array_equal(wave_b, wave)
    # str path too, and the file then goes through prepare_waveform (downmix + resample)
    mono = prepare_waveform(decode_audio(str(path))[0], 22050, 16000)
    assert mono.ndim == 1 and abs(len(mono) - 1600) <= 1


def test_decode_audio_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        decode_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="empty"):
        decode_audio(b"")
    with pytest.raises(ValueError, match="cannot decode"):
        decode_audio(b"definitely not audio" * 10)
    with pytest.raises(ValueError, match="bytes or a path"):
        decode_audio(12345)


def test_prepare_waveform_int16_stereo_22k(speech_22k):
    wave, sr = speech_22k
    pcm = (np.stack([wave, wave]) * 32767).astype(np.int16)
    out = prepare_waveform(pcm, sr, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - round(len(wave) * 16000 / sr)) <= 1
    reference = resample(wave, sr, 16000)
    assert np.abs(out - reference).max() < 1e-3  # int16 quantization only


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.array([], dtype=np.float32), "empty"),
        (np.array([0.0, np.nan, 0.1], dtype=np.float32), "NaN"),
        (np.array([0.0, np.inf], dtype=np.float32), "infinite"),
        (np.zeros(10, dtype=np.float32), "too short"),
        (np.array(["a", "b"]), "numeric"),
        (np.zeros(5, dtype=bool), "boolean"),
    ],
)
def test_prepare_waveform_rejects_bad_audio(array, match):
    with pytest.raises(ValueError, match=match) as info:
        prepare_waveform(array, 16000, 16000, min_samples=100, name="row 7")
    assert "row 7" in str(info.value)


def test_prepare_waveform_rejects_bad_sampling_rate():
    with pytest.raises(ValueError, match="sampling_rate"):
        prepare_waveform(np.zeros(100, dtype=np.float32), 0, 16000)
    with pytest.raises(ValueError, match="sampling_rate"):
        prepare_waveform(np.zeros(100, dtype=np.float32), None, 16000)


def test_decode_roundtrip_bytes_of_a_wav_written_in_memory():
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(800, dtype=np.float32), 8000, format="WAV")
    wave, sr = decode_audio(buf.getvalue())
    assert sr == 8000 and wave.shape == (800,)
