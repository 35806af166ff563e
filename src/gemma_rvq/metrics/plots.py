"""PNG plots of RVQ quality: per-level code usage and the error after the first k levels.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .functional import perplexity_from_counts, utilization_from_counts

__all__ = ["plot_code_usage", "plot_level_errors"]


def _figure(rows: int, cols: int, panel_size: tuple[float, float]) -> tuple[Any, Any]:
    from ..extras import require

    require("matplotlib", "metric plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: str | os.PathLike, dpi: int) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"plots are written as PNG: the path must end in .png, got {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def plot_code_usage(
    counts: Any,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    max_cols: int = 4,
    log_scale: bool = True,
    dpi: int = 100,
) -> str:
    """Sorted code-usage histograms, one panel per RVQ level.

    Levels are numbered 1..Q, as on the model card and in the report (codes ``[B, Q, T]`` index them 0..Q-1).
    Each panel shows the level's code counts sorted from most to least used (a flat curve = even use, a
    long tail at zero = dead codes); its title gives the level's utilization and perplexity.

    Args:
        counts: ``[Q, K]`` code counts (e.g. ``functional.code_counts`` or ``RVQStatsAccumulator.counts``).
        path: output ``.png`` file.
        log_scale: logarithmic count axis (zero counts are drawn at the bottom edge).

    Returns:
        ``path`` as a string.
    """
    counts = torch.as_tensor(counts).detach().cpu()
    if counts.dim() == 1:
        counts = counts.unsqueeze(0)
    if counts.dim() != 2 or counts.shape[1] == 0:
        raise ValueError(f"counts must be [Q, K], got shape {list(counts.shape)}")
    q, k = counts.shape
    utilization = utilization_from_counts(counts, per_level=True)
    perplexity = perplexity_from_counts(counts, per_level=True)
    cols = min(q, max_cols)
    fig, axes = _figure(math.ceil(q / cols), cols, (3.6, 2.6))
    ranks = torch.arange(1, k + 1).numpy()
    for level in range(q):
        ax = axes[level // cols][level % cols]
        sorted_counts = counts[level].double().sort(descending=True).values.numpy()
        ax.fill_between(ranks, sorted_counts, step="post", alpha=0.6)
        ax.plot(ranks, sorted_counts, drawstyle="steps-post", linewidth=0.8)
        if log_scale and sorted_counts.max() > 0:
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlim(1, k)
        ax.set_title(
            f"level {level + 1}: util {utilization[level]:.1%}, ppl {perplexity[level]:.0f}/{k}", fontsize=9
        )
        ax.set_xlabel("code rank")
        ax.set_ylabel("count")
    for empty in range(q, len(axes) * cols):
        axes[empty // cols][empty % cols].set_visible(False)
    fig.suptitle(
        title
        or f"code usage: mean util {sum(utilization) / q:.1%}, mean ppl {sum(perplexity) / q:.0f} of {k}"
    )
    return _save(fig, path, dpi)


def plot_level_errors(
    errors_per_level: Sequence[float] | Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    ylabel: str = "error",
    dpi: int = 100,
) -> str:
    """Reconstruction error after using the first k levels, k = 1..Q.

    Args:
        errors_per_level: one curve (``[e_1, ..., e_Q]``) or a mapping name -> curve, drawn one panel per
            name (the output of ``functional.per_level_errors`` works as is; its ``num_quantizers`` entry
            is used as the x axis, not drawn).
        path: output ``.png`` file.
        ylabel: y-axis label of a single curve.

    Returns:
        ``path`` as a string.
    """
    if isinstance(errors_per_level, Mapping):
        curves = {name: list(v) for name, v in errors_per_level.items() if name != "num_quantizers"}
    else:
        curves = {ylabel: list(errors_per_level)}
    if not curves or any(len(v) == 0 for v in curves.values()):
        raise ValueError("errors_per_level must hold at least one non-empty curve")
    for name, values in curves.items():
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise ValueError(f"curve {name!r} must hold finite numbers")
    fig, axes = _figure(1, len(curves), (3.6, 2.8))
    for ax, (name, values) in zip(axes[0], curves.items()):
        levels = list(range(1, len(values) + 1))
        ax.plot(levels, values, marker="o")
        ax.set_xticks(levels)
        ax.set_xlabel("levels used (k)")
        ax.set_ylabel(name)
        ax.set_title(f"{name}: {values[0]:.4g} -> {values[-1]:.4g}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "reconstruction error after the first k levels")
    return _save(fig, path, dpi)
