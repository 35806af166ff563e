"""Residual vector quantizer: EMA or learnable codebooks, usage balancing, dead-code restarts.

Shapes: ``N`` frames, ``Q`` levels (``num_quantizers``), ``K`` codes per level (``codebook_size``),
``Dc`` code dimension (``dim``). Inputs are flat valid frames ``[N, Dc]``; codes are ``LongTensor [N, Q]``.

The nearest-code search lives in ``search.py`` and k-means in ``kmeans.py``: this module is about
learning the codebooks. All are copied next to saved checkpoints (remote code), so they import only
torch, numpy and their flat siblings (``search``, ``kmeans``, ``bounds``: the accepted settings, shared
with ``GemmaRVQConfig``) at module level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .bounds import check_quantizer
from .kmeans import kmeans
from .search import SEARCH_PRECISIONS, _exact_fp32, _search, _SearchTables, search_traceable

__all__ = ["ResidualQuantizer", "ResidualQuantizerOutput", "kmeans"]


@dataclass
class ResidualQuantizerOutput:
    """Output of :meth:`ResidualQuantizer.forward`.

    Attributes:
        quantized: ``[N, Dc]`` sum of the selected codes of the first ``Q'`` levels, in the input dtype.
            Straight-through: the forward value is the quantized vector, the gradient flows to the input
            unchanged.
        codes: ``LongTensor [N, Q']``.
        commitment_loss: scalar, ``mean_l mean_{n,d} (r_l - sg(q_l))^2`` where ``r_l`` is the residual
            entering level ``l`` and ``q_l`` its selected code: the mean over frames and dimensions,
            **averaged** over levels (so its scale, and the right ``commitment_weight``, do not depend
            on how many levels are used). Gradient flows to the input only.
        codebook_loss: scalar, ``mean_l mean_{n,d} (sg(r_l) - q_l)^2`` (same averaging). It carries the
            codebook gradient for ``codebook_type="learnable"`` and must be added to the training loss
            there; for ``"ema"`` codebooks it is a zero tensor without gradient (EMA updates the
            codebooks itself).
        residual_norms: ``[Q']`` mean squared norm of the residual entering each level (detached),
            handy for logging how much each level explains.
    """

    quantized: Tensor
    codes: Tensor
    commitment_loss: Tensor
    codebook_loss: Tensor
    residual_norms: Tensor | None = None


def _tracing() -> bool:
    """True under ``torch.compile`` / ``torch.export`` tracing, where the search engine's thread pool and
    oneDNN / int8 kernels (raw data pointers) cannot be traced and data-dependent checks cannot run: take
    the straight-line search path."""
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    return bool(getattr(compiler, "is_compiling", lambda: False)() or getattr(compiler, "is_exporting", lambda: False)())


def _dist_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class ResidualQuantizer(nn.Module):
    """``Q`` levels of ``K`` codes each; level ``l`` quantizes the residual left by levels ``< l``.

    Args:
        dim: code dimension ``Dc``.
        num_quantizers: number of levels ``Q``.
        codebook_size: codes per level ``K``.
        codebook_type: ``"ema"`` (codebooks are a buffer updated by exponential moving averages of the
            assigned residuals in training mode) or ``"learnable"`` (codebooks are an ``nn.Parameter``
            trained by gradient through ``codebook_loss``).
        ema_decay: EMA decay of cluster sizes and sums.
        eps: Laplace smoothing of EMA cluster sizes.
        dead_code_threshold: a code whose EMA cluster size (``"ema"``) or usage count since the last
            restart (``"learnable"``) is below this is re-seeded by :meth:`restart_dead_codes`.
        search_chunk_size: frames per block of the nearest-code search; bounds the ``[chunk, K]``
            score matrix (never a full ``[N, K]`` one).
        balance_weight: ``beta >= 0``, usage-balanced EMA statistics (``"ema"`` only; 0 = off). In
            training-mode ``forward`` each frame's residual at level ``l`` is credited to
            ``argmin_k |r - c_k|^2 + beta * D_l * log(K p_k)`` instead of its nearest code, where ``p_k``
            is the code's share of the level's smoothed EMA cluster sizes and ``D_l`` the batch's mean
            squared quantization error at that level (so ``beta`` is scale-free). Frames on the border
            of an over-used cell pull the under-used neighbour towards them, which evens out code usage.
            The codes, ``quantized`` and the losses ``forward`` returns, and all inference, stay
            nearest-code. Costs one more ``[N, K]`` score pass per level per training step.
        search_precision: how the search scores codes before deciding exactly (see ``search.py``):
            ``"auto"`` (int8 where this device runs an exact int8 GEMM measurably faster than fp32: CPUs
            with VNNI/AMX, CUDA; fp32 otherwise), ``"int8"`` or ``"fp32"``. The codes are the same
            whichever is used: every choice returns the float64-exact nearest code. A runtime setting
            (attribute of the same name), not part of the state dict.

    State dict: ``codebooks [Q, K, Dc]`` and, for ``"ema"``, ``cluster_size [Q, K]`` and
    ``embed_sum [Q, K, Dc]`` (after every EMA update ``codebooks == embed_sum / smoothed(cluster_size)``).
    """

    def __init__(
        self,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        *,
        codebook_type: str = "ema",
        ema_decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1.0,
        search_chunk_size: int = 1024,
        balance_weight: float = 0.0,
        search_precision: str = "auto",
    ) -> None:
        super().__init__()
        # One set of bounds with GemmaRVQConfig (bounds.py): ValueError naming the first bad setting.
        check_quantizer(dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size,
                        codebook_type=codebook_type, ema_decay=ema_decay, eps=eps,
                        dead_code_threshold=dead_code_threshold, balance_weight=balance_weight,
                        search_chunk_size=search_chunk_size)
        if search_precision not in SEARCH_PRECISIONS:
            raise ValueError(f"search_precision must be one of {SEARCH_PRECISIONS}, got {search_precision!r}")
        self.dim = dim
        self.num_quantizers = num_quantizers
        self.codebook_size = codebook_size
        self.codebook_type = codebook_type
        self.ema_decay = float(ema_decay)
        self.eps = float(eps)
        self.dead_code_threshold = float(dead_code_threshold)
        self.search_chunk_size = search_chunk_size
        self.balance_weight = float(balance_weight)

        init = torch.randn(num_quantizers, codebook_size, dim) / math.sqrt(dim)
        if codebook_type == "learnable":
            self.codebooks = nn.Parameter(init)
        else:
            self.register_buffer("codebooks", init)
            # cluster_size starts at 1 and embed_sum at the codes: the invariant holds from the start.
            self.register_buffer("cluster_size", torch.ones(num_quantizers, codebook_size))
            self.register_buffer("embed_sum", init.clone())
        # Usage counts since the last restart (learnable codebooks). Deliberately not a buffer: it is
        # training-only state and must stay out of the checkpoint.
        self._usage: Tensor | None = None
        # Which score kernel the search uses: "auto" (oneDNN linear on CPU when available, else addmm),
        # "onednn" or "addmm". Not part of the state: a runtime choice.
        self.search_backend = "auto"
        self.search_precision = search_precision
        self._search_cache: _SearchTables | None = None

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_size={self.codebook_size}, "
                f"codebook_type={self.codebook_type!r}")

    def _check_input(self, x: Tensor, name: str = "x") -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [N, {self.dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        # A finite sum proves every element finite, in one pass without [N, Dc] temporaries
        # (torch.isfinite(x) allocates several). Otherwise (non-finite value, or an overflowing sum)
        # check exactly, chunk by chunk. Skipped under torch.compile / torch.export, where a data-dependent
        # branch cannot be traced (the model documents that compiled graphs do not validate values).
        if _tracing():
            return
        if x.numel() and not bool(torch.isfinite(x.sum())):
            for start in range(0, x.shape[0], 4096):
                bad = (~torch.isfinite(x[start:start + 4096])).any(1).nonzero()
                if bad.numel():
                    raise ValueError(f"{name} contains NaN or infinite values (first at row {start + int(bad[0, 0])})")

    def _num_levels(self, num_quantizers: int | None) -> int:
        if num_quantizers is None:
            return self.num_quantizers
        if not isinstance(num_quantizers, int) or not 1 <= num_quantizers <= self.num_quantizers:
            raise ValueError(f"num_quantizers must be an int in [1, {self.num_quantizers}], got {num_quantizers!r}")
        return num_quantizers

    def invalidate_cache(self) -> None:
        """Drop the cached search tables (done automatically when the codebooks change)."""
        self._search_cache = None

    def __getstate__(self) -> dict:
        # The search cache holds oneDNN tensors and closures: never pickle / deepcopy it, rebuild lazily.
        state = super().__getstate__()
        state = dict(state)
        state["_search_cache"] = None
        return state

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.invalidate_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self.invalidate_cache()
        return super()._apply(fn, recurse)

    def _search_tables(self, precision: str | None = None) -> _SearchTables:
        """fp32 codebooks, their negative half squared norms, the kernel and precision choice, cached.

        ``precision``: overrides ``search_precision`` (the training paths pass :meth:`_training_precision`).

        The cache key holds the codebook storage pointer and its version counter, which every in-place
        write (``copy_`` in ``load_state_dict``, optimizer steps, EMA updates) increments, so a stale
        table is never used. Writes through ``.data`` bypass the version counter: our own methods
        invalidate explicitly; external code writing through ``.data`` must call :meth:`invalidate_cache`.
        """
        cb = self.codebooks.detach()
        precision = precision or self.search_precision
        key = (cb.data_ptr(), self.codebooks._version, cb.device, cb.dtype, tuple(cb.shape), self.search_backend,
               precision)
        cache = self._search_cache
        if cache is not None and cache.key == key:
            return cache
        cache = _SearchTables(key, cb, self.search_backend, precision)
        self._search_cache = cache
        return cache

    def _training_precision(self) -> str:
        """The precision of searches while training: codebooks change every step, and rebuilding the int8
        tables each time costs more than int8 saves on one batch, so ``"auto"`` means fp32 there."""
        return "fp32" if self.search_precision == "auto" else self.search_precision

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def nearest(self, x: Tensor, level: int) -> Tensor:
        """Exact nearest code of level ``level`` for each row of ``x [N, Dc]`` -> ``LongTensor [N]``.

        The code ``argmax_k (x . c_k - |c_k|^2 / 2)`` of a float64 exhaustive search, found by scoring in
        int8 or fp32 (``search_precision``), keeping the codes a rigorous error bound cannot rule out and
        re-scoring those exactly; ``search_chunk_size`` rows at a time, on the codebooks' device.
        TF32 / reduced-precision fp32 matmul modes are switched off for the duration.
        """
        return self._nearest(x, level, self.search_precision)

    def _nearest(self, x: Tensor, level: int, precision: str) -> Tensor:
        self._check_input(x)
        if not isinstance(level, int) or not 0 <= level < self.num_quantizers:
            raise ValueError(f"level must be an int in [0, {self.num_quantizers}), got {level!r}")
        with torch.no_grad():
            return _search(self._search_tables(precision), x.detach(), range(level, level + 1),
                           self.search_chunk_size, residual=False)[0]

    @torch.no_grad()
    def encode(self, x: Tensor, num_quantizers: int | None = None) -> Tensor:
        """Residual codes of ``x [N, Dc]`` (any float dtype/device) -> ``LongTensor [N, Q']``.

        ``Q' = num_quantizers or Q``. Exact residual nearest-code search (see :meth:`nearest`): the residual
        is kept in fp32, each level's code is the float64-exact nearest one. Codes are on the codebooks'
        device. Memory beyond input and output: per worker one ``[chunk, K]`` fp32 score matrix (int8 path
        through ``torch._int_mm`` on CPU: ``[chunk/2, K]`` int32 + fp32) and one ``[chunk, Dc]`` residual,
        plus an int8 copy of the codebooks (``Q K Dc`` bytes) cached for the int8 path. On CPU with several
        torch threads, chunks run as independent single-threaded pipelines, one per thread (see
        ``search._search``).

        Under ``torch.compile`` / ``torch.export`` a straight-line search (``search.search_traceable``:
        fp32 scores over all rows, no data-dependent shapes) is traced instead, with the same codes.
        """
        return self._encode(x, num_quantizers, self.search_precision)

    def _encode(self, x: Tensor, num_quantizers: int | None, precision: str) -> Tensor:
        self._check_input(x)
        levels = self._num_levels(num_quantizers)
        if _tracing():
            return search_traceable(self.codebooks.detach(), x.detach(), levels)
        with torch.no_grad():
            codes = _search(self._search_tables(precision), x.detach(), range(levels), self.search_chunk_size,
                            residual=True)
        return codes.t().contiguous()

    def decode(self, codes: Tensor) -> Tensor:
        """Sum of the codes of the first ``Q'`` levels: ``codes [N, Q']`` -> ``[N, Dc]`` (codebook dtype)."""
        if not isinstance(codes, Tensor) or codes.dim() != 2:
            raise ValueError(f"codes must be a LongTensor [N, Q'], got {getattr(codes, 'shape', type(codes))}")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        levels = self._num_levels(codes.shape[1])
        if not _tracing() and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must be in [0, {self.codebook_size}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        codes = codes.to(device=self.codebooks.device, dtype=torch.long)
        out = self.codebooks.new_zeros(codes.shape[0], self.dim)
        for level in range(levels):
            out = out + F.embedding(codes[:, level], self.codebooks[level])
        return out

    # ------------------------------------------------------------------ training path
    def forward(self, x: Tensor, num_quantizers: int | None = None) -> ResidualQuantizerOutput:
        """Quantize ``x [N, Dc]`` with the first ``Q'`` levels (training path).

        In training mode with ``codebook_type="ema"`` the codebooks of the used levels are updated from
        the assigned residuals after the codes are chosen (counts and sums are all-reduced across
        processes first when ``torch.distributed`` is initialised). ``quantized`` and the losses use
        the codebooks as they were before that update.
        """
        self._check_input(x)
        levels = self._num_levels(num_quantizers)
        in_dtype = x.dtype
        xf = x.float()
        codes = self._encode(xf, levels, self._training_precision() if self.training else self.search_precision)
        learnable = self.codebook_type == "learnable"
        cb = self.codebooks if learnable else self.codebooks.detach()
        residual = xf
        quantized_sum = torch.zeros_like(xf)
        commit, cb_loss, norms = [], [], []
        residuals = []
        for level in range(levels):
            q = F.embedding(codes[:, level], cb[level].float())
            commit.append(F.mse_loss(residual, q.detach()))
            if learnable:
                cb_loss.append(F.mse_loss(residual.detach(), q))
            norms.append(residual.detach().square().sum(-1).mean())
            if self.training:
                residuals.append(residual.detach())
            quantized_sum = quantized_sum + q.detach()
            residual = residual - q.detach()
        commitment_loss = torch.stack(commit).mean() if x.shape[0] else xf.sum() * 0.0  # no NaN for 0 frames
        codebook_loss = torch.stack(cb_loss).mean() if learnable and x.shape[0] else xf.new_zeros(())
        quantized = (xf + (quantized_sum - xf).detach()).to(in_dtype)
        if self.training:  # also with 0 frames: under torch.distributed every rank must join the all-reduce
            if self.balance_weight > 0:
                # squared error left by level l = norm of the residual entering level l + 1
                errors = torch.stack([*norms[1:], residual.detach().square().sum(-1).mean()]) if x.shape[0] \
                    else xf.new_zeros(levels)
                self._accumulate(residuals, self._balanced_codes(residuals, errors, x.shape[0]))
            else:
                self._accumulate(residuals, codes)
        return ResidualQuantizerOutput(quantized=quantized, codes=codes, commitment_loss=commitment_loss,
                                       codebook_loss=codebook_loss, residual_norms=torch.stack(norms))

    @torch.no_grad()
    def _accumulate(self, residuals: list[Tensor], codes: Tensor) -> None:
        levels = len(residuals)
        k = self.codebook_size
        counts = torch.zeros(levels, k, device=codes.device, dtype=torch.float32)
        counts.scatter_add_(1, codes.t(), torch.ones_like(codes.t(), dtype=torch.float32))
        if self.codebook_type == "learnable":
            if self._usage is None or self._usage.shape != (self.num_quantizers, k) or \
                    self._usage.device != counts.device:
                self._usage = torch.zeros(self.num_quantizers, k, device=counts.device)
            self._usage[:levels] += counts
            return
        sums = torch.zeros(levels, k, self.dim, device=codes.device, dtype=torch.float32)
        for level in range(levels):
            sums[level].index_add_(0, codes[:, level], residuals[level])
        if _dist_world_size() > 1:
            # One collective for both: every process then applies the identical global update.
            flat = torch.cat([counts.reshape(-1), sums.reshape(-1)])
            dist.all_reduce(flat)
            counts = flat[: counts.numel()].view_as(counts)
            sums = flat[counts.numel():].view_as(sums)
        self._ema_update(counts, sums)

    @torch.no_grad()
    def _balanced_codes(self, residuals: list[Tensor], errors: Tensor, n: int) -> Tensor:
        """Usage-balanced assignment ``[N, L]`` of the residuals entering each level (see ``balance_weight``).

        ``errors [L]``: mean squared quantization error per level over this process's ``n`` frames;
        averaged over all processes first, so every rank applies the same rule.
        """
        levels = len(residuals)
        if _dist_world_size() > 1:
            flat = torch.cat([errors.float() * n, errors.new_full((1,), float(n))])
            dist.all_reduce(flat)
            errors = flat[:levels] / flat[levels].clamp_min(1)
        out = torch.empty(n, levels, dtype=torch.long, device=self.codebooks.device)
        if not n:
            return out
        tables = self._search_tables(self._training_precision())  # (its scores: the fp32 kernel)
        k, step = self.codebook_size, self.search_chunk_size
        with _exact_fp32():
            for level, r in enumerate(residuals):
                cs = self._smoothed_cluster_size(self.cluster_size[level].float())
                # 0 for a code used at the uniform rate 1/K, > 0 (a cost) above it; scores are -d^2/2 + const
                penalty = (0.5 * self.balance_weight * float(errors[level])) * torch.log(cs / cs.sum() * k)
                for start in range(0, n, step):
                    chunk = r[start:start + step].to(device=tables.device, dtype=torch.float32)
                    out[start:start + step, level] = tables.argmax(tables.scores(chunk, level) - penalty)
        return out

    @torch.no_grad()
    def _ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """EMA of cluster sizes ``[L, K]`` and sums ``[L, K, Dc]`` for the first ``L`` levels."""
        levels = counts.shape[0]
        d = self.ema_decay
        cs = self.cluster_size[:levels]
        es = self.embed_sum[:levels]
        cs.mul_(d).add_(counts.to(cs.dtype), alpha=1 - d)
        es.mul_(d).add_(sums.to(es.dtype), alpha=1 - d)
        self.codebooks[:levels] = (es / self._smoothed_cluster_size(cs).unsqueeze(-1)).to(self.codebooks.dtype)
        self.invalidate_cache()

    def _smoothed_cluster_size(self, cs: Tensor) -> Tensor:
        """Laplace smoothing ``(n_k + eps) / (n + K eps) * n`` per level (keeps every size > 0)."""
        total = cs.sum(-1, keepdim=True)
        return (cs + self.eps) / (total + self.codebook_size * self.eps) * total

    @torch.no_grad()
    def set_cluster_sizes(self, counts: Tensor) -> None:
        """Set the EMA cluster sizes ``[Q, K]`` (``"ema"`` only), keeping the codebooks: ``embed_sum`` is
        rescaled so that ``codebooks == embed_sum / smoothed(cluster_size)`` still holds."""
        if self.codebook_type != "ema":
            raise ValueError("set_cluster_sizes applies to EMA codebooks only")
        if tuple(counts.shape) != (self.num_quantizers, self.codebook_size):
            raise ValueError(f"counts must have shape {(self.num_quantizers, self.codebook_size)}, "
                             f"got {tuple(counts.shape)}")
        self.cluster_size.copy_(counts.to(self.cluster_size))
        smoothed = self._smoothed_cluster_size(self.cluster_size)
        self.embed_sum.copy_(self.codebooks * smoothed.unsqueeze(-1))
        self.invalidate_cache()

    # ------------------------------------------------------------------ training-only state
    def training_state(self) -> dict[str, Tensor]:
        """Training state kept out of the state dict, for exact resume: ``{"usage": [Q, K]}`` (learnable
        codebooks' usage counts since the last restart, this process's share) or ``{}``."""
        return {} if self._usage is None else {"usage": self._usage.detach().cpu().clone()}

    def load_training_state(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`training_state` returned (an empty dict clears it)."""
        usage = state.get("usage")
        if usage is not None and tuple(usage.shape) != (self.num_quantizers, self.codebook_size):
            raise ValueError(f"usage must have shape {(self.num_quantizers, self.codebook_size)}, "
                             f"got {tuple(usage.shape)}")
        self._usage = None if usage is None else usage.to(device=self.codebooks.device, dtype=torch.float32).clone()

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def code_counts(self, codes: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-level histogram ``[Q', K]`` (long) of ``codes [N, Q']`` or ``[B, Q', T]`` (+ ``mask [B, T]``)."""
        if codes.dim() == 3:
            if mask is not None:
                codes = codes.transpose(1, 2)[mask.to(torch.bool)]  # [N, Q']
            else:
                codes = codes.transpose(1, 2).reshape(-1, codes.shape[1])
        elif codes.dim() != 2:
            raise ValueError(f"codes must be [N, Q'] or [B, Q', T], got {tuple(codes.shape)}")
        levels = codes.shape[1]
        counts = torch.zeros(levels, self.codebook_size, dtype=torch.long, device=codes.device)
        counts.scatter_add_(1, codes.t().long(), torch.ones_like(codes.t(), dtype=torch.long))
        return counts

    # ------------------------------------------------------------------ init / maintenance
    @torch.no_grad()
    def kmeans_init(self, x: Tensor, *, num_iters: int = 20, seed: int = 0, init: str = "kmeans++",
                    chunk_size: int | None = None, verbose: bool = False) -> None:
        """Initialise all levels by k-means, level by level on the residuals of a sample ``x [N, Dc]``.

        ``N >= codebook_size`` is required. ``init``: ``"kmeans++"`` (greedy, as scikit-learn; costs about
        ``(2 + ln K) * K`` passes of ``N x Dc``) or ``"random"`` (cheap for large ``K``, a few more Lloyd
        iterations usually compensate). See :func:`kmeans`.

        Level ``l`` is fitted to the residuals left by the already-initialised levels ``< l``. EMA state
        is reset consistently (``cluster_size = 1``, ``embed_sum = codebooks``). Under
        ``torch.distributed`` the result of rank 0 is broadcast so all processes agree.
        """
        self._check_input(x)
        if x.shape[0] < self.codebook_size:
            raise ValueError(f"kmeans_init needs at least codebook_size={self.codebook_size} frames, "
                             f"got {x.shape[0]}")
        device = self.codebooks.device
        residual = x.to(device=device, dtype=torch.float32, copy=True)
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        for level in range(self.num_quantizers):
            gen = torch.Generator(device=gen_device).manual_seed(seed + level)
            centroids, _ = kmeans(residual, self.codebook_size, num_iters=num_iters, generator=gen, init=init,
                                  chunk_size=chunk_size or self.search_chunk_size)
            self.codebooks.data[level] = centroids.to(self.codebooks.dtype)
            self.invalidate_cache()
            if level + 1 < self.num_quantizers:
                residual.sub_(self.codebooks.data[level].float()[self._nearest(residual, level,
                                                                                 self._training_precision())])
            if verbose:
                print(f"kmeans_init: level {level} done")
        if self.codebook_type == "ema":
            self.cluster_size.fill_(1.0)
            self.embed_sum.copy_(self.codebooks)
        self._usage = None
        self._broadcast_state()
        self.invalidate_cache()

    def _broadcast_state(self) -> None:
        if _dist_world_size() > 1:
            for t in (self.codebooks, getattr(self, "cluster_size", None), getattr(self, "embed_sum", None)):
                if t is not None:
                    dist.broadcast(t.data, src=0)
            self.invalidate_cache()

    def _dead_mask(self) -> Tensor:
        if self.codebook_type == "ema":
            stat = self.cluster_size.float()  # global already: EMA statistics are all-reduced
        else:
            stat = self._usage if self._usage is not None else torch.zeros(
                self.num_quantizers, self.codebook_size, device=self.codebooks.device)
            if _dist_world_size() > 1:
                stat = stat.clone()
                dist.all_reduce(stat)
        return stat.to(self.codebooks.device) < self.dead_code_threshold

    @torch.no_grad()
    def restart_dead_codes(self, x: Tensor, *, generator: torch.Generator | None = None) -> int:
        """Re-seed dead codes from random residuals of ``x [N, Dc]`` at their level; returns how many.

        A code is dead when its EMA cluster size (``"ema"``) or its usage count since the last restart
        (``"learnable"``, counted in training-mode ``forward``) is below ``dead_code_threshold``. Levels
        are processed in order, so level ``l`` draws from residuals under the already-restarted levels
        ``< l``. Restarted EMA codes get ``cluster_size = max(dead_code_threshold, 1)`` with a matching
        ``embed_sum``. Learnable usage counts are reset. Under ``torch.distributed`` the dead set is
        global (EMA statistics are all-reduced in ``forward``, usage counts here) and rank 0's re-seeded
        state is broadcast, so every rank must call this together. An empty ``x`` re-seeds nothing.
        """
        self._check_input(x)
        dead = self._dead_mask()
        total = 0
        device = self.codebooks.device
        residual = x.to(device=device, dtype=torch.float32, copy=True)
        reset_size = max(self.dead_code_threshold, 1.0)
        for level in range(self.num_quantizers):
            idx = dead[level].nonzero().squeeze(1)
            n_dead = idx.numel()
            if n_dead and residual.shape[0]:
                total += n_dead
                gdev = generator.device if generator is not None else torch.device("cpu")
                if n_dead <= residual.shape[0]:  # distinct rows: duplicate codes would waste capacity
                    pick = torch.randperm(residual.shape[0], generator=generator, device=gdev)[:n_dead]
                else:
                    pick = torch.randint(residual.shape[0], (n_dead,), generator=generator, device=gdev)
                pick = pick.to(device)
                new = residual[pick]
                self.codebooks.data[level, idx] = new.to(self.codebooks.dtype)
                if self.codebook_type == "ema":
                    self.cluster_size[level, idx] = reset_size
                    self.embed_sum[level, idx] = (new * reset_size).to(self.embed_sum.dtype)
                self.invalidate_cache()
            if level + 1 < self.num_quantizers:
                residual.sub_(self.codebooks.data[level].float()[self._nearest(residual, level,
                                                                                 self._training_precision())])
        if self._usage is not None:
            self._usage.zero_()
        if bool(dead.any()):  # the dead set is global: every rank takes this branch together
            self._broadcast_state()
        return total
