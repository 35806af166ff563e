"""Accepted values of the quantizer settings: one table, read by `GemmaRVQConfig` and `ResidualQuantizer`.

`GemmaRVQConfig` turns each entry into a `@strict` field validator (so a bad value in a config.json is
refused when the config is built), and `ResidualQuantizer` checks its constructor arguments against the
same entries, so the two can never accept different ranges.

This file is copied next to saved checkpoints (remote code): it imports only the standard library.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CODEBOOK_TYPES = ("ema", "learnable")


@dataclass(frozen=True)
class Bound:
    """An accepted range: a number (``int`` or any real) in ``[low, high]``, either end open or absent."""

    kind: type  # int: an int (not a bool); float: an int or float, finite
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None is accepted

    def describe(self) -> str:
        what = "an int" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            span = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            return f"{what} in {span}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {self.high:g}"
        return what

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


#: setting name -> accepted values. Shared by the config fields of the same name and the quantizer.
BOUNDS: dict[str, Bound] = {
    "dim": Bound(int, low=1),
    "codebook_dim": Bound(int, low=1, optional=True),  # None: same as dim (config only)
    "num_quantizers": Bound(int, low=1),
    "codebook_size": Bound(int, low=2),
    "search_chunk_size": Bound(int, low=1),
    "ema_decay": Bound(float, low=0.0, high=1.0, high_open=True),
    "eps": Bound(float, low=0.0, low_open=True),
    "dead_code_threshold": Bound(float, low=0.0),
    "balance_weight": Bound(float, low=0.0),
    "commitment_weight": Bound(float, low=0.0),
    "mse_weight": Bound(float, low=0.0),
    "cosine_weight": Bound(float, low=0.0),
    "max_chunk_seconds": Bound(float, low=0.0, low_open=True),
    "chunk_overlap_seconds": Bound(float, low=0.0),
    "layer_norm_eps": Bound(float, low=0.0, low_open=True),
    "initializer_range": Bound(float, low=0.0),
    "encoder_layer": Bound(int, low=0, optional=True),
}


def check(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` when ``value`` is outside ``BOUNDS[name]``."""
    bound = BOUNDS[name]
    if not bound.accepts(value):
        extra = " or None" if bound.optional else ""
        raise ValueError(f"{name} must be {bound.describe()}{extra}, got {value!r}")


def validator(name: str) -> Callable[[Any], None]:
    """A one-argument validator for ``huggingface_hub.dataclasses.validated_field`` (raises ``ValueError``)."""

    def _validate(value: Any) -> None:
        check(name, value)

    _validate.__name__ = f"check_{name}"
    return _validate


def check_codebook_type(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``CODEBOOK_TYPES``."""
    if value not in CODEBOOK_TYPES:
        raise ValueError(f"codebook_type must be one of {CODEBOOK_TYPES}, got {value!r}")


def check_quantizer(
    *,
    dim: int,
    num_quantizers: int,
    codebook_size: int,
    codebook_type: str,
    ema_decay: float,
    eps: float,
    dead_code_threshold: float,
    balance_weight: float,
    search_chunk_size: int,
) -> None:
    """Check every `ResidualQuantizer` setting (``dim`` is the code dimension Dc); ``ValueError`` names the first
    bad one."""
    for name, value in (("dim", dim), ("num_quantizers", num_quantizers), ("codebook_size", codebook_size),
                        ("search_chunk_size", search_chunk_size), ("ema_decay", ema_decay), ("eps", eps),
                        ("dead_code_threshold", dead_code_threshold), ("balance_weight", balance_weight)):
        check(name, value)
    check_codebook_type(codebook_type)
    if balance_weight > 0 and codebook_type != "ema":
        raise ValueError(f"balance_weight applies to EMA codebooks only (codebook_type='ema'), got "
                         f"codebook_type={codebook_type!r}")


__all__ = ["BOUNDS", "CODEBOOK_TYPES", "Bound", "check", "check_codebook_type", "check_quantizer", "validator"]
