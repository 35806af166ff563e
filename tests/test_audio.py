"""gemma_rvq.audio: PCM conversion, downmix, resampling (soxr), decoding (soundfile), validation.

The audio-input cases of issue 10 through ``model.encode`` / ``model.embed`` live here too; the same cases
through the transform, the embedding cache and the CLI are in test_transforms / test_cache / test_cli.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch

from gemma_rvq.audio import (
    AudioInputWarning,
    check_sampling_rate,
    decode_audio,
    load_waveform,
    prepare_waveform,
    resample,
    to_float_mono,
)

# sampling rates every entry point must refuse, with the accepted range in the message
BAD_RATES = [True, "16000", float("nan"), float("inf"), 0, -16000, 16, 999, 384_001, 16000.5]
RANGE = r"\[1000, 384000\]"


def test_int_pcm_is_scaled_to_unit_range():
    pcm16 = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_allclose(to_float_mono(pcm16), [0.0, 0.5, -1.0, 32767 / 32768], rtol=0, atol=1e-7)
    pcm32 = np.array([2**30, -(2**31)], dtype=np.int32)
    np.testing.assert_allclose(to_float_mono(pcm32), [0.5, -1.0], atol=1e-7)
    pcm8 = np.array([128, 0, 255], dtype=np.uint8)
    np.testing.assert_allclose(to_float_mono(pcm8), [0.0, -1.0, 127 / 128], atol=1e-7)


def test_float_is_kept_and_result_is_float32_contiguous():
    wave = np.linspace(-2, 2, 11, dtype=np.float64)  # floats up to FLOAT_PEAK_LIMIT are kept, not clipped
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


@pytest.mark.parametrize("rate", BAD_RATES, ids=repr)
def test_check_sampling_rate_refuses_with_the_accepted_range(rate):
    with pytest.raises(ValueError, match=RANGE):
        check_sampling_rate(rate)
    with pytest.raises(ValueError, match=RANGE):
        prepare_waveform(np.zeros(4000, dtype=np.float32), rate, 16000, name="row 2")


def test_check_sampling_rate_accepts_whole_numbers_of_any_type():
    for rate in (16000, 16000.0, np.int64(16000), np.float32(16000), torch.tensor(16000), 1000, 384_000):
        assert check_sampling_rate(rate) == int(rate) and type(check_sampling_rate(rate)) is int
    with pytest.raises(ValueError, match="did you mean 16000 Hz"):
        check_sampling_rate(16)


# ---------------------------------------------------------------------------------------------- int PCM
def _int16_speech(speech) -> np.ndarray:
    wave, _ = speech
    return np.round(wave * 32767).astype(np.int16)


@pytest.mark.parametrize("form", ["np.int64", "python ints", "torch.int64"])
def test_int64_samples_need_a_declared_width(speech_16k, form):
    pcm = _int16_speech(speech_16k)
    value = {"np.int64": pcm.astype(np.int64), "python ints": pcm.tolist(),
             "torch.int64": torch.from_numpy(pcm.astype(np.int64))}[form]
    with pytest.raises(ValueError, match="pcm_dtype='int16'") as info:
        prepare_waveform(value, 16000, 16000, name="row 5")
    assert "row 5" in str(info.value) and "no PCM width" in str(info.value)
    # declared: scaled by the declared width, exactly as the int16 array itself
    expected = to_float_mono(pcm)
    np.testing.assert_array_equal(prepare_waveform(value, 16000, 16000, pcm_dtype="int16"), expected)
    assert np.abs(expected).max() > 0.3  # not the near silence of a division by 2**63
    with pytest.raises(ValueError, match="do not fit the declared pcm_dtype='int8'"):
        prepare_waveform(value, 16000, 16000, pcm_dtype="int8")
    with pytest.raises(ValueError, match="pcm_dtype must be one of"):
        prepare_waveform(value, 16000, 16000, pcm_dtype="int64")


def test_declared_width_overrides_the_container_type():
    # int16 values held in an int32 array: the declared width decides the scale
    values = np.array([16384, -32768], dtype=np.int32)
    np.testing.assert_allclose(to_float_mono(values, pcm_dtype="int16"), [0.5, -1.0])
    np.testing.assert_allclose(to_float_mono(values), [16384 / 2**31, -32768 / 2**31])


# ---------------------------------------------------------------------------------------------- float range
def test_float_samples_far_outside_unit_range_are_refused_naming_the_peak(speech_16k):
    pcm_as_float = _int16_speech(speech_16k).astype(np.float32)  # int16 PCM cast to float, unscaled
    peak = float(np.abs(pcm_as_float).max())
    with pytest.raises(ValueError, match=f"float samples reach {peak:.6g}") as info:
        prepare_waveform(pcm_as_float, 16000, 16000, name="clip.wav")
    assert "clip.wav" in str(info.value) and "32768" in str(info.value)
    assert prepare_waveform(np.full(4000, 1.9, np.float32), 16000, 16000).max() == pytest.approx(1.9)


# ---------------------------------------------------------------------------------------------- files
def test_truncated_wav_is_refused(tmp_path, speech_16k):
    wave, rate = speech_16k
    path = tmp_path / "full.wav"
    soundfile.write(path, wave, rate, subtype="PCM_16")
    data = path.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 3])
    assert soundfile.read(cut)[0].shape[0] < len(wave)  # what libsndfile alone returns, silently
    with pytest.raises(ValueError, match=rf"truncated: its header declares {len(wave)} frames"):
        decode_audio(cut)
    with pytest.raises(ValueError, match="truncated"):
        decode_audio(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated"):
        load_waveform(str(cut), 16000, name="cut.wav")
    assert decode_audio(path)[0].shape == wave.shape  # the complete file still decodes


def test_wav_with_implausible_header_rate_is_refused(tmp_path):
    path = tmp_path / "sixteen.wav"
    soundfile.write(path, np.zeros(4000, np.float32), 16, subtype="PCM_16")  # 16 "Hz": meant 16 kHz
    with pytest.raises(ValueError, match=RANGE):
        load_waveform(path, 16000, name=str(path))


# ---------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def model():
    from gemma_rvq.testing import tiny_rvq_model

    return tiny_rvq_model(num_quantizers=2, codebook_size=16, seed=0).eval()


def _codes(out) -> np.ndarray:
    return out.audio_codes[0][:, out.codes_mask[0]].numpy()


@pytest.mark.parametrize("entry", ["encode", "embed"])
def test_model_refuses_int64_and_unscaled_float_and_bad_rates(model, speech_16k, entry):
    call = getattr(model, entry)
    pcm = _int16_speech(speech_16k)
    for value in (torch.from_numpy(pcm.astype(np.int64)), pcm.astype(np.int64), [pcm.tolist()], pcm.tolist()):
        with pytest.raises(ValueError, match="no PCM width"):
            call(value, sampling_rate=16000)
    with pytest.raises(ValueError, match="float samples reach"):
        call([pcm.astype(np.float32)], sampling_rate=16000)
    for rate in BAD_RATES:
        with pytest.raises(ValueError, match=RANGE):
            call([speech_16k[0]], sampling_rate=rate)


def test_model_int16_equals_float_and_python_floats_are_one_clip(model, speech_16k):
    pcm = _int16_speech(speech_16k)
    reference = _codes(model.encode([to_float_mono(pcm)], sampling_rate=16000))
    np.testing.assert_array_equal(_codes(model.encode(pcm, sampling_rate=16000)), reference)  # int16: own width
    np.testing.assert_array_equal(_codes(model.encode(torch.from_numpy(pcm), sampling_rate=16000)), reference)
    out = model.encode(to_float_mono(pcm).tolist(), sampling_rate=16000)  # a list of numbers: one waveform
    assert out.audio_codes.shape[0] == 1
    np.testing.assert_array_equal(_codes(out), reference)


def test_encode_without_sampling_rate_warns(model, speech_16k):
    with pytest.warns(AudioInputWarning, match="strongly recommended to pass the `sampling_rate`"):
        model.encode([speech_16k[0]])
    with pytest.warns(AudioInputWarning, match="16000 Hz"):
        model.embed([speech_16k[0]])


def test_padding_mask_with_holes_is_refused_and_a_contiguous_one_is_honoured(model, speech_16k):
    wave = torch.from_numpy(speech_16k[0])
    n = wave.shape[0]
    batch = torch.zeros(2, n + 4000)
    batch[0, :n] = wave  # right-padded
    batch[1, 4000:] = wave  # left-padded
    mask = torch.zeros(2, n + 4000, dtype=torch.bool)
    mask[0, :n] = True
    mask[1, 4000:] = True
    alone = _codes(model.encode([wave], sampling_rate=16000))
    out = model.encode(batch, mask, sampling_rate=16000)
    for row in range(2):
        np.testing.assert_array_equal(out.audio_codes[row][:, out.codes_mask[row]].numpy(), alone)
    holes = mask.clone()
    holes[0, 1000:1500] = False
    with pytest.raises(ValueError, match="padding_mask row 0 has holes"):
        model.encode(batch, holes, sampling_rate=16000)
    with pytest.raises(ValueError, match="padding_mask row 1 has holes"):
        model.embed(batch.numpy(), np.stack([mask[0].numpy(), holes[0].numpy()[::-1]]), sampling_rate=16000)


def test_decode_roundtrip_bytes_of_a_wav_written_in_memory():
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(800, dtype=np.float32), 8000, format="WAV")
    wave, sr = decode_audio(buf.getvalue())
    assert sr == 8000 and wave.shape == (800,)
