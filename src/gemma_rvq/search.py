"""Exact nearest-code search: score kernels, cached codebook tables and the CPU thread-pool pipeline.

The search engine of :class:`~gemma_rvq.quantization.ResidualQuantizer`, apart from how codebooks are
learned. Shapes: ``n`` frames, ``Q`` levels, ``K`` codes per level, ``Dc`` code dimension.

Copied next to saved checkpoints with ``quantization.py`` (remote code), so it imports only torch at
module level.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor


class _exact_fp32:
    """Context: IEEE fp32 matmuls (no TF32 on CUDA, no bf16/tf32 oneDNN math on CPU), restored on exit."""

    def __enter__(self):
        self._saved: list = []
        root = getattr(torch.backends, "fp32_precision", "none")
        for backend in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)):
            prec = getattr(backend, "fp32_precision", None)
            if prec is not None:
                effective = root if prec == "none" else prec  # "none" inherits the global setting
                if effective not in ("ieee", "none"):
                    self._saved.append((backend, "fp32_precision", prec))
                    backend.fp32_precision = "ieee"
            elif backend is torch.backends.cuda.matmul and torch.backends.cuda.matmul.allow_tf32:
                self._saved.append((backend, "allow_tf32", True))  # torch < 2.9
                backend.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        for backend, name, value in reversed(self._saved):
            setattr(backend, name, value)
        return False


def _onednn_usable(device: torch.device) -> bool:
    return (device.type == "cpu" and torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class _SearchTables:
    """Per-codebook-version search state: fp32 codebooks ``[Q, K, Dc]``, ``-|c|^2/2`` ``[Q, K]``, kernel.

    ``scores(r, level)`` returns ``r @ C_level^T - |c|^2/2`` ``[n, K]`` (fp32), whose row argmax is the
    nearest code. On CPU the oneDNN linear kernel (weight = codebook, bias = ``-|c|^2/2``) is used when
    available: with MKL's sgemm as the alternative it is the faster of the two on the machines measured
    (up to 2x on AMD, see docs/benchmarks.md) and gives the same fp32 result up to rounding. Elsewhere
    (CUDA, ...) it is one ``addmm``.
    """

    def __init__(self, key: tuple, codebooks: Tensor, backend: str) -> None:
        self.key = key
        # Holding the source keeps its storage alive, so its address (part of the key) cannot be reused
        # by a replacement tensor while this entry exists.
        self.source = codebooks
        self.device = codebooks.device
        self.weight = codebooks.float().contiguous()
        self.bias = (-0.5 * self.weight.square().sum(-1)).contiguous()
        if backend == "auto":
            backend = "onednn" if _onednn_usable(self.device) else "addmm"
        elif backend == "onednn" and not _onednn_usable(self.device):
            raise ValueError(f"search_backend='onednn' is not available on device {self.device}")
        elif backend not in ("onednn", "addmm"):
            raise ValueError(f"search_backend must be 'auto', 'onednn' or 'addmm', got {backend!r}")
        self.backend = backend
        self.block = _argmax_block(codebooks.shape[1]) if self.device.type == "cpu" else 0
        if backend == "onednn":
            # The dense fp32 weight is passed as is: a plain-layout oneDNN copy measured no faster and costs
            # another Q*K*Dc*4 bytes; prepacking for one batch size gained ~3%.
            linear = torch.ops.mkldnn._linear_pointwise
            weight = list(self.weight)
            bias = list(self.bias)
            self.scores = lambda r, level: linear(r, weight[level], bias[level], "none", [], "")
        else:
            weight_t = [w.t() for w in self.weight]
            bias = list(self.bias)
            self.scores = lambda r, level: torch.addmm(bias[level], r, weight_t[level])

    def argmax(self, scores: Tensor) -> Tensor:
        """Row argmax of ``scores [n, K]`` (first maximum, as ``torch.argmax``).

        On CPU ``torch.argmax`` runs about 20x slower than ``amax`` (index tracking is not vectorised),
        ~10% of the GEMM time at K=2048. Two stages give the identical result: the maxima of blocks of
        ``B`` columns (``amax``, vectorised), the first block holding the row maximum, then the first
        maximum inside that block.
        """
        b = self.block
        if not b:
            return scores.argmax(dim=1)
        n, k = scores.shape
        blocks = scores.view(n, k // b, b)
        which = blocks.amax(dim=2).argmax(dim=1)  # [n]
        inside = blocks.gather(1, which.view(n, 1, 1).expand(n, 1, b)).squeeze(1).argmax(dim=1)
        return which * b + inside


def _argmax_block(k: int) -> int:
    """Block width for the two-stage CPU argmax: the divisor of ``k`` in [16, 256] closest to 64 (0: none)."""
    divisors = [b for b in range(16, 257) if k % b == 0 and k // b >= 2]
    return min(divisors, key=lambda b: abs(b - 64)) if divisors else 0


def _search_block(tables: _SearchTables, x: Tensor, levels: range, step: int, residual: bool) -> Tensor:
    """Codes ``[len(levels), n]`` of ``x [n, Dc]``, ``step`` rows at a time (one thread of work)."""
    out = torch.empty(len(levels), x.shape[0], dtype=torch.long, device=tables.device)
    last = len(levels) - 1
    for start in range(0, x.shape[0], step):
        r = x[start:start + step].to(device=tables.device, dtype=torch.float32, copy=True)
        for i, level in enumerate(levels):
            idx = tables.argmax(tables.scores(r, level))
            out[i, start:start + step] = idx
            if residual and i < last:
                r.sub_(tables.weight[level].index_select(0, idx))
    return out


def _search(tables: _SearchTables, x: Tensor, levels: range, step: int, residual: bool) -> Tensor:
    """Exact (residual) nearest-code search -> codes ``[len(levels), N]``.

    Why pipelines: per chunk and level the work is one GEMM and then an argmax, a gather and a
    subtraction. Run with all torch threads, each of those small ops is its own parallel region with a
    barrier, and together they cost a large fraction of the GEMM time (measured: ~40% at 2 threads on a
    busy machine). On CPU with the oneDNN kernel, chunks are therefore handed to a pool of ``T =
    torch.get_num_threads()`` threads that each run single-threaded end to end: no barriers, and the
    small ops of one pipeline overlap the GEMMs of the others. Codes are identical either way.
    """
    n = x.shape[0]
    workers = _pipeline_workers(tables, n)
    with _exact_fp32():
        if workers <= 1:
            return _search_block(tables, x, levels, step, residual)
        pool = _search_pool(workers)
        if pool is None:
            return _search_block(tables, x, levels, step, residual)
        block = step if n >= workers * step else -(-n // workers)
        inference = torch.is_inference_mode_enabled()

        def task(start: int) -> Tensor:
            # grad / inference mode are thread-local: carry the caller's over
            with torch.inference_mode(inference), torch.no_grad():
                return _search_block(tables, x[start:start + block], levels, step, residual)

        return torch.cat(list(pool.map(task, range(0, n, block))), dim=1)


_MIN_ROWS_PER_WORKER = 16
_POOL_LOCK = threading.Lock()
_POOL: tuple[int, int, ThreadPoolExecutor | None] | None = None  # (pid, size, pool)


def _pipeline_workers(tables: _SearchTables, n: int) -> int:
    if tables.backend != "onednn" or tables.device.type != "cpu" or not _openmp_threads():
        return 1
    return max(1, min(torch.get_num_threads(), n // _MIN_ROWS_PER_WORKER))


def _openmp_threads() -> bool:
    """True when torch's intra-op threads are OpenMP, whose team size is per calling thread."""
    global _OPENMP
    if _OPENMP is None:
        _OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return _OPENMP


_OPENMP: bool | None = None


def _search_pool(size: int) -> ThreadPoolExecutor | None:
    """A process-wide pool of ``size`` threads whose torch ops run single-threaded (None if unusable).

    ``torch.set_num_threads(1)`` in a pool thread sets that thread's OpenMP team size only, but it also
    sets MKL's process-wide thread count: the caller's count is restored once all pool threads are set
    up. Recreated after ``fork`` (threads do not survive it) and when the thread count changes.
    """
    global _POOL
    with _POOL_LOCK:
        pid = os.getpid()
        if _POOL is not None and _POOL[0] == pid and _POOL[1] == size:
            return _POOL[2]
        if _POOL is not None and _POOL[0] == pid and _POOL[2] is not None:
            _POOL[2].shutdown(wait=False)
        saved = torch.get_num_threads()
        pool: ThreadPoolExecutor | None = ThreadPoolExecutor(size, thread_name_prefix="gemma-rvq-search")
        barrier = threading.Barrier(size, timeout=60)

        def setup(_: int) -> None:
            torch.set_num_threads(1)
            barrier.wait()  # keeps each thread busy until all have run exactly one setup

        try:
            list(pool.map(setup, range(size)))
        except threading.BrokenBarrierError:
            pool.shutdown(wait=False)
            pool = None
        finally:
            torch.set_num_threads(saved)
        _POOL = (pid, size, pool)
        return pool
