"""k-means for codebook initialisation: greedy k-means++ seeding and Lloyd iterations, chunked, fp32.

Shapes: ``N`` points of dimension ``D``, ``k`` centroids. Used by
:meth:`~gemma_rvq.quantization.ResidualQuantizer.kmeans_init` (level by level, on residuals). Copied
next to saved checkpoints with ``quantization.py`` (remote code), so it imports only torch at module
level.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["kmeans"]


def _nearest_centroid(x: Tensor, centroids: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Exact nearest centroid ``[N]`` and squared distance ``[N]`` (fp32, chunked)."""
    bias = -0.5 * centroids.square().sum(-1)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist2 = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        xc = x[start:start + chunk_size]
        best, arg = torch.addmm(bias, xc, centroids.t()).max(dim=1)
        idx[start:start + chunk_size] = arg
        # |x - c|^2 = |x|^2 - 2 (x.c - |c|^2/2); clamp tiny negative rounding
        dist2[start:start + chunk_size] = (xc.square().sum(-1) - 2 * best).clamp_min_(0)
    return idx, dist2


@torch.no_grad()
def kmeans(x: Tensor, k: int, *, num_iters: int = 20, generator: torch.Generator | None = None,
           chunk_size: int = 1024, tol: float = 1e-6, n_local_trials: int | None = None,
           init: Tensor | str = "kmeans++") -> tuple[Tensor, Tensor]:
    """Greedy k-means++ seeding (as scikit-learn) then Lloyd iterations on ``x [N, D]`` (any device, fp32).

    ``init``: ``"kmeans++"``, ``"random"`` (k distinct random points: much cheaper for large ``k``) or
    explicit centroids ``[k, D]``. Clusters that end up empty are re-seeded from the
    points farthest from their current centroid. Stops early when the relative inertia improvement
    falls below ``tol``. Returns ``(centroids [k, D], assignments [N])``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got {tuple(x.shape)}")
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    x = x.float()
    device = x.device
    if isinstance(init, Tensor):
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init must have shape {(k, x.shape[1])}, got {tuple(init.shape)}")
        centroids = init.to(device=device, dtype=torch.float32, copy=True)
    elif init == "kmeans++":
        centroids = _kmeans_plusplus(x, k, generator, n_local_trials)
    elif init == "random":
        gdev = generator.device if generator is not None else torch.device("cpu")
        centroids = x[torch.randperm(n, generator=generator, device=gdev)[:k].to(device)].clone()
    else:
        raise ValueError(f"init must be 'kmeans++', 'random' or a [k, D] tensor, got {init!r}")
    prev_inertia, prev_assign = math.inf, None
    for _ in range(max(num_iters, 1)):
        assign, d2 = _nearest_centroid(x, centroids, chunk_size)
        inertia = float(d2.sum())
        if prev_assign is not None and (torch.equal(assign, prev_assign)
                                        or prev_inertia - inertia <= tol * prev_inertia):
            break  # converged: the centroids are already the means of this assignment (or close enough)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, sums / counts.clamp_min(1).unsqueeze(1))
        n_empty = int(empty.sum())
        if n_empty:
            # re-seed at the points worst served by their current centroid
            centroids[empty] = x[d2.topk(n_empty).indices]
            prev_assign = None
        else:
            prev_assign = assign
        prev_inertia = inertia
    else:
        assign, _ = _nearest_centroid(x, centroids, chunk_size)
    return centroids, assign


def _kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator | None, n_local_trials: int | None) -> Tensor:
    """Greedy k-means++: at each step ``2 + log k`` candidates drawn by D^2 sampling, keep the best."""
    n, device = x.shape[0], x.device
    gdev = generator.device if generator is not None else torch.device("cpu")
    trials = n_local_trials or (2 + int(math.log(k)))
    sq = x.square().sum(-1)
    centroids = torch.empty(k, x.shape[1], device=device)
    first = int(torch.randint(n, (1,), generator=generator, device=gdev))
    centroids[0] = x[first]
    closest = (sq - 2 * (x @ x[first]) + sq[first]).clamp_min_(0)
    for i in range(1, k):
        cum = closest.cumsum(0)
        r = torch.rand(trials, generator=generator, device=gdev).to(device) * cum[-1]
        cand = torch.searchsorted(cum, r).clamp_max_(n - 1)
        cand_d = (sq[cand].unsqueeze(1) - 2 * (x[cand] @ x.t()) + sq.unsqueeze(0)).clamp_min_(0)  # [trials, N]
        pot = torch.minimum(closest.unsqueeze(0), cand_d)
        best = int(pot.sum(1).argmin())
        closest = pot[best]
        centroids[i] = x[cand[best]]
    return centroids
