"""The one audio reader: decoding, channels, integer-PCM scaling, resampling, checks and their messages.

Every entry point reads audio through this module: ``GemmaRVQModel.encode`` / ``embed``
([`prepare_batch`]), the ``datasets.map`` transform and the embedding cache ([`load_waveform`] on one
dataset cell), ``gemma-rvq evaluate`` / ``tokenize`` and the demo ([`load_waveform`] on a file). The model
itself only ever sees float32 mono waveforms at its own rate. (Anchor: transformers'
``EncodecFeatureExtractor``: the raw-audio checks live in one place, the model takes tensors.)

What is accepted, and what is refused with a ``ValueError`` naming the input:

- **sampling rates**: a positive whole number of Hz in ``[MIN_SAMPLING_RATE, MAX_SAMPLING_RATE]``
  (1 kHz - 384 kHz). ``True``, strings, NaN, inf, 0, negatives, fractions and implausible values such as
  ``16`` (meant as 16 kHz) are refused.
- **integer PCM**: ``int8`` / ``int16`` / ``int32`` / ``uint8`` arrays are scaled by their type's range.
  ``int64`` samples (what ``datasets`` hands out for an ``int16`` column; also Python ints and
  ``torch.int64``) carry no width: they are refused unless the width is declared (``pcm_dtype="int16"``),
  and then scaled by the declared width.
- **float samples** are kept as they are up to a peak of ``FLOAT_PEAK_LIMIT`` (2.0, room for resampling
  overshoot); a larger peak (e.g. int16 PCM cast to float without scaling) is refused, naming the peak.
- **channels**: ``[S]``, ``[C, S]`` or ``[S, C]``; several channels are averaged to mono.
- **files** (paths, bytes): decoded with soundfile; a WAV file shorter than its header says (a
  truncated download or copy) is refused.
- **padding masks** (``[B, S]`` with a padded batch): one contiguous run of real samples per row; a mask
  with holes is refused.
- empty audio, NaN/inf samples, and audio shorter than the encoder's minimum.

This file is copied next to saved checkpoints (remote code): at module level it imports only numpy and
torch (and the standard library); ``soxr`` and ``soundfile`` are imported inside the functions that need
them.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import struct
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

MIN_SAMPLING_RATE = 1_000
"""Lowest accepted sampling rate in Hz (anything lower is a unit mistake, e.g. 16 for 16 kHz)."""
MAX_SAMPLING_RATE = 384_000
"""Highest accepted sampling rate in Hz (the highest rate common audio hardware records)."""
FLOAT_PEAK_LIMIT = 2.0
"""Float samples may reach this magnitude; a larger peak is refused as unscaled integer PCM."""
PCM_DTYPES = ("int8", "int16", "int32", "uint8")
"""Integer widths ``pcm_dtype`` may declare."""

MISSING_SAMPLING_RATE_WARNING = (
    "It is strongly recommended to pass the `sampling_rate` argument to `GemmaRVQModel.encode` / `embed`. "
    "Without it the audio is taken to be at the model's rate ({rate} Hz), which silently gives wrong codes "
    "for audio at any other rate."
)


class AudioInputWarning(UserWarning):
    """Raised as a warning when audio input is accepted but may not mean what the caller intended."""


# ---------------------------------------------------------------------------------------------- checks
def check_sampling_rate(value: Any, name: str = "sampling_rate") -> int:
    """``value`` as an int number of Hz, or a ``ValueError`` giving the accepted range.

    Accepts ints, integral floats (``16000.0``) and their numpy / 0-d torch forms, within
    [`MIN_SAMPLING_RATE`, `MAX_SAMPLING_RATE`].
    """
    accepted = f"a whole number of Hz in [{MIN_SAMPLING_RATE}, {MAX_SAMPLING_RATE}]"
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, np.generic) and value.shape == ():
        value = value.item()
    if value is None:
        raise ValueError(f"{name} is missing: give the audio's sampling rate, {accepted}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    rate = int(value)
    if not MIN_SAMPLING_RATE <= rate <= MAX_SAMPLING_RATE:
        hint = f" (did you mean {rate * 1000} Hz?)" if 0 < rate < MIN_SAMPLING_RATE and rate * 1000 <= MAX_SAMPLING_RATE else ""
        raise ValueError(f"{name} must be {accepted}, got {rate}{hint}")
    return rate


def check_pcm_dtype(pcm_dtype: Any) -> str | None:
    """The canonical name of a declared integer PCM width (``"int16"``...), or None."""
    if pcm_dtype is None:
        return None
    try:
        name = str(np.dtype(str(pcm_dtype).removeprefix("torch.")))
    except TypeError:
        name = None
    if name not in PCM_DTYPES:
        raise ValueError(f"pcm_dtype must be one of {PCM_DTYPES}, got {pcm_dtype!r}")
    return name


def _as_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        return array.numpy()
    return np.asarray(array)


def _scale_integers(wave: np.ndarray, pcm_dtype: str | None) -> np.ndarray:
    """Integer PCM -> float64 in [-1, 1), by the declared width or else the array's own (never int64's)."""
    if pcm_dtype is not None:
        info = np.iinfo(pcm_dtype)
        if wave.size and (wave.min() < info.min or wave.max() > info.max):
            raise ValueError(
                f"integer samples in [{wave.min()}, {wave.max()}] do not fit the declared pcm_dtype={pcm_dtype!r}"
            )
    elif wave.dtype.itemsize >= 8:
        raise ValueError(
            f"integer samples of type {wave.dtype} (also what Python ints, torch.int64 and datasets' int16 "
            "columns arrive as) carry no PCM width, and scaling them by the int64 range would give near "
            "silence: declare the width (pcm_dtype='int16' or 'int32'), cast the array to its real width "
            "(np.int16), or pass float samples in [-1, 1]"
        )
    else:
        info = np.iinfo(wave.dtype)
    if info.min == 0:  # unsigned: centred at half the range
        offset = (int(info.max) + 1) / 2
        return (wave.astype(np.float64) - offset) / offset
    return wave.astype(np.float64) / (int(info.max) + 1)


def to_float_mono(array: Any, *, channels_first: bool | None = None, pcm_dtype: str | None = None) -> np.ndarray:
    """Convert a waveform to float32 mono ``[S]``.

    Args:
        array: ``[S]``, ``[C, S]`` or ``[S, C]`` (numpy, torch or nested lists). Integer PCM is scaled to
            [-1, 1) by ``pcm_dtype`` when given, else by its type's range (``int16`` / 32768, ``int32`` /
            2**31, ``uint8`` centred at 128); 64-bit integers need ``pcm_dtype``. Float input is kept as is
            if its peak is at most [`FLOAT_PEAK_LIMIT`].
        channels_first: layout of a 2-D array. ``None`` guesses: the shorter axis is the channel axis
            (a waveform has far more samples than channels); a square array is ambiguous and rejected.
        pcm_dtype: declared width of integer samples (one of [`PCM_DTYPES`]).

    Multi-channel audio is downmixed by the mean over channels.

    Returns:
        ``np.ndarray`` float32 ``[S]``.
    """
    pcm_dtype = check_pcm_dtype(pcm_dtype)
    wave = _as_numpy(array)
    if wave.dtype == object:
        raise ValueError("audio must be a numeric array, got an object array (ragged nested lists?)")
    if wave.dtype.kind == "b":
        raise ValueError("audio must be numeric, got a boolean array")
    if wave.dtype.kind in "iu":
        wave = _scale_integers(wave, pcm_dtype)
    elif wave.dtype.kind == "f":
        finite = np.isfinite(wave)
        if not finite.all():
            raise ValueError(f"the audio contains {int((~finite).sum())} NaN or infinite samples")
        peak = float(np.abs(wave).max()) if wave.size else 0.0
        if peak > FLOAT_PEAK_LIMIT:
            raise ValueError(
                f"float samples reach {peak:.6g}, far outside [-1, 1]: this looks like integer PCM cast to "
                "float without scaling. Divide by the PCM range (e.g. wave / 32768 for int16), or pass the "
                "integer samples with their width (pcm_dtype='int16')"
            )
    else:
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


# ---------------------------------------------------------------------------------------------- resampling
def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample a float32 ``[S]`` (or ``[S, C]``) waveform from ``orig_sr`` to ``target_sr`` Hz with soxr (HQ)."""
    orig_sr = check_sampling_rate(orig_sr, "the source sampling rate")
    target_sr = check_sampling_rate(target_sr, "the target sampling rate")
    if orig_sr == target_sr:
        return wave
    try:
        import soxr
    except ImportError as err:  # pragma: no cover - soxr is a dependency of gemma-rvq
        raise ImportError(
            f"resampling from {orig_sr} Hz to {target_sr} Hz needs soxr: pip install soxr"
        ) from err
    return soxr.resample(np.asarray(wave, dtype=np.float32), orig_sr, target_sr, quality="HQ")


# ---------------------------------------------------------------------------------------------- decoding
def _wav_declared_frames(handle: Any) -> int | None:
    """Frames the ``data`` chunk of a RIFF/WAVE header declares, or None (not a WAV, or a streaming header
    with no size). ``handle`` is a binary file object positioned anywhere; it is left at offset 0."""
    handle.seek(0)
    head = handle.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        handle.seek(0)
        return None
    endian = "<" if head[:4] == b"RIFF" else ">"
    block_align = None
    try:
        while True:
            chunk = handle.read(8)
            if len(chunk) < 8:
                return None
            chunk_id, size = chunk[:4], struct.unpack(endian + "I", chunk[4:])[0]
            if chunk_id == b"fmt ":
                fmt = handle.read(size)
                if len(fmt) < 14:
                    return None
                block_align = struct.unpack(endian + "H", fmt[12:14])[0]
                if size % 2:
                    handle.read(1)
            elif chunk_id == b"data":
                # 0 and 0xFFFFFFFF are what streaming writers leave when they cannot seek back
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            else:
                handle.seek(size + (size % 2), os.SEEK_CUR)
    finally:
        handle.seek(0)


def decode_audio(source: bytes | str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode an audio file (path or encoded bytes) with soundfile.

    Returns:
        ``(wave, sampling_rate)``: float32 ``[S]`` for mono, ``[S, C]`` for multi-channel files.

    Raises:
        ValueError: a missing file, empty bytes, undecodable data, or a file with fewer frames than its
            header declares (a truncated WAV, or a FLAC/OGG stream that ends early).
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
        name = os.fspath(source)
        if not os.path.exists(name):
            raise ValueError(f"audio file not found: {name}")
        if os.path.isdir(name):
            raise ValueError(f"audio file expected, got a folder: {name}")
        handle = open(name, "rb")  # noqa: SIM115 - closed below
    else:
        raise ValueError(f"decode_audio takes bytes or a path, got {type(source).__name__}")
    try:
        declared = _wav_declared_frames(handle)
        try:
            with soundfile.SoundFile(handle) as f:
                header_frames = f.frames
                wave = f.read(dtype="float32", always_2d=False)
                sampling_rate = f.samplerate
        except Exception as err:  # soundfile raises LibsndfileError / RuntimeError on bad data
            raise ValueError(f"cannot decode audio {name}: {err}") from err
    finally:
        handle.close()
    expected = max(declared or 0, header_frames if header_frames > 0 else 0)
    if expected and len(wave) < expected:
        raise ValueError(
            f"audio {name} is truncated: its header declares {expected} frames "
            f"({expected / sampling_rate:.3f} s) but only {len(wave)} could be read"
        )
    return wave, int(sampling_rate)


def read_audio(value: Any, sampling_rate: Any = None) -> tuple[Any, Any, bool | None]:
    """One audio value in any accepted form -> ``(samples, sampling_rate, channels_first)``, not yet converted.

    Accepted: a decoded example (an ``AudioDecoder``-like object with ``get_all_samples()``, or a dict with
    ``array`` and ``sampling_rate``), an undecoded one (``Audio(decode=False)``: a dict with ``bytes``
    and/or ``path``), a file path or encoded bytes, or a raw 1-D/2-D array (whose rate is
    ``sampling_rate``). ``channels_first`` is the layout of 2-D samples when the source says it (None:
    guess from the shape).
    """
    if value is None:
        raise ValueError("the audio value is missing (None)")
    if hasattr(value, "get_all_samples"):  # torchcodec AudioDecoder and look-alikes: [C, S]
        samples = value.get_all_samples()
        return samples.data, samples.sample_rate, True
    if isinstance(value, Mapping):
        if value.get("array") is not None:
            rate = value.get("sampling_rate")
            return value["array"], rate if rate is not None else sampling_rate, None
        if value.get("bytes") is not None:
            return (*decode_audio(value["bytes"]), False)
        if value.get("path"):
            return (*decode_audio(value["path"]), False)
        raise ValueError(f"the audio dict has no 'array', 'bytes' or 'path' (keys: {sorted(value)})")
    if isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)):
        return (*decode_audio(value), False)
    return value, sampling_rate, None


def source_name(value: Any, default: str = "audio") -> str:
    """What to call an audio value in messages: its file path when it has one, else ``default``."""
    if isinstance(value, Mapping) and value.get("path") and value.get("array") is None:
        return os.fspath(value["path"])
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return default


# ---------------------------------------------------------------------------------------------- whole paths
def prepare_waveform(
    array: Any,
    sampling_rate: Any,
    target_sampling_rate: int,
    *,
    min_samples: int = 1,
    name: str = "audio",
    channels_first: bool | None = None,
    pcm_dtype: str | None = None,
) -> np.ndarray:
    """Validate and convert any waveform to float32 mono at ``target_sampling_rate``.

    Args:
        array: ``[S]``, ``[C, S]`` or ``[S, C]``, float or integer PCM (see [`to_float_mono`]).
        sampling_rate: rate of ``array`` in Hz (see [`check_sampling_rate`]).
        target_sampling_rate: rate of the result in Hz (resampled with soxr when different).
        min_samples: fewest samples accepted after resampling (e.g. one encoder frame).
        name: how to call this input in error messages (e.g. ``"row 3"``).
        channels_first, pcm_dtype: see [`to_float_mono`].

    Returns:
        ``np.ndarray`` float32 ``[S']``.

    Raises:
        ValueError: every refused case in the module docstring, prefixed by ``name``.
    """
    try:
        rate = check_sampling_rate(sampling_rate)
        wave = to_float_mono(array, channels_first=channels_first, pcm_dtype=pcm_dtype)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    if wave.size == 0:
        raise ValueError(f"{name}: the audio is empty (0 samples)")
    wave = resample(wave, rate, target_sampling_rate)
    if wave.shape[0] < min_samples:
        raise ValueError(
            f"{name}: too short: {wave.shape[0]} samples at {target_sampling_rate} Hz, "
            f"need at least {min_samples} (one encoder frame)"
        )
    return np.ascontiguousarray(wave, dtype=np.float32)


def load_waveform(
    value: Any,
    target_sampling_rate: int,
    *,
    sampling_rate: Any = None,
    pcm_dtype: str | None = None,
    min_samples: int = 1,
    name: str = "audio",
) -> np.ndarray:
    """Any one audio value (see [`read_audio`]) -> float32 mono ``[S]`` at ``target_sampling_rate``.

    The path every dataset cell and audio file takes (transform, embedding cache, evaluation, CLI, demo).
    ``sampling_rate`` is the rate of a raw array (a decoded dict or file brings its own).
    """
    try:
        array, rate, channels_first = read_audio(value, sampling_rate)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    if rate is None:
        raise ValueError(
            f"{name}: a raw audio array carries no sampling rate: give it (a sampling-rate column, "
            "sampling_rate=..., or a dict with 'array' and 'sampling_rate')"
        )
    return prepare_waveform(
        array, rate, target_sampling_rate, min_samples=min_samples, name=name,
        channels_first=channels_first, pcm_dtype=pcm_dtype,
    )  # fmt: skip


def _is_number_sequence(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(v, (numbers.Number, np.generic)) for v in value)
    )


def _check_padding_mask(mask: np.ndarray, row: int) -> None:
    valid = np.flatnonzero(mask)
    if valid.size and valid[-1] - valid[0] + 1 != valid.size:
        holes = int(valid[-1] - valid[0] + 1 - valid.size)
        raise ValueError(
            f"padding_mask row {row} has holes: its real samples ({valid.size}) are not one contiguous run "
            f"({holes} padded samples between sample {valid[0]} and {valid[-1]}). A padding mask marks the "
            "real samples of each clip, padding on one side only"
        )


def prepare_batch(
    input_values: Any,
    padding_mask: Any = None,
    *,
    sampling_rate: Any,
    target_sampling_rate: int,
    min_samples: int = 1,
    pcm_dtype: str | None = None,
) -> list[np.ndarray]:
    """The raw-audio input of ``GemmaRVQModel.embed`` / ``encode`` -> float32 mono clips at the model's rate.

    Args:
        input_values: ``[B, S]`` tensor/array (with ``padding_mask [B, S]``, True = real sample), a 1-D
            waveform ``[S]`` (tensor, array or list of numbers), or a list of waveforms of any length
            (1-D, or 2-D multi-channel: downmixed).
        padding_mask: ``[B, S]`` (or ``[S]`` with a 1-D input), one contiguous run of True per row.
        sampling_rate: rate of the input in Hz. ``None`` warns (as transformers' feature extractors do)
            and takes the input to be at ``target_sampling_rate``.
        target_sampling_rate, min_samples: the encoder's rate and the fewest samples it can encode.
        pcm_dtype: declared width of integer samples (see [`to_float_mono`]).

    Returns:
        ``list`` of float32 ``[S_i]``, one per clip.
    """
    if sampling_rate is None:
        warnings.warn(
            MISSING_SAMPLING_RATE_WARNING.format(rate=target_sampling_rate), AudioInputWarning, stacklevel=4
        )
        sampling_rate = target_sampling_rate
    else:
        sampling_rate = check_sampling_rate(sampling_rate)
    if isinstance(input_values, (torch.Tensor, np.ndarray)) or _is_number_sequence(input_values):
        if not isinstance(input_values, (torch.Tensor, np.ndarray)):
            input_values = np.asarray(input_values)
        if input_values.ndim == 1:
            rows = [input_values]
        elif input_values.ndim == 2:
            rows = list(input_values)
        else:
            raise ValueError(
                f"input_values must be [B, S] or a list of 1-D waveforms, got shape {tuple(input_values.shape)}"
            )
        if padding_mask is not None:
            mask = _as_numpy(padding_mask)
            if mask.ndim == 1:
                mask = mask[None]
            if mask.shape != (len(rows), rows[0].shape[-1]):
                raise ValueError(
                    f"padding_mask shape {tuple(_as_numpy(padding_mask).shape)} does not match input_values "
                    f"{tuple(input_values.shape)}"
                )
            mask = mask.astype(bool)
            for i, m in enumerate(mask):
                _check_padding_mask(m, i)
            rows = [row[torch.from_numpy(m) if isinstance(row, torch.Tensor) else m] for row, m in zip(rows, mask)]
    elif isinstance(input_values, (list, tuple)):
        if len(input_values) == 0:
            raise ValueError("input_values is an empty list")
        if padding_mask is not None:
            raise ValueError("padding_mask is only meaningful with a padded [B, S] tensor, not a list")
        rows = list(input_values)
    else:
        raise ValueError(
            f"input_values must be a tensor/array [B, S] or a list of waveforms, got {type(input_values).__name__}"
        )
    return [
        prepare_waveform(row, sampling_rate, target_sampling_rate, min_samples=min_samples, name=f"input {i}",
                         pcm_dtype=pcm_dtype)
        for i, row in enumerate(rows)
    ]


def undecoded(dataset: Any, column: str) -> Any:
    """``dataset`` with an ``Audio`` ``column`` cast to ``Audio(decode=False)``, so that this module decodes
    it (datasets decodes audio only through torchcodec); anything else is returned unchanged."""
    try:
        from datasets import Audio
    except ImportError:  # pragma: no cover - datasets is a dependency of gemma-rvq
        return dataset
    features = getattr(dataset, "features", None)
    if features is not None and isinstance(features.get(column), Audio) and features[column].decode:
        return dataset.cast_column(column, Audio(decode=False))
    return dataset


__all__ = [
    "FLOAT_PEAK_LIMIT",
    "MAX_SAMPLING_RATE",
    "MIN_SAMPLING_RATE",
    "PCM_DTYPES",
    "AudioInputWarning",
    "check_pcm_dtype",
    "check_sampling_rate",
    "decode_audio",
    "load_waveform",
    "prepare_batch",
    "prepare_waveform",
    "read_audio",
    "resample",
    "source_name",
    "to_float_mono",
    "undecoded",
]
