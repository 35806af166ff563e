"""The options of a :class:`~gemma_rvq.transforms.SpeechTokenizer`, declared once.

Every option is a field of :class:`SpeechTokenizerOptions` made with :func:`option`, which must say
whether the option changes the transform's output (``changes_output=True``: part of the ``datasets``
cache identity) or only how the work is done (batching, device, threads). A pickled transform carries
every field, so a ``num_proc`` worker always sees every option: there is no second list to forget.
``SpeechTokenizer.__init__`` takes exactly these fields as keywords (checked when ``transforms`` is
imported).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch

ON_ERROR = ("raise", "skip")


def option(default: Any, *, changes_output: bool) -> Any:
    """A ``SpeechTokenizerOptions`` field; ``changes_output`` is required (no default on purpose)."""
    return dataclasses.field(default=default, metadata={"changes_output": changes_output})


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """``"bfloat16"`` for ``torch.bfloat16`` / ``"torch.bfloat16"`` / ``"bfloat16"``; ``"auto"`` and None
    as they are; ValueError for anything else, or a dtype that is not floating point."""
    if dtype is None or dtype == "auto":
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: expected 'auto', None or a floating dtype such as 'bfloat16'")
    if not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point dtype: the encoder computes in floats")
    return name


@dataclass
class SpeechTokenizerOptions:
    """Every option of ``SpeechTokenizer`` (documented there), validated and normalised on creation."""

    audio_column: str = option("audio", changes_output=True)
    sampling_rate_column: str | None = option(None, changes_output=True)
    sampling_rate: int | None = option(None, changes_output=True)
    pcm_dtype: str | None = option(None, changes_output=True)
    output_column: str = option("semantic_tokens", changes_output=True)
    return_codes: bool = option(False, changes_output=True)
    codes_column: str = option("audio_codes", changes_output=True)
    return_num_frames: bool = option(False, changes_output=True)
    num_frames_column: str = option("num_frames", changes_output=True)
    error_column: str | None = option(None, changes_output=True)
    batch_size: int | str = option("auto", changes_output=False)
    batch_seconds: float = option(60.0, changes_output=False)
    max_padding: float = option(0.1, changes_output=False)
    cpu_streams: int | str = option("auto", changes_output=False)
    device: str | None = option(None, changes_output=False)
    dtype: str | None = option("auto", changes_output=True)
    on_error: str = option("raise", changes_output=True)
    num_quantizers: int | None = option(None, changes_output=True)
    num_threads: int | None = option(None, changes_output=False)

    def __post_init__(self) -> None:
        from .audio import check_pcm_dtype, check_sampling_rate

        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if not (self.batch_size == "auto" or (_is_int(self.batch_size) and self.batch_size >= 1)):
            raise ValueError(f"batch_size must be a positive int or 'auto', got {self.batch_size!r}")
        if not (self.cpu_streams == "auto" or (_is_int(self.cpu_streams) and self.cpu_streams >= 1)):
            raise ValueError(f"cpu_streams must be a positive int or 'auto', got {self.cpu_streams!r}")
        if not self.batch_seconds > 0:
            raise ValueError(f"batch_seconds must be > 0, got {self.batch_seconds!r}")
        if not 0.0 <= self.max_padding < 1.0:
            raise ValueError(f"max_padding must be in [0, 1), got {self.max_padding!r}")
        if self.num_quantizers is not None and not (_is_int(self.num_quantizers) and self.num_quantizers >= 1):
            raise ValueError(f"num_quantizers must be a positive int or None, got {self.num_quantizers!r}")
        if self.num_threads is not None and not (_is_int(self.num_threads) and self.num_threads >= 1):
            raise ValueError(f"num_threads must be a positive int or None, got {self.num_threads!r}")
        if self.sampling_rate is not None:
            self.sampling_rate = check_sampling_rate(self.sampling_rate)
        self.pcm_dtype = check_pcm_dtype(self.pcm_dtype)
        self.error_column = self.error_column or f"{self.output_column}_error"
        self.batch_seconds = float(self.batch_seconds)
        self.max_padding = float(self.max_padding)
        self.device = str(self.device) if self.device is not None else None
        self.dtype = dtype_name(self.dtype)

    def output_options(self) -> dict[str, Any]:
        """The options that change the output: part of the cache identity."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["changes_output"]}

    def runtime_options(self) -> dict[str, Any]:
        """The options that only change how the work is done: they travel to workers, outside the identity."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata["changes_output"]}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_declared(cls: type = SpeechTokenizerOptions) -> None:
    """Every field must come from :func:`option` (and so say whether it changes the output)."""
    for f in dataclasses.fields(cls):
        if "changes_output" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} must be declared with option(..., changes_output=...)")


check_declared()

OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SpeechTokenizerOptions))


def check_keywords(init: Any, besides: tuple[str, ...] = ()) -> None:
    """``init`` (``SpeechTokenizer.__init__``) must take exactly the declared options as keywords, plus
    ``besides``: an option added to one and not the other fails at import, not silently in workers."""
    keywords = set(inspect.signature(init).parameters) - set(besides)
    if keywords != set(OPTION_NAMES):
        raise TypeError(
            "SpeechTokenizer.__init__ and SpeechTokenizerOptions disagree: undeclared keywords "
            f"{sorted(keywords - set(OPTION_NAMES))}, declared options it does not take "
            f"{sorted(set(OPTION_NAMES) - keywords)}. Declare every option with option(..., changes_output=...)"
        )

__all__ = ["OPTION_NAMES", "SpeechTokenizerOptions", "check_declared", "check_keywords", "dtype_name", "option"]
