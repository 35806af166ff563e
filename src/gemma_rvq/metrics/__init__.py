"""Quality metrics of RVQ speech tokenizers.

* :mod:`gemma_rvq.metrics.functional`: the math, plain torch, mask-aware, plus ``RVQStatsAccumulator``.
* evaluate modules shipped inside the package (``modules/<name>/<name>.py``, each with its card):
  ``reconstruction_mse``, ``cosine_similarity``, ``codebook_utilization``, ``codebook_perplexity``,
  ``rvq_quality``. Load them with :func:`load` or ``evaluate.load(module_path(name))``.
* :mod:`gemma_rvq.metrics.plots`: code-usage histograms and per-level error curves (imported lazily).

Definitions are stated in ``functional``'s docstring and in docs/metrics.md.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .functional import (
    RVQStatsAccumulator,
    batch_utilization,
    centred_cosine,
    code_counts,
    codebook_perplexity,
    codebook_utilization,
    cosine_similarity,
    expected_batch_utilization,
    flatten_valid,
    fvu,
    mse,
    nmse,
    per_level_errors,
    perplexity_from_counts,
    pooled_perplexity,
    reconstruction_metrics,
    utilization_from_counts,
)

if TYPE_CHECKING:
    import evaluate

METRICS: tuple[str, ...] = (
    "reconstruction_mse",
    "cosine_similarity",
    "codebook_utilization",
    "codebook_perplexity",
    "rvq_quality",
    "unit_error_rate",  # stage 2: generated units vs the audio's units
)

__all__ = [
    "METRICS",
    "RVQStatsAccumulator",
    "batch_utilization",
    "centred_cosine",
    "code_counts",
    "codebook_perplexity",
    "codebook_utilization",
    "cosine_similarity",
    "expected_batch_utilization",
    "flatten_valid",
    "fvu",
    "load",
    "module_path",
    "mse",
    "nmse",
    "per_level_errors",
    "perplexity_from_counts",
    "pooled_perplexity",
    "reconstruction_metrics",
    "unpad_codes",
    "unpad_frames",
    "utilization_from_counts",
]

_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modules")


def module_path(name: str) -> str:
    """Folder of the evaluate module ``name`` shipped in the package (``evaluate.load`` accepts it).

    The module imports ``gemma_rvq.metrics.functional``, so loading it needs gemma-rvq installed; the Hub
    Space written by :func:`gemma_rvq.hub.push_metric` is self-contained instead.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
    return os.path.join(_MODULES_DIR, name)


def load(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` one of the package's metrics.

    Keyword arguments go to ``evaluate.load``: its own (``experiment_id``, ``keep_in_memory``,
    ``cache_dir``, ``num_process``, ``process_id``...) and the metric's options, which evaluate passes to
    the metric's constructor (e.g. ``codebook_size=2048``, ``batch_frames=...``, ``mean=...``). The same
    options may also be given to ``compute`` and then override the loaded ones. Unknown options raise
    ``ValueError``.

    >>> perplexity = load("codebook_perplexity", codebook_size=2048)  # doctest: +SKIP
    """
    from ..extras import require

    evaluate = require("evaluate", "the evaluate metric modules")

    return evaluate.load(module_path(name), **kwargs)


def unpad_frames(embeddings: Any, mask: Any | None = None) -> list[np.ndarray]:
    """``[B, T, D]`` (+ mask ``[B, T]``) -> B float32 arrays ``[T_b, D]`` of the valid frames.

    The per-example layout the evaluate modules take as ``predictions`` / ``references``.
    """
    x = torch.as_tensor(embeddings).detach().float().cpu()
    if x.dim() != 3:
        raise ValueError(f"embeddings must be [B, T, D], got shape {list(x.shape)}")
    m = _mask(mask, x.shape[:2])
    return [x[b][m[b]].numpy() for b in range(x.shape[0])]


def unpad_codes(codes: Any, mask: Any | None = None) -> list[np.ndarray]:
    """``[B, Q, T]`` (+ mask ``[B, T]``) -> B int64 arrays ``[Q, T_b]`` of the valid frames' codes."""
    c = torch.as_tensor(codes).detach().cpu()
    if c.dim() != 3:
        raise ValueError(f"codes must be [B, Q, T], got shape {list(c.shape)}")
    m = _mask(mask, (c.shape[0], c.shape[2]))
    return [c[b][:, m[b]].long().numpy() for b in range(c.shape[0])]


def _mask(mask: Any | None, shape: tuple[int, ...]) -> torch.Tensor:
    if mask is None:
        return torch.ones(tuple(shape), dtype=torch.bool)
    m = torch.as_tensor(mask).detach().cpu()
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {list(shape)}, got {list(m.shape)}")
    return m.bool()
