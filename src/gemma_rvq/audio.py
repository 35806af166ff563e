"""Waveform validation, PCM conversion, downmix, resampling and decoding.

This file is copied next to saved checkpoints (remote code): at module level it imports only numpy and
torch; ``soxr`` and ``soundfile`` are imported inside the functions that need them.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch


def _as_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        return array.numpy()
    return np.asarray(array)


def to_float_mono(array: Any, *, channels_first: bool | None = None) -> np.ndarray:
    """Convert a waveform to float32 mono ``[S]``.

    Args:
        array: ``[S]``, ``[C, S]`` or ``[S, C]`` (numpy, torch or nested lists). Integer PCM is scaled to
            [-1, 1) by its type's range (``int16`` / 32768, ``int32`` / 2**31, ``uint8`` centred at 128);
            float input is kept as is.
        channels_first: layout of a 2-D array. ``None`` guesses: the shorter axis is the channel axis
            (a waveform has far more samples than channels); a square array is ambiguous and rejected.

    Multi-channel audio is downmixed by the mean over channels.

    Returns:
        ``np.ndarray`` float32 ``[S]``.
    """
    wave = _as_numpy(array)
    if wave.dtype == object:
        raise ValueError("audio must be a numeric array, got an object array (ragged nested lists?)")
    if wave.dtype.kind in "iu":
        info = np.iinfo(wave.dtype)
        if wave.dtype.kind == "u":
            offset = (int(info.max) + 1) / 2
            wave = (wave.astype(np.float64) - offset) / offset
        else:
            wave = wave.astype(np.float64) / (int(info.max) + 1)
    elif wave.dtype.kind == "b":
        raise ValueError("audio must be numeric, got a boolean array")
    elif wave.dtype.kind not in "f":
        raise ValueError(f"audio must be a numeric array, got dtype {wave.dtype}")
    if wave.ndim == 2:
        if channels_first is None:
            if wave.shape[0] == wave.shape[1]:
                raise ValueError(
                    f"cannot tell the channel axis of a square {wave.shape} array: pass channels_first"
                )
            channels_first = wave.shape[0] < wave.shape[1]
        wave = wave.mean(axis=0 if channels_first else 1)
    elif wave.ndim != 1:
        raise ValueError(f"audio must be 1-D [S] or 2-D [C, S] / [S, C], got shape {wave.shape}")
    return np.ascontiguousarray(wave, dtype=np.float32)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample a float32 ``[S]`` (or ``[S, C]``) waveform from ``orig_sr`` to ``target_sr`` Hz with soxr (HQ)."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_sr} -> {target_sr}")
    if int(orig_sr) == int(target_sr):
        return wave
    try:
        import soxr
    except ImportError as err:  # pragma: no cover - soxr is a dependency of gemma-rvq
        raise ImportError(
            f"resampling from {orig_sr} Hz to {target_sr} Hz needs soxr: pip install soxr"
        ) from err
    return soxr.resample(np.asarray(wave, dtype=np.float32), int(orig_sr), int(target_sr), quality="HQ")


def decode_audio(source: bytes | str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode an audio file (path or encoded bytes) with soundfile.

    Returns:
        ``(wave, sampling_rate)``: float32 ``[S]`` for mono, ``[S, C]`` for multi-channel files.
    """
    try:
        import soundfile
    except ImportError as err:  # pragma: no cover - soundfile is a dependency of gemma-rvq
        raise ImportError("decoding audio files needs soundfile: pip install soundfile") from err
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("cannot decode audio: the byte string is empty")
        handle: Any = io.BytesIO(bytes(source))
        name = "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        handle = os.fspath(source)
        name = handle
        if not os.path.exists(handle):
            raise ValueError(f"audio file not found: {handle}")
    else:
        raise ValueError(f"decode_audio takes bytes or a path, got {type(source).__name__}")
    try:
        wave, sampling_rate = soundfile.read(handle, dtype="float32", always_2d=False)
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError on bad data
        raise ValueError(f"cannot decode audio {name}: {err}") from err
    return wave, int(sampling_rate)


def prepare_waveform(
    array: Any,
    sampling_rate: int,
    target_sampling_rate: int,
    *,
    min_samples: int = 1,
    name: str = "audio",
    channels_first: bool | None = None,
) -> np.ndarray:
    """Validate and convert any waveform to float32 mono at ``target_sampling_rate``.

    Args:
        array: ``[S]``, ``[C, S]`` or ``[S, C]``, float or integer PCM (see [`to_float_mono`]).
        sampling_rate: rate of ``array`` in Hz.
        target_sampling_rate: rate of the result in Hz (resampled with soxr when different).
        min_samples: fewest samples accepted after resampling (e.g. one encoder frame).
        name: how to call this input in error messages (e.g. ``"row 3"``).

    Returns:
        ``np.ndarray`` float32 ``[S']``.

    Raises:
        ValueError: empty audio, NaN/inf samples, a non-positive sampling rate, or fewer than
            ``min_samples`` samples.
    """
    if sampling_rate is None or not np.isscalar(sampling_rate) or sampling_rate <= 0:
        raise ValueError(f"{name}: sampling_rate must be a positive number, got {sampling_rate!r}")
    try:
        wave = to_float_mono(array, channels_first=channels_first)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    if wave.size == 0:
        raise ValueError(f"{name}: the audio is empty (0 samples)")
    if not np.isfinite(wave).all():
        bad = int((~np.isfinite(wave)).sum())
        raise ValueError(f"{name}: the audio contains {bad} NaN or infinite samples")
    wave = resample(wave, int(sampling_rate), int(target_sampling_rate))
    if wave.shape[0] < min_samples:
        raise ValueError(
            f"{name}: too short: {wave.shape[0]} samples at {target_sampling_rate} Hz, "
            f"need at least {min_samples} (one encoder frame)"
        )
    return np.ascontiguousarray(wave, dtype=np.float32)


__all__ = ["decode_audio", "prepare_waveform", "resample", "to_float_mono"]
