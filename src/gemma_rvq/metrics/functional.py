"""Quality metrics of a residual vector quantizer, in plain torch.

Every function is mask-aware: padded frames are never counted. Embeddings come either as ``[B, T, D]``
with an optional mask ``[B, T]`` (True = valid frame) or already flat as ``[N, D]`` (every row valid);
codes come as ``[B, Q, T]`` with an optional mask ``[B, T]``. Sums are accumulated in float64 and every
result is a Python ``float`` (``list[float]`` per level), so the numbers are JSON-ready.

Definitions (x = target frame, x̂ = reconstruction, sums run over the N valid frames, D = feature dim,
μ = mean of the valid target frames):

* ``mse``              Σ ||x - x̂||² / (N·D)                      mean squared error per element
* ``nmse``             Σ ||x - x̂||² / Σ ||x||²                   error relative to the target's energy
* ``fvu``              Σ ||x - x̂||² / Σ ||x - μ||²               fraction of variance unexplained
                                                                  (predicting μ everywhere scores 1.0)
* ``cosine_similarity``  (1/N) Σ cos(x̂, x)
* ``centred_cosine``     (1/N) Σ cos(x̂ - μ, x - μ)                both centred by the target mean
* ``code_counts``       per level q and code k, how many valid frames chose k: LongTensor ``[Q, K]``
* utilization           per codebook: fraction of its K entries used at least once; then averaged
* perplexity            per codebook: exp(H), H = -Σ_k p_k ln p_k of its code histogram; then averaged
* ``unit_error_rate``   edit distance of generated units (stage 2) to the audio's units / reference units

Raw cosine and NMSE are inflated by the large constant offset of speech features (on log-mel stacks the
mean vector alone scores cosine 0.78); FVU and centred cosine measure what the codes actually explain.

This file imports nothing but torch, so it can be vendored beside a metric module on the Hub.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "RVQStatsAccumulator",
    "batch_utilization",
    "centred_cosine",
    "character_error_rate",
    "check_pairs",
    "code_counts",
    "code_metrics_from_counts",
    "codebook_perplexity",
    "codebook_utilization",
    "codes_input",
    "cosine_similarity",
    "edit_distance",
    "expected_batch_utilization",
    "flatten_valid",
    "fvu",
    "mse",
    "nmse",
    "per_level_errors",
    "perplexity_from_counts",
    "pooled_perplexity",
    "reconstruction_metrics",
    "reject_unknown_options",
    "stack_codes",
    "stack_frames",
    "unit_error_rate",
    "utilization_from_counts",
    "valid_codes",
]


# --------------------------------------------------------------------------------------------------
# input handling


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a tensor or array-like, got {type(x).__name__}: {err}") from None


def _as_mask(mask: Any, shape: tuple[int, ...], name: str) -> Tensor:
    mask = _as_tensor(mask, name)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(f"{name} must be boolean (True = valid frame), got dtype {mask.dtype}")
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{name} must hold only 0/1 or True/False values")
        mask = mask.bool()
    return mask


def flatten_valid(x: Any, mask: Any | None = None, *, name: str = "embeddings") -> Tensor:
    """Gather the valid frames.

    Args:
        x: ``[B, T, D]`` frames, or ``[N, D]`` frames that are all valid.
        mask: ``[B, T]`` (True = valid) for 3-D ``x``, ``[N]`` for 2-D ``x``, or None (all valid).

    Returns:
        ``[N, D]`` floating tensor of the valid frames, in batch-major then time order.
    """
    x = _as_tensor(x, name)
    if not (x.dtype.is_floating_point):
        x = x.float()
    if x.dim() == 3:
        if mask is None:
            return x.reshape(-1, x.shape[-1])
        return x[_as_mask(mask, tuple(x.shape[:2]), f"mask of {name}")]
    if x.dim() == 2:
        if mask is None:
            return x
        return x[_as_mask(mask, (x.shape[0],), f"mask of {name}")]
    raise ValueError(f"{name} must be [B, T, D] (with mask [B, T]) or flat [N, D], got shape {list(x.shape)}")


def _pair(prediction: Any, target: Any, mask: Any | None) -> tuple[Tensor, Tensor]:
    pred = _as_tensor(prediction, "prediction")
    tgt = _as_tensor(target, "target")
    if pred.shape != tgt.shape:
        raise ValueError(
            f"prediction {list(pred.shape)} and target {list(tgt.shape)} must have the same shape"
        )
    pred = flatten_valid(pred, mask, name="prediction")
    tgt = flatten_valid(tgt, mask, name="target")
    if pred.shape[0] == 0:
        raise ValueError("no valid frames: every frame is masked out (or the input is empty)")
    if not (torch.isfinite(pred).all() and torch.isfinite(tgt).all()):
        raise ValueError("prediction/target contain NaN or inf in valid frames")
    return pred, tgt


def _mean_vector(mean: Any, dim: int) -> Tensor:
    mean = _as_tensor(mean, "mean").double().reshape(-1)
    if mean.numel() != dim:
        raise ValueError(f"mean must have {dim} elements (the feature dim), got {mean.numel()}")
    return mean


def _is_empty(example: Any) -> bool:
    try:
        return len(example) == 0
    except TypeError:
        return False


def stack_frames(examples: Sequence[Any], *, name: str = "predictions") -> Tensor:
    """Concatenate per-example frames ``[T_i, D]`` (arrays, tensors or nested lists) into ``[N, D]``.

    The ragged layout used by the evaluate modules: one example per row, its valid frames only (the
    mask is implied by the lengths). An example with no frames may be ``[]``.
    """
    parts, dim = [], None
    for i, ex in enumerate(examples):
        if _is_empty(ex):  # no frames (datasets may hand these back as object arrays)
            continue
        try:
            t = torch.as_tensor(ex, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name}[{i}] is not a rectangular [T, D] array of numbers") from None
        if t.dim() != 2:
            raise ValueError(f"{name}[{i}] must be [T, D] (frames x features), got shape {list(t.shape)}")
        if dim is not None and t.shape[1] != dim:
            raise ValueError(f"{name}[{i}] has feature dim {t.shape[1]}, earlier rows have {dim}")
        dim = t.shape[1]
        parts.append(t)
    if not parts:
        raise ValueError(f"{name}: no frames")
    return torch.cat(parts)


def stack_codes(examples: Sequence[Any], *, name: str = "predictions") -> Tensor:
    """Concatenate per-example codes ``[Q, T_i]`` into a ``[1, Q, N]`` batch (valid frames only)."""
    parts, levels = [], None
    for i, ex in enumerate(examples):
        try:
            t = torch.as_tensor(ex)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name}[{i}] is not a rectangular [Q, T] array of codes") from None
        if t.dim() != 2:
            raise ValueError(f"{name}[{i}] must be [Q, T] (levels x frames), got shape {list(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            if t.numel():
                raise ValueError(f"{name}[{i}] must hold integer codes, got dtype {t.dtype}")
            t = t.long()
        if levels is not None and t.shape[0] != levels:
            raise ValueError(f"{name}[{i}] has {t.shape[0]} levels, earlier rows have {levels}")
        levels = t.shape[0]
        parts.append(t.long())
    if not parts:
        raise ValueError(f"{name}: no examples")
    return torch.cat(parts, dim=1).unsqueeze(0)


def codes_input(metric: str, predictions: Any, references: Any, codes: Any) -> Any:
    """The codes given to a codes-only evaluate module under either name (``codes=`` or evaluate's
    ``predictions=``); refuses both at once and ``references`` (which such a module does not take)."""
    if references is not None:
        raise ValueError(f"{metric} scores codes only: pass them as codes= (or predictions=), without references")
    if predictions is not None and codes is not None:
        raise ValueError(f"{metric}: pass the codes once, as codes= or as predictions=, not both")
    return codes if codes is not None else predictions


def reject_unknown_options(metric: str, unknown: Mapping[str, Any], known: Sequence[str]) -> None:
    """A clear error for a misspelt ``compute`` option (evaluate forwards any extra keyword to ``_compute``)."""
    if unknown:
        allowed = ", ".join(f"`{k}`" for k in known) or "none"
        raise ValueError(f"{metric}: unknown option(s) {sorted(unknown)}; its options are {allowed}")


def check_pairs(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    """Raise a ValueError naming the first row whose prediction and reference shapes differ."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    for i, (p, r) in enumerate(zip(predictions, references)):
        if _is_empty(p) and _is_empty(r):
            continue
        ps = (0,) if _is_empty(p) else tuple(torch.as_tensor(p).shape)
        rs = (0,) if _is_empty(r) else tuple(torch.as_tensor(r).shape)
        if ps != rs:
            raise ValueError(f"row {i}: prediction shape {list(ps)} != reference shape {list(rs)}")


# --------------------------------------------------------------------------------------------------
# reconstruction


def _sq_error(pred: Tensor, tgt: Tensor) -> float:
    return float((pred - tgt).pow(2).sum(-1).double().sum())


def mse(prediction: Any, target: Any, mask: Any | None = None) -> float:
    """Mean squared error per element over valid frames: Σ ||x - x̂||² / (N·D).

    Args:
        prediction: reconstruction x̂, ``[B, T, D]`` or ``[N, D]``.
        target: original frames x, same shape.
        mask: ``[B, T]`` (True = valid), optional.
    """
    pred, tgt = _pair(prediction, target, mask)
    return _sq_error(pred, tgt) / (pred.shape[0] * pred.shape[1])


def nmse(prediction: Any, target: Any, mask: Any | None = None) -> float:
    """Normalised MSE: Σ ||x - x̂||² / Σ ||x||² (a ratio of sums over valid frames, not a mean of ratios)."""
    pred, tgt = _pair(prediction, target, mask)
    energy = float(tgt.pow(2).sum(-1).double().sum())
    if energy == 0.0:
        raise ValueError("nmse is undefined: the target frames are all zero")
    return _sq_error(pred, tgt) / energy


def _centred_energy(tgt: Tensor, mean: Tensor | None) -> float:
    mu = tgt.double().mean(0) if mean is None else mean
    return float((tgt.double() - mu).pow(2).sum())


def fvu(prediction: Any, target: Any, mask: Any | None = None, *, mean: Any | None = None) -> float:
    """Fraction of variance unexplained: Σ ||x - x̂||² / Σ ||x - μ||².

    μ is the mean of the valid target frames unless ``mean`` (``[D]``) is given. 0 is perfect; predicting
    μ for every frame scores 1.
    """
    pred, tgt = _pair(prediction, target, mask)
    mu = None if mean is None else _mean_vector(mean, tgt.shape[1]).to(tgt.device)
    variance = _centred_energy(tgt, mu)
    if variance == 0.0:
        raise ValueError("fvu is undefined: the target frames have zero variance around their mean")
    return _sq_error(pred, tgt) / variance


def _cosine_sum(a: Tensor, b: Tensor, eps: float) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=eps).double().sum())


def cosine_similarity(prediction: Any, target: Any, mask: Any | None = None, *, eps: float = 1e-8) -> float:
    """Mean over valid frames of cos(x̂, x) (``torch.nn.functional.cosine_similarity`` per frame)."""
    pred, tgt = _pair(prediction, target, mask)
    return _cosine_sum(pred, tgt, eps) / pred.shape[0]


def centred_cosine(
    prediction: Any, target: Any, mask: Any | None = None, *, mean: Any | None = None, eps: float = 1e-8
) -> float:
    """Mean over valid frames of cos(x̂ - μ, x - μ); μ = mean of the valid target frames unless given."""
    pred, tgt = _pair(prediction, target, mask)
    mu = tgt.double().mean(0) if mean is None else _mean_vector(mean, tgt.shape[1])
    mu = mu.to(device=pred.device, dtype=pred.dtype)
    return _cosine_sum(pred - mu, tgt - mu, eps) / pred.shape[0]


# --------------------------------------------------------------------------------------------------
# codes


def valid_codes(codes: Any, mask: Any | None = None) -> Tensor:
    """Codes of the valid frames: ``[B, Q, T]`` (+ mask ``[B, T]``) -> ``[Q, N]`` long.

    The quantizer's flat ``[N, Q]`` layout is accepted as ``codes.T[None]`` (a ``[1, Q, N]`` batch).
    """
    codes = _as_tensor(codes, "codes")
    if codes.dim() != 3:
        raise ValueError(
            f"codes must be [B, Q, T] (with mask [B, T]), got shape {list(codes.shape)}; "
            "pass flat quantizer codes [N, Q] as codes.T[None]"
        )
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    codes = codes.long().transpose(0, 1)  # [Q, B, T]
    if mask is None:
        return codes.reshape(codes.shape[0], -1)
    m = _as_mask(mask, (codes.shape[1], codes.shape[2]), "codes mask")
    return codes[:, m]


def _check_codebook_size(codebook_size: Any) -> int:
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
        raise ValueError(f"codebook_size must be a positive int, got {codebook_size!r}")
    return codebook_size


def _counts_of(flat: Tensor, codebook_size: int) -> Tensor:
    """``[Q, N]`` codes -> ``[Q, K]`` counts."""
    if flat.numel() and (flat.min() < 0 or flat.max() >= codebook_size):
        bad = flat[(flat < 0) | (flat >= codebook_size)][0].item()
        raise ValueError(f"code {bad} out of range for codebook_size {codebook_size} (valid frames only)")
    q = flat.shape[0]
    offsets = torch.arange(q, device=flat.device).unsqueeze(1) * codebook_size
    return (
        torch.bincount((flat + offsets).reshape(-1), minlength=q * codebook_size).view(q, codebook_size).cpu()
    )


def code_counts(codes: Any, mask: Any | None = None, *, codebook_size: int) -> Tensor:
    """Per-level code histogram over the valid frames.

    Args:
        codes: ``[B, Q, T]`` integer codes (padded positions may hold anything, e.g. 0 or -1).
        mask: ``[B, T]`` (True = valid), optional.
        codebook_size: K.

    Returns:
        LongTensor ``[Q, K]`` (on CPU); ``counts[q, k]`` = number of valid frames whose level-q code is k.
    """
    return _counts_of(valid_codes(codes, mask), _check_codebook_size(codebook_size))


def _as_counts(counts: Any) -> Tensor:
    counts = _as_tensor(counts, "counts")
    if counts.dim() == 1:
        counts = counts.unsqueeze(0)
    if counts.dim() != 2:
        raise ValueError(f"counts must be [Q, K] (or [K]), got shape {list(counts.shape)}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    return counts.double()


def _reduce(per_level: Tensor, per_level_out: bool) -> float | list[float]:
    return [float(v) for v in per_level] if per_level_out else float(per_level.mean())


def utilization_from_counts(counts: Any, *, per_level: bool = False) -> float | list[float]:
    """Per codebook, the fraction of its K entries used at least once; then averaged over codebooks.

    Args:
        counts: ``[Q, K]`` (or ``[K]``) code counts.
        per_level: return the ``Q`` per-codebook values instead of their mean.
    """
    counts = _as_counts(counts)
    return _reduce((counts > 0).double().mean(-1), per_level)


def _entropy(counts: Tensor) -> Tensor:
    """``[Q, K]`` counts -> ``[Q]`` entropies in nats (0·ln 0 = 0)."""
    totals = counts.sum(-1, keepdim=True)
    if (totals == 0).any():
        raise ValueError("perplexity is undefined for a codebook with no counted frames")
    p = counts / totals
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def perplexity_from_counts(counts: Any, *, per_level: bool = False) -> float | list[float]:
    """Per codebook exp(entropy) (natural log) of its code histogram; then averaged over codebooks.

    Ranges from 1 (one code always) to the number of used codes (uniform over them) <= K.
    """
    return _reduce(_entropy(_as_counts(counts)).exp(), per_level)


def pooled_perplexity(counts: Any) -> float:
    """exp(entropy) of the histogram pooled over all levels (``counts.sum(0)``), a single number <= K.

    Not per-codebook: by concavity of entropy it is >= every level's perplexity; one possible reading of
    published perplexities that exceed the per-codebook bound (see docs/metrics.md).
    """
    return float(_entropy(_as_counts(counts).sum(0, keepdim=True)).exp()[0])


def codebook_utilization(
    codes: Any, mask: Any | None = None, *, codebook_size: int, per_level: bool = False
) -> float | list[float]:
    """Utilization of codes ``[B, Q, T]`` (+ mask ``[B, T]``): see :func:`utilization_from_counts`."""
    return utilization_from_counts(code_counts(codes, mask, codebook_size=codebook_size), per_level=per_level)


def codebook_perplexity(
    codes: Any, mask: Any | None = None, *, codebook_size: int, per_level: bool = False
) -> float | list[float]:
    """Perplexity of codes ``[B, Q, T]`` (+ mask ``[B, T]``): see :func:`perplexity_from_counts`."""
    return perplexity_from_counts(code_counts(codes, mask, codebook_size=codebook_size), per_level=per_level)


def batch_utilization(
    codes: Any,
    mask: Any | None = None,
    *,
    codebook_size: int,
    batch_frames: int,
    per_level: bool = False,
) -> float | list[float]:
    """Utilization counted per batch of ``batch_frames`` valid frames, then averaged over batches.

    The valid frames (batch-major, then time order) are cut into consecutive batches of exactly
    ``batch_frames``; a shorter remainder is dropped unless it is the only batch. This is the "per
    training batch" reading that reproduces utilization figures far below full-set perplexities.
    """
    _check_codebook_size(codebook_size)
    if isinstance(batch_frames, bool) or not isinstance(batch_frames, int) or batch_frames < 1:
        raise ValueError(f"batch_frames must be a positive int, got {batch_frames!r}")
    flat = valid_codes(codes, mask)
    n = flat.shape[1]
    if n == 0:
        raise ValueError("no valid frames")
    starts = list(range(0, max(n - batch_frames, 0) + 1, batch_frames)) if n >= batch_frames else [0]
    per_batch = torch.stack(
        [(_counts_of(flat[:, s : s + batch_frames], codebook_size) > 0).double().mean(-1) for s in starts]
    )  # [num_batches, Q]
    return _reduce(per_batch.mean(0), per_level)


def expected_batch_utilization(
    counts: Any, batch_frames: int, *, per_level: bool = False
) -> float | list[float]:
    """Expected utilization of a batch of ``batch_frames`` frames drawn i.i.d. from the histogram.

    Per codebook (1/K) Σ_k [1 - (1 - p_k)^n] with p = counts / total and n = ``batch_frames``; then averaged.
    Lets one ask which batch size turns a full-set distribution into a published per-batch figure.
    """
    if isinstance(batch_frames, bool) or not isinstance(batch_frames, int) or batch_frames < 1:
        raise ValueError(f"batch_frames must be a positive int, got {batch_frames!r}")
    counts = _as_counts(counts)
    totals = counts.sum(-1, keepdim=True)
    if (totals == 0).any():
        raise ValueError("expected utilization is undefined for a codebook with no counted frames")
    used = 1.0 - torch.exp(batch_frames * torch.log1p(-counts / totals))  # p = 1 -> log1p(-1) = -inf -> 1
    return _reduce(used.mean(-1), per_level)


# --------------------------------------------------------------------------------------------------
# streaming


class RVQStatsAccumulator:
    """Sums and counts of every metric above, so that streaming over a dev set gives the full-set numbers.

    ``update`` any number of batches (reconstructions, codes, or both), ``merge`` accumulators from other
    processes, then ``compute``. Results equal the one-shot functions on the concatenated valid frames up
    to float64 rounding. The centred cosine needs the centring vector up front (``mean``, e.g. from a
    previous pass or the training set); without it that key is left out of ``compute``. FVU needs no
    prior mean: the target mean and spread are merged exactly (Chan et al.'s parallel variance).

    Args:
        codebook_size: K; required to accumulate codes.
        mean: optional ``[D]`` centring vector for ``centred_cosine_similarity``.
        eps: cosine epsilon.
    """

    def __init__(self, codebook_size: int | None = None, *, mean: Any | None = None, eps: float = 1e-8):
        self.codebook_size = None if codebook_size is None else _check_codebook_size(codebook_size)
        self.mean = None if mean is None else _as_tensor(mean, "mean").double().reshape(-1)
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        self.num_frames = 0
        self.dim: int | None = None
        self.sq_error = 0.0
        self.target_energy = 0.0
        self.target_mean: Tensor | None = None  # float64 [D], running mean of the targets
        self.target_m2 = 0.0  # Σ ||x - running mean||²
        self.cosine_sum = 0.0
        self.centred_cosine_sum = 0.0
        self.counts: Tensor | None = None  # long [Q, K]

    @torch.no_grad()
    def update(
        self,
        *,
        prediction: Any | None = None,
        target: Any | None = None,
        mask: Any | None = None,
        codes: Any | None = None,
        codes_mask: Any | None = None,
    ) -> None:
        """Add one batch.

        Args:
            prediction / target: ``[B, T, D]`` or ``[N, D]`` reconstructions and originals (both or neither).
            mask: ``[B, T]`` valid frames of prediction/target; also used for ``codes`` unless ``codes_mask``.
            codes: ``[B, Q, T]`` integer codes.
            codes_mask: ``[B, T]``; defaults to ``mask``.
        """
        if (prediction is None) != (target is None):
            raise ValueError("pass both prediction and target, or neither")
        if prediction is not None:
            self._update_reconstruction(prediction, target, mask)
        if codes is not None:
            if self.codebook_size is None:
                raise ValueError("codebook_size is required to accumulate codes")
            counts = code_counts(
                codes, codes_mask if codes_mask is not None else mask, codebook_size=self.codebook_size
            )
            if self.counts is None:
                self.counts = counts
            elif self.counts.shape != counts.shape:
                raise ValueError(
                    f"codes have {counts.shape[0]} levels, earlier batches had {self.counts.shape[0]}"
                )
            else:
                self.counts = self.counts + counts

    def _update_reconstruction(self, prediction: Any, target: Any, mask: Any | None) -> None:
        pred, tgt = _pair(prediction, target, mask)
        self._add_frames(pred, tgt)

    def _add_frames(self, pred: Tensor, tgt: Tensor) -> None:
        """Add validated flat frames ``[N, D]``."""
        n, d = tgt.shape
        if self.dim is None:
            self.dim = d
            if self.mean is not None:
                self.mean = _mean_vector(self.mean, d)
        elif d != self.dim:
            raise ValueError(f"feature dim {d} differs from earlier batches ({self.dim})")
        t64 = tgt.double()
        batch_mean = t64.mean(0)
        batch_m2 = float((t64 - batch_mean).pow(2).sum())
        batch_mean = batch_mean.cpu()  # moments live on the CPU so accumulators merge across devices
        del t64
        if self.target_mean is None:
            self.target_mean, self.target_m2 = batch_mean, batch_m2
        else:
            self.target_mean, self.target_m2 = _merge_moments(
                self.num_frames, self.target_mean, self.target_m2, n, batch_mean, batch_m2
            )
        self.num_frames += n
        self.sq_error += _sq_error(pred, tgt)
        self.target_energy += float(tgt.pow(2).sum(-1).double().sum())
        self.cosine_sum += _cosine_sum(pred, tgt, self.eps)
        if self.mean is not None:
            mu = self.mean.to(device=pred.device, dtype=pred.dtype)
            self.centred_cosine_sum += _cosine_sum(pred - mu, tgt - mu, self.eps)

    def merge(self, other: RVQStatsAccumulator) -> RVQStatsAccumulator:
        """Fold ``other`` (e.g. another process's accumulator) into this one; returns self."""
        if other.num_frames:
            if self.dim is not None and other.dim != self.dim:
                raise ValueError(f"cannot merge feature dims {self.dim} and {other.dim}")
            if self.num_frames == 0:
                self.target_mean, self.target_m2 = other.target_mean.clone(), other.target_m2
            else:
                self.target_mean, self.target_m2 = _merge_moments(
                    self.num_frames, self.target_mean, self.target_m2,
                    other.num_frames, other.target_mean, other.target_m2,
                )  # fmt: skip
            self.dim = other.dim
            self.num_frames += other.num_frames
            self.sq_error += other.sq_error
            self.target_energy += other.target_energy
            self.cosine_sum += other.cosine_sum
            self.centred_cosine_sum += other.centred_cosine_sum
        if other.counts is not None:
            if self.counts is None:
                self.counts = other.counts.clone()
            elif self.counts.shape != other.counts.shape:
                raise ValueError(
                    f"cannot merge counts {list(self.counts.shape)} and {list(other.counts.shape)}"
                )
            else:
                self.counts = self.counts + other.counts
        return self

    def compute(self) -> dict[str, float | int | list[float]]:
        """All metrics over everything added: reconstruction keys if any reconstruction was added
        (``num_frames``, ``mse``, ``nmse``, ``fvu``, ``cosine_similarity`` and, with ``mean``,
        ``centred_cosine_similarity``), code keys if any codes were added (``num_code_frames``,
        ``codebook_utilization``, ``codebook_perplexity``, their ``*_per_level`` lists and
        ``pooled_perplexity``)."""
        out: dict[str, float | int | list[float]] = {}
        if self.num_frames:
            out["num_frames"] = self.num_frames
            out["mse"] = self.sq_error / (self.num_frames * self.dim)
            out["nmse"] = self.sq_error / self.target_energy if self.target_energy else math.nan
            out["fvu"] = self.sq_error / self.target_m2 if self.target_m2 else math.nan
            out["cosine_similarity"] = self.cosine_sum / self.num_frames
            if self.mean is not None:
                out["centred_cosine_similarity"] = self.centred_cosine_sum / self.num_frames
        if self.counts is not None and int(self.counts[0].sum()) > 0:
            out.update(code_metrics_from_counts(self.counts))
        return out


def reconstruction_metrics(
    prediction: Any, target: Any, mask: Any | None = None, *, mean: Any | None = None, eps: float = 1e-8
) -> dict[str, float | int]:
    """Every reconstruction metric in one pass: ``num_frames``, ``mse``, ``nmse``, ``fvu``,
    ``cosine_similarity`` and ``centred_cosine_similarity`` (centred by ``mean`` ``[D]``, default the
    mean of the valid target frames; FVU always uses the target mean)."""
    pred, tgt = _pair(prediction, target, mask)
    mu = tgt.double().mean(0) if mean is None else _mean_vector(mean, tgt.shape[1])
    acc = RVQStatsAccumulator(mean=mu, eps=eps)
    acc._add_frames(pred, tgt)
    return acc.compute()


def code_metrics_from_counts(counts: Any) -> dict[str, float | int | list[float]]:
    """Every code metric of a ``[Q, K]`` histogram, as the evaluate modules and the accumulator report it."""
    counts = _as_tensor(counts, "counts")
    return {
        "num_code_frames": int(counts[0].sum()),
        "codebook_utilization": utilization_from_counts(counts),
        "codebook_perplexity": perplexity_from_counts(counts),
        "codebook_utilization_per_level": utilization_from_counts(counts, per_level=True),
        "codebook_perplexity_per_level": perplexity_from_counts(counts, per_level=True),
        "pooled_perplexity": pooled_perplexity(counts),
    }


def _merge_moments(
    n_a: int, mean_a: Tensor, m2_a: float, n_b: int, mean_b: Tensor, m2_b: float
) -> tuple[Tensor, float]:
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + float(delta.pow(2).sum()) * n_a * n_b / n


# --------------------------------------------------------------------------------------------------
# error after the first k levels


@torch.no_grad()
def per_level_errors(
    model: Any, embeddings: Any, mask: Any | None = None, *, num_quantizers: int | None = None
) -> dict[str, list[float]]:
    """Reconstruction error using only the first k levels, for k = 1..Q.

    Works with a ``GemmaRVQModel`` (``quantize`` then ``decode(codes, codes_mask, num_quantizers=k)``;
    errors in encoder space) and with a bare ``ResidualQuantizer`` (``encode`` then ``decode(codes[:, :k])``;
    errors in codebook space). The model is put in eval mode for the call and restored afterwards.

    Args:
        model: the model or quantizer.
        embeddings: ``[B, T, D]`` (+ mask ``[B, T]``) or ``[N, D]``.
        num_quantizers: evaluate k = 1..num_quantizers (default: every level).

    Returns:
        ``{"num_quantizers": [1..Q], "mse": [...], "nmse": [...], "fvu": [...], "cosine_similarity": [...],
        "centred_cosine_similarity": [...]}``, one value per k.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        targets, recons = _level_reconstructions(model, embeddings, mask, num_quantizers)
    finally:
        if was_training:
            model.train()
    out: dict[str, list[float]] = {"num_quantizers": []}
    mu = targets.double().mean(0)
    for k, rec in enumerate(recons, start=1):
        out["num_quantizers"].append(k)
        for key, value in reconstruction_metrics(rec, targets, mean=mu).items():
            if key != "num_frames":
                out.setdefault(key, []).append(value)
    return out


def _level_reconstructions(
    model: Any, embeddings: Any, mask: Any | None, num_quantizers: int | None
) -> tuple[Tensor, list[Tensor]]:
    """-> (targets ``[N, D]``, [reconstruction with the first k levels ``[N, D]`` for each k])."""
    emb = _as_tensor(embeddings, "embeddings")
    if hasattr(model, "quantize") and hasattr(model, "decode"):  # GemmaRVQModel
        if emb.dim() == 2:
            if mask is not None:
                emb = emb[_as_mask(mask, (emb.shape[0],), "mask")]
            emb, mask = emb.unsqueeze(0), None
        if mask is not None:
            mask = _as_mask(mask, tuple(emb.shape[:2]), "mask")
        quantized = model.quantize(emb, mask)
        codes, codes_mask = _field(quantized, "audio_codes", 0), _field(quantized, "codes_mask", 1)
        q = _levels(codes.shape[1], num_quantizers)
        targets = flatten_valid(emb, codes_mask)
        recons = []
        for k in range(1, q + 1):
            decoded = model.decode(codes, codes_mask, num_quantizers=k)
            recons.append(flatten_valid(_field(decoded, "embeddings", 0), codes_mask))
        return targets, recons
    if hasattr(model, "encode") and hasattr(model, "decode"):  # ResidualQuantizer: [N, Dc] -> [N, Q]
        targets = flatten_valid(emb, mask)
        codes = model.encode(targets)
        q = _levels(codes.shape[1], num_quantizers)
        return targets, [model.decode(codes[:, :k]) for k in range(1, q + 1)]
    raise ValueError(
        f"per_level_errors needs a GemmaRVQModel (quantize/decode) or a ResidualQuantizer (encode/decode), "
        f"got {type(model).__name__}"
    )


def _levels(available: int, requested: int | None) -> int:
    if requested is None:
        return available
    if not 1 <= requested <= available:
        raise ValueError(f"num_quantizers must be in 1..{available}, got {requested}")
    return requested


def _field(output: Any, name: str, index: int) -> Any:
    if isinstance(output, Mapping) or hasattr(output, name):
        return output[name] if isinstance(output, Mapping) else getattr(output, name)
    if isinstance(output, Sequence):
        return output[index]
    raise ValueError(f"model output has no {name!r}")

# ---------------------------------------------------------------------------------------------- unit sequences
# Edit-distance metrics of unit sequences: the stage-2 unit error rate, and character error rates.
#
# A *unit* is one rendered frame of a token string (all its levels; after run-length collapse when the format
# deduplicates). The unit error rate (UER) of stage 2 compares the units it generates from a text with the
# units stage 1 gives for the audio of the same utterance:
#
#     UER = (substitutions + deletions + insertions) / reference units
#
# summed over all utterances before dividing (as WER is), at the frame level (a frame is correct only when
# every level matches) and per level (level l's code sequence alone). numpy is imported inside the functions.


def edit_distance(hypothesis: Sequence[Any], reference: Sequence[Any]) -> int:
    """Levenshtein distance between two sequences of comparable items (ints, strings, frame ids).

    One numpy pass per hypothesis item: the insertion chain of a row is a running minimum
    (``min_j (d[j] - j) + j``), so no Python loop runs over the reference.
    """
    import numpy as np

    hyp, ref = _as_ids(hypothesis, reference)
    if len(ref) == 0:
        return len(hyp)
    if len(hyp) == 0:
        return len(ref)
    positions = np.arange(len(ref) + 1)
    row = positions.copy()
    for item in hyp:
        substitution = row[:-1] + (ref != item)
        deletion = row[1:] + 1
        candidate = np.empty_like(row)
        candidate[0] = row[0] + 1
        candidate[1:] = np.minimum(substitution, deletion)
        row = np.minimum.accumulate(candidate - positions) + positions  # insertions along the row
    return int(row[-1])


def _as_ids(a: Any, b: Any) -> tuple[Any, Any]:
    """Two sequences as int64 numpy arrays over a shared vocabulary (strings and other hashables included)."""
    import numpy as np

    arrays = [np.asarray(a), np.asarray(b)]
    if all(x.dtype.kind in "iub" and x.ndim == 1 for x in arrays):
        return arrays[0].astype(np.int64), arrays[1].astype(np.int64)
    vocab: dict[Any, int] = {}
    return tuple(np.array([vocab.setdefault(item, len(vocab)) for item in seq], dtype=np.int64)
                 for seq in (list(a), list(b)))


def _frames(codes: Any, name: str) -> Any:
    import numpy as np

    array = np.asarray(codes, dtype=np.int64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be codes [Q, T] per example, got shape {array.shape}")
    return array


def unit_error_rate(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, Any]:
    """UER of generated units against reference units, frame level and per level.

    Args:
        predictions: per utterance, the generated codes ``[Q, T']`` (e.g. ``fmt.parse(text).codes``).
        references: per utterance, the reference codes ``[Q, T]`` (the audio's units, same format).

    Returns:
        ``unit_error_rate`` (frame level), ``unit_error_rate_per_level`` (Q values), ``num_reference_units``,
        ``num_utterances``. Values can exceed 1 (insertions).
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    import numpy as np

    if not len(references):
        raise ValueError("unit_error_rate needs at least one utterance")
    frame_edits = 0
    level_edits = None
    total = 0
    for index, (pred, ref) in enumerate(zip(predictions, references)):
        pred, ref = _frames(pred, "predictions"), _frames(ref, "references")
        if pred.shape[0] != ref.shape[0] and pred.shape[1] and ref.shape[1]:
            raise ValueError(f"utterance {index}: predictions have {pred.shape[0]} levels, references "
                             f"{ref.shape[0]}")
        levels = ref.shape[0]
        if level_edits is None:
            level_edits = np.zeros(levels, dtype=np.int64)
        # a frame as one item: rows of the joint [T, Q] table -> ids
        joint = np.concatenate([pred.T, ref.T]) if pred.shape[1] else ref.T
        _, ids = np.unique(joint.reshape(len(joint), -1), axis=0, return_inverse=True)
        ids = ids.reshape(-1)
        frame_edits += edit_distance(ids[: pred.shape[1]], ids[pred.shape[1]:])
        for level in range(levels):
            level_edits[level] += edit_distance(pred[level] if pred.shape[1] else [], ref[level])
        total += ref.shape[1]
    if total == 0:
        raise ValueError("the references hold no units")
    return {"unit_error_rate": frame_edits / total,
            "unit_error_rate_per_level": (level_edits / total).tolist(),
            "num_reference_units": int(total), "num_utterances": len(references)}


def character_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Character edits / reference characters, summed over utterances (jiwer's CER definition)."""
    edits = sum(edit_distance(list(p), list(r)) for p, r in zip(predictions, references, strict=True))
    total = sum(len(r) for r in references)
    if total == 0:
        raise ValueError("the references hold no characters")
    return edits / total
