"""Exact nearest-code search: score kernels, rigorous error bounds, cached codebook tables, thread pool.

The search engine of :class:`~gemma_rvq.quantization.ResidualQuantizer`, apart from how codebooks are
learned. Shapes: ``n`` frames, ``Q`` levels, ``K`` codes per level, ``Dc`` code dimension.

Every search runs the same three steps, per level and chunk of frames:

1. **score** every code: ``A_k ≈ S_k = r·c_k − |c_k|²/2`` (``argmax_k S_k`` is the nearest code), either
   with an fp32 GEMM or, where the device runs it faster, with an int8 GEMM (exact int32 accumulation)
   on per-row / per-code scaled copies of the residual and the codebook;
2. **keep the candidates** that a rigorous bound ``|A_k − S_k| ≤ E_k`` cannot rule out: with
   ``m = max_k A_k``, the exact nearest code lies in ``{k : A_k ≥ m − 2 max E}``, and then in
   ``{k : A_k + E_k ≥ max_j (A_j − E_j)}``; rows with too many int8 candidates are scored again in fp32;
3. **decide exactly**: a row with one candidate has its code; the candidates of the other rows are
   re-scored in float64 (products of fp32 numbers are exact there) and the first maximum wins.

So the codes are those of a float64 exhaustive search over the fp32 residual, whichever kernel scored
them: the kernel choice changes the speed, never the codes. On CPU the int8 search runs steps 1-3 as two
fused numba passes around the GEMM (``search_kernels.py``, same bounds) where numba is installed, and as
eager torch steps otherwise (``FUSED_KERNELS``). A search of a few rows against a small
codebook (a stream's push) skips the three steps and runs that float64 exhaustive search itself
(``_search_few``, on CPU): fewer operations, the same codes. ``docs/benchmarks.md`` derives the bounds.

Copied next to saved checkpoints with ``quantization.py`` (remote code), so it imports only torch at
module level.
"""

from __future__ import annotations

import importlib
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # (at run time this module imports only torch: it is copied as remote code)
    import numpy as np

SEARCH_PRECISIONS = ("auto", "int8", "fp32")
SEARCH_BACKENDS = ("auto", "onednn", "addmm")

_U = 2.0 ** -24  # unit roundoff of fp32 (round to nearest)
_TINY = 1e-30  # below this a row or code is scaled by 1 (so that max/127 is never subnormal)
# Rows that the int8 bound leaves with more candidates than this are scored again in fp32.
MAX_INT8_CANDIDATES = 32


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


def _gamma(n: int) -> float:
    """Bound on the relative error of an n-term fp32 dot product, any summation order (Higham's gamma_n)."""
    return n * _U / (1 - n * _U)


# ---------------------------------------------------------------------- int8 kernels and the precision choice
# An int8 kernel computes ``t_k (x_i · q_k)`` in fp32 from int8 rows ``x_i`` and int8 codes ``q_k`` with
# per-code scales ``t_k``, the integer dot product exact (int32 accumulation):
#   "qlinear": oneDNN's quantized linear (u8 activations with zero point 128, s8 weights, per-code scales
#              applied in the GEMM's epilogue, fp32 out): CPUs with VNNI / AMX;
#   "int_mm":  ``torch._int_mm`` (int32 out), then one scaling pass: CUDA, and CPUs where qlinear is absent.
INT8_KERNELS = ("qlinear", "int_mm")
_KERNEL_EXACT: dict[tuple, bool] = {}
_INT8_CHOICE: dict[tuple, str | None] = {}
_AUTO: dict[tuple, bool] = {}
_PROBE_LOCK = threading.Lock()


def _device_key(device: torch.device) -> tuple:
    return device.type, device.index


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _int_mm(a: Tensor, b: Tensor, min_rows: int = 0) -> Tensor:
    """``a [n, D] int8 @ b [D, K] int8 -> [n, K] int32``; zero rows are appended up to ``min_rows`` (CUDA's
    kernel needs more than 16 rows, and ``D``, ``K`` multiples of 8: see :class:`_Int8Tables`)."""
    n = a.shape[0]
    if n < min_rows:
        a = torch.cat([a, a.new_zeros(min_rows - n, a.shape[1])])
        return torch._int_mm(a, b)[:n]
    return torch._int_mm(a, b)


class _Int8Level:
    """One level's int8 codes ``q [K, D]`` (scales ``t [K]``) prepared for one kernel.

    ``padded``: the CUDA layout (``_int_mm`` wants the codes column-major and at least 17 rows).
    """

    def __init__(self, kernel: str, q: Tensor, t: Tensor, padded: bool = False) -> None:
        self.kernel, self.scale = kernel, t.contiguous()
        self.min_rows = 17 if padded else 0
        if kernel == "qlinear":
            self.packed = torch.ops.onednn.qlinear_prepack(q.contiguous(), None)
            self.zero_points = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        else:
            self.qt = q.contiguous().t() if padded else q.t().contiguous()

    def quantize(self, y: Tensor) -> Tensor:
        """int8 (``int_mm``) or uint8 = y + 128 (``qlinear``) rows from integer-valued floats in [-127, 127]."""
        q = y.to(torch.int8)
        return q.view(torch.uint8).bitwise_xor_(128) if self.kernel == "qlinear" else q  # two's complement

    def scores(self, xq: Tensor) -> Tensor:
        """``t_k (x_i · q_k)`` ``[n, K]`` fp32."""
        if self.kernel == "qlinear":
            return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 128, self.packed, self.scale, self.zero_points, None,
                                                      1.0, 0, torch.float32, "none", [], "")
        out = _int_mm(xq, self.qt, self.min_rows)
        if out.device.type == "cpu":
            return out.float().mul_(self.scale)  # (int32 x fp32 in one op takes a slow, unvectorised path)
        return torch.mul(out, self.scale)


def _kernel_exact(kernel: str, device: torch.device) -> bool:
    """True when ``kernel`` runs on ``device``, exactly (int32 sums, no int16 saturation) and not absurdly slow.

    Checked once per device on extreme values: some CPU kernels without VNNI add pairs of u8 x s8
    products in saturating int16 (``vpmaddubsw``), which would break the error bound; some builds run a
    reference loop that is hundreds of times slower than fp32.
    """
    key = (kernel, *_device_key(device))
    with _PROBE_LOCK:
        if key not in _KERNEL_EXACT:
            _KERNEL_EXACT[key] = _probe_kernel_exact(kernel, device)
        return _KERNEL_EXACT[key]


def _probe_kernel_exact(kernel: str, device: torch.device) -> bool:
    if device.type not in ("cpu", "cuda") or (kernel == "int_mm" and not hasattr(torch, "_int_mm")):
        return False
    if kernel == "qlinear" and (device.type != "cpu" or not hasattr(torch.ops.onednn, "qlinear_pointwise")
                                or not _onednn_usable(device)):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        d, k = 64, 64
        rows = [torch.full((d,), 127), torch.full((d,), -127), torch.tensor([127, -127] * (d // 2))]
        x = torch.stack(rows + [torch.randint(-127, 128, (d,), generator=gen) for _ in range(32 - len(rows))])
        q = torch.cat([x[:3], -x[:3], torch.randint(-127, 128, (k - 6, d), generator=gen)])
        t = torch.ones(k)
        level = _Int8Level(kernel, q.to(torch.int8).to(device), t.to(device), padded=device.type == "cuda")
        xq = level.quantize(x.float().to(device))
        a, c = x.float().to(device), q.float().t().to(device)
        level.scores(xq), a @ c  # warm up (kernel generation)
        _sync(device)
        start = time.perf_counter()
        got = level.scores(xq)
        _sync(device)
        slow = time.perf_counter() - start
        start = time.perf_counter()
        a @ c
        _sync(device)
        # |sums| <= 64 * 127^2 < 2^24: exact in fp32 both ways
        exact = bool(torch.equal(got.cpu(), (x.double() @ q.double().t()).float()))
        return exact and slow < 50 * (time.perf_counter() - start) + 0.005
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def int8_usable(device: torch.device, dim: int) -> bool:
    """Some int8 kernel is exact on ``device``, and ``dim * 127 * 128`` fits in int32."""
    return dim * 127 * 128 < 2**31 and any(_kernel_exact(kern, device) for kern in INT8_KERNELS)



def _single_threaded(fn: Callable[[], object], device: torch.device) -> object:
    """``fn()`` as the search's CPU pipelines run it: in a thread of its own with one torch thread."""
    if device.type != "cpu":
        return fn()
    result: list = []
    saved = torch.get_num_threads()

    def run() -> None:
        torch.set_num_threads(1)
        result.append(fn())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    torch.set_num_threads(saved)  # (MKL's thread count is process-wide)
    if not result:
        raise RuntimeError("the speed probe failed")
    return result[0]


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _int8_kernel(device: torch.device, dim: int, k: int) -> str | None:
    """The exact int8 kernel to use at this shape (the faster one where two are exact), or None.

    Timed once per device and shape, single-threaded on CPU: the kernel and the pass that applies the
    per-row scale and the bias. The first of ``INT8_KERNELS`` that is exact is kept unless another one
    runs at least ``INT8_KERNEL_MARGIN`` times as fast: on CPU ``int_mm`` also costs an int32 -> fp32 pass
    and half-size chunks (measured 13 % slower end to end than ``qlinear`` here), and a one-off timing on a
    loaded machine once chose it on a coin flip."""
    key = (*_device_key(device), dim, k)
    with _PROBE_LOCK:
        if key in _INT8_CHOICE:
            return _INT8_CHOICE[key]
    kernels = [kern for kern in INT8_KERNELS if _kernel_exact(kern, device)] if dim * 127 * 128 < 2**31 else []
    choice = kernels[0] if len(kernels) == 1 else None
    if len(kernels) > 1:
        choice = _single_threaded(lambda: _probe_kernels(kernels, device, dim, k), device)
    with _PROBE_LOCK:
        _INT8_CHOICE[key] = choice
    return choice


INT8_KERNEL_MARGIN = 1.25


def _probe_kernels(kernels: list[str], device: torch.device, dim: int, k: int) -> str:
    n = 256 if device.type == "cpu" else 4096
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(-127, 128, (n, dim), generator=gen).float().to(device)
    q = torch.randint(-127, 128, (k, dim), generator=gen).to(torch.int8).to(device)
    t, bias, rowscale = torch.ones(k, device=device), torch.zeros(k, device=device), torch.ones(n, 1, device=device)
    runs = {}
    for kern in kernels:
        level = _Int8Level(kern, q, t, padded=device.type == "cuda")
        xq = level.quantize(y)

        def run(level: _Int8Level = level, xq: Tensor = xq) -> object:
            scores = level.scores(xq)
            return torch.addcmul(bias, scores, rowscale, out=scores)
        run()  # warm up
        runs[kern] = run
    with torch.no_grad():
        times = dict.fromkeys(runs, math.inf)
        for _ in range(3):  # alternating, best of each: load from other processes hits them alike
            times = {kern: min(times[kern], _best_time(fn, device)) for kern, fn in runs.items()}
    fastest = min(times, key=times.get)
    return fastest if INT8_KERNEL_MARGIN * times[fastest] < times[kernels[0]] else kernels[0]


def _int8_wins(tables: _SearchTables) -> bool:
    """Whether the int8 search beats the fp32 one end to end (scores, candidates, re-scoring) at these
    tables' shape: timed once per device, shape and kernels on queries near the level-0 codes."""
    key = (*_device_key(tables.device), tables.dim, tables.codebook_size, tables.backend, tables.int8.kernel)
    with _PROBE_LOCK:
        if key in _AUTO:
            return _AUTO[key]
    n = 256 if tables.device.type == "cpu" else 8192
    gen = torch.Generator().manual_seed(0)
    w = tables.weight[0]
    idx = torch.randint(tables.codebook_size, (n,), generator=gen).to(tables.device)
    noise = torch.randn(n, tables.dim, generator=gen).to(tables.device)
    r = w[idx] + 0.5 * w.std(0) * noise

    def probe() -> bool:
        with torch.no_grad(), _exact_fp32():
            runs = {"int8": lambda: _nearest_int8(tables, r, 0), "fp32": lambda: _nearest_fp32(tables, r, 0)}
            for fn in runs.values():
                fn()  # warm up
            times = dict.fromkeys(runs, math.inf)
            for _ in range(2):
                times = {name: min(times[name], _best_time(fn, tables.device)) for name, fn in runs.items()}
        return 1.1 * times["int8"] < times["fp32"]

    win = bool(_single_threaded(probe, tables.device))
    with _PROBE_LOCK:
        _AUTO[key] = win
    return win


def resolve_precision(precision: str, device: torch.device, dim: int, k: int) -> tuple[str, str | None]:
    """``(precision, int8 kernel)`` for a requested ``search_precision``: ``("fp32", None)``, ``("int8",
    kernel)``, or ``("auto", kernel)`` when int8 is usable and only an end-to-end timing can decide."""
    if precision == "fp32":
        return "fp32", None
    if precision not in SEARCH_PRECISIONS:
        raise ValueError(f"search_precision must be one of {SEARCH_PRECISIONS}, got {precision!r}")
    kernel = _int8_kernel(device, dim, k) if device.type in ("cpu", "cuda") else None
    if precision == "int8" and kernel is None:
        raise ValueError(f"search_precision='int8' is not available on device {device} (it needs an exact "
                         f"int8 GEMM and dim * 127 * 128 < 2**31; dim={dim})")
    return (precision, kernel) if kernel is not None else ("fp32", None)


# ---------------------------------------------------------------------- tables
class _Int8Tables:
    """Per-code int8 copies of the codebooks and the sizes their rounding errors can reach.

    Code ``k`` of a level is ``c_k = t_k q_k + e_k`` with ``q_k`` int8 in ``[-127, 127]`` and scale
    ``t_k = max_i |c_ki| / 127``. Kept per level: the kernel's form of ``q`` (zero padded to multiples
    of 8 when ``padded``, as CUDA needs), ``-|c_k|^2/2`` as fp32 ``[K']`` (``-inf`` on padding codes, so
    they never score), upper bounds of ``|e_k|`` and ``|t_k q_k|`` as float64 ``[K']`` (``inf`` on
    padding) and their maxima.
    """

    def __init__(self, weight: Tensor, bias: Tensor, kernel: str, padded: bool | None = None) -> None:
        q, k, d = weight.shape
        padded = weight.device.type == "cuda" if padded is None else padded
        self.kernel, self.dim = kernel, d
        self.dim_pad = _pad8(d) - d if padded else 0
        kp = _pad8(k) if padded else k
        self.levels: list[_Int8Level] = []
        self.neg_half_norms: list[Tensor] = []
        self.err_norm: list[Tensor] = []
        self.code_norm: list[Tensor] = []
        self.err_max: list[float] = []
        self.code_max: list[float] = []
        # per-block maxima of the two norms (blocks of the CPU search's two-stage argmax; none when padded)
        self.block = 0 if padded else _argmax_block(k)
        self.err_block_max: list[Tensor] = []
        self.code_block_max: list[Tensor] = []
        self.fused: list = [None] * q  # per level, the fused kernels' arrays (built on first use)
        up = 1 + _gamma(d + 4)  # an fp32 norm errs by at most gamma_{D+2} (relative)
        for level in range(q):
            w = weight[level]
            amax = w.abs().amax(1)
            t = torch.where(amax > _TINY, amax / 127, torch.zeros_like(amax))  # a normal float or 0
            qi = torch.div(w, torch.where(t > 0, t, torch.ones_like(t))[:, None]).round_().clamp_(-127, 127)
            approx = qi * t[:, None]  # fl(t_k q_ki): off by at most u |t_k q_ki|
            code = torch.linalg.vector_norm(approx, dim=1).double()
            err = torch.linalg.vector_norm(approx.neg_().add_(w), dim=1).double()  # fl(c - fl(t q))
            # |t q| <= |fl(t q)| + u |t q|; |e| <= |fl(e)| + u (|t q| + |e|), each norm rounded up
            code = code * up / (1 - _U)
            err = err * up + 2 * _U * (code + err * up)
            err_p = torch.full((kp,), math.inf, dtype=torch.float64, device=w.device)
            code_p = err_p.clone()
            err_p[:k], code_p[:k] = err, code
            qpad = torch.zeros(kp, d + self.dim_pad, dtype=torch.int8, device=w.device)
            qpad[:k, :d] = qi.to(torch.int8)
            scale = torch.zeros(kp, device=w.device)
            scale[:k] = t
            hn = torch.full((kp,), -math.inf, device=w.device)
            hn[:k] = bias[level]
            self.levels.append(_Int8Level(kernel, qpad, scale, padded))
            self.neg_half_norms.append(hn)
            self.err_norm.append(err_p)
            self.code_norm.append(code_p)
            self.err_max.append(float(err.max()))
            self.code_max.append(float(code.max()))
            if self.block:
                self.err_block_max.append(err.view(-1, self.block).amax(1))
                self.code_block_max.append(code.view(-1, self.block).amax(1))


class _SearchTables:
    """Per-codebook-version search state (cached by :class:`~gemma_rvq.quantization.ResidualQuantizer`).

    fp32 codebooks ``weight [Q, K, Dc]``, ``bias = -|c|^2/2`` ``[Q, K]`` (fp32), upper bounds of
    ``|c_k|`` and ``|c_k|^2/2`` (``code_norms``, ``half_norms`` ``[Q, K]`` and their per-level maxima)
    for the bounds, the fp32 score kernel, and the int8 tables when the int8 path is chosen. Cheap to
    build (one pass over the codebooks) unless the int8 path is chosen: training rebuilds them every step.

    ``scores(r, level)`` returns ``r @ C_level^T - |c|^2/2`` ``[n, K]`` (fp32). On CPU the oneDNN linear
    kernel (weight = codebook, bias = ``-|c|^2/2``) is used when available; elsewhere one ``addmm``.
    """

    def __init__(self, key: tuple, codebooks: Tensor, backend: str, precision: str = "fp32") -> None:
        self.key = key
        # Holding the source keeps its storage alive, so its address (part of the key) cannot be reused
        # by a replacement tensor while this entry exists.
        self.source = codebooks
        self.device = codebooks.device
        _, k, d = codebooks.shape
        self.dim = d
        self.codebook_size = k
        if backend == "auto":
            backend = "onednn" if _onednn_usable(self.device) else "addmm"
        elif backend == "onednn" and not _onednn_usable(self.device):
            raise ValueError(f"search_backend='onednn' is not available on device {self.device}")
        elif backend not in SEARCH_BACKENDS:
            raise ValueError(f"search_backend must be one of {SEARCH_BACKENDS}, got {backend!r}")
        self.backend = backend
        precision, kernel = resolve_precision(precision, self.device, d, k)
        self.weight = codebooks.float().contiguous()
        half = 0.5 * self.weight.square().sum(-1)  # fp32: within gamma_Dc (relative) of |c|^2/2
        self.bias = (-half).contiguous()
        self.half_norms = half * (1 + 2 * _gamma(d))
        self.code_norms = (2 * self.half_norms).sqrt_() * (1 + 2 * _U)
        self.code_max = [float(v) * (1 + 2 * _U) for v in self.code_norms.amax(1)]
        self.half_max = [float(v) * (1 + 2 * _U) for v in self.half_norms.amax(1)]
        self.block = _argmax_block(k) if self.device.type == "cpu" else 0
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
        # fp32 re-scoring of int8 candidates: sampled_addmm on CPU (no gathered rows); on other devices the
        # gathered rows, which their fast memory handles well
        self.sparse_rescore = self.device.type == "cpu"
        self._float64: tuple | None = None  # for _search_few, built on first use
        self._half64: list = [None] * codebooks.shape[0]  # for the fused kernels, built on first use
        self.int8 = None
        self.stats: SearchStats | None = None
        self.precision = "fp32"
        if kernel is not None:
            self.int8 = _Int8Tables(self.weight, self.bias, kernel)
            if self.sparse_rescore:
                _quiet_sparse_beta_warning(self.device)
            self.precision = "int8"
            if precision == "auto" and not _int8_wins(self):
                self.precision, self.int8 = "fp32", None

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


class SearchStats:
    """Counters of the bound-and-rescore search, for benchmarks: set ``tables.stats = SearchStats()``.

    Per row and level searched: ``candidates`` (codes kept by the bound, summed; fallback rows
    excluded), ``max_candidates``, ``rescored`` (rows with more than one candidate), ``exact`` (rows
    still undecided after fp32 re-scoring, decided in float64), ``fallback`` (rows the int8 bound left
    with more than ``MAX_INT8_CANDIDATES`` candidates: searched again with fp32 scores), ``exhaustive``
    (rows with a non-finite bound, searched in float64 over all codes).
    """

    def __init__(self) -> None:
        self.rows = self.candidates = self.max_candidates = 0
        self.rescored = self.exact = self.fallback = self.exhaustive = 0
        self._lock = threading.Lock()

    def add(self, rows: int, counts: Tensor, rescored: int, exact: int, fallback: int, exhaustive: int) -> None:
        with self._lock:
            self.rows += rows
            self.candidates += int(counts.sum())
            self.max_candidates = max(self.max_candidates, int(counts.max()) if counts.numel() else 0)
            self.rescored += rescored
            self.exact += exact
            self.fallback += fallback
            self.exhaustive += exhaustive

    def summary(self) -> dict:
        n = max(self.rows, 1)
        return {"rows": self.rows, "mean_candidates": self.candidates / max(self.rows - self.fallback, 1),
                "max_candidates": self.max_candidates, "rescored_rate": self.rescored / n,
                "exact_rate": self.exact / n, "fallback_rate": self.fallback / n,
                "exhaustive_rate": self.exhaustive / n}


def _quiet_sparse_beta_warning(device: torch.device) -> None:
    """torch warns once per process that sparse CSR tensors are "in beta" when the first is built: build
    it here, with the warning filtered, instead of inside a user's encode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.sparse_csr_tensor(torch.zeros(2, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                (1, 1), check_invariants=False, device=device)


# ---------------------------------------------------------------------- the three steps
def _round_down(t: Tensor) -> Tensor:
    """fp32 values ``<=`` the float64 ``t`` (round toward minus infinity)."""
    t32 = t.float()
    return torch.where(t32.double() > t, torch.nextafter(t32, torch.full_like(t32, -math.inf)), t32)


def _threshold(m: Tensor, bound: Tensor) -> Tensor:
    """fp32 ``thr <= m - 2 bound`` (reals) from fp32 row maxima ``m`` and float64 bounds ``[n]``."""
    t = m.double() - 2.0 * bound
    return _round_down(t - t.abs() * 2.0 ** -50)  # the float64 rounding of the line above


def _candidates(scores: Tensor, thr: Tensor, bm: Tensor, b: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, codes, scores)`` of the entries ``scores[i, k] >= thr[i]`` (``thr [n]``), or ``>= thr[i, k // b]``
    (``thr [n, K/b]``: one threshold per row and block), sorted by row, then code.

    ``bm [n, K/b]``: block maxima of ``scores`` (blocks of ``b`` columns): only blocks whose maximum
    reaches the threshold are looked into, so the work beyond one pass over ``scores`` is small.
    """
    n, nb = bm.shape
    if nb == 1:  # one block (CUDA, or K without a good divisor): one compare over the scores
        rows, codes = (scores >= thr.view(n, 1)).nonzero().unbind(1)
        return rows, codes, scores[rows, codes]
    per_block = thr.dim() == 2
    hit = _flat_nonzero(bm >= (thr if per_block else thr[:, None]))  # [Pb]: row * nb + block
    hit_rows, hit_blocks = _divmod(hit, nb)
    vals = scores.view(n * nb, b).index_select(0, hit)  # [Pb, b]
    hit_thr = thr.view(-1).index_select(0, hit) if per_block else thr.index_select(0, hit_rows)
    flat = _flat_nonzero(vals >= hit_thr[:, None])  # [P]: pair * b + column
    pair, col = _divmod(flat, b)
    rows = hit_rows.index_select(0, pair)
    codes = hit_blocks.index_select(0, pair).mul_(b).add_(col)
    return rows, codes, vals.view(-1).index_select(0, flat)


def _divmod(i: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``(i // m, i % m)`` of non-negative int64 ``i``; shifts for a power of two (int64 division is slow)."""
    if m & (m - 1) == 0:
        return i >> (m.bit_length() - 1), i & (m - 1)
    q = torch.div(i, m, rounding_mode="floor")
    return q, i - q * m


def _flat_nonzero(mask: Tensor) -> Tensor:
    """Flat indices of the true entries of a contiguous bool ``mask [P, b]``, ascending.

    ``nonzero`` costs a few ns per entry on CPU whatever the density; the masks here are sparse (a few
    true entries per row), so the 8-byte words with any true byte are found first, then the bytes in them.
    """
    flat = mask.reshape(-1)
    if flat.numel() % 8 or flat.numel() < 4096 or flat.device.type != "cpu":
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64).nonzero().squeeze(1)  # words with any true byte
    part, byte = flat.view(-1, 8).index_select(0, words).nonzero().unbind(1)
    return words.index_select(0, part) * 8 + byte


def _block_thresholds(bm: Tensor, eb: Tensor) -> Tensor:
    """fp32 thresholds ``[n, K/b]`` per row and block from the block maxima ``bm [n, K/b]`` of the scores
    and upper bounds ``eb [n, K/b]`` (float64) of the error bound ``E_ik`` over each block's codes.

    The top code of block ``b`` has a true score ``>= bm_ib - eb_ib``, so the best score of the row is at
    least ``L_i = max_b (bm_ib - eb_ib)``, and a code ``k`` of block ``b`` can be the nearest only if
    ``A_ik >= S_ik - E_ik >= L_i - eb_ib``. Tighter than ``max_k A_ik - 2 max_k E_ik`` wherever the
    codes' norms differ between blocks. The relative 2^-20 (and absolute 2^-140) margins cover the float64
    rounding here (2^-53 per operation) and the final rounding to fp32 (2^-24 relative, 2^-149 absolute),
    so the fp32 thresholds are below the real ``L_i - eb_ib``.
    """
    best = (bm.double() - eb).amax(1, keepdim=True)
    best = best - best.abs() * 2.0 ** -20 - 2.0 ** -140
    return (best - eb * (1 + 2.0 ** -20)).float()


# float64 elements per temporary of the exact re-scoring (32 MiB): codebooks with many equal or nearly equal
# codes give rows with hundreds of candidates, and gathering them all at once took tens of GB (K=2048, D=256).
EXACT_RESCORE_ELEMENTS = 1 << 22
# Equal candidate codes are dropped (:func:`_drop_repeated_codes`) before float64 only above this many
# candidates: the rows of a chunk that float64 decides usually hold a handful.
EXACT_DEDUP_PAIRS = 256


def _exact_best(tables: _SearchTables, r: Tensor, level: int, rows: Tensor, codes: Tensor, n: int) -> Tensor:
    """First maximum of the float64 score ``r·c_k - |c_k|^2/2`` among candidates -> ``[n]`` (rows without
    candidates get ``K``). Products of two fp32 numbers are exact in float64; the sums err by ~1e-16.
    The candidates are scored in slices of at most ``EXACT_RESCORE_ELEMENTS / Dc`` (same arithmetic)."""
    step = max(1, EXACT_RESCORE_ELEMENTS // max(1, r.shape[1]))
    parts = []
    for start in range(0, rows.numel(), step):
        c = tables.weight[level].index_select(0, codes[start:start + step]).double()
        parts.append((r.index_select(0, rows[start:start + step]).double() * c).sum(1) - 0.5 * c.square().sum(1))
    s = torch.cat(parts) if len(parts) != 1 else parts[0]
    return _first_max(s, rows, codes, n, tables.codebook_size)


def _drop_repeated_codes(weight: Tensor, rows: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """The candidates without those whose code equals a smaller candidate code (``weight [K, Dc]``).

    Equal codes score equally, so the smallest of them wins any tie; and whenever one of them could be
    a row's nearest code, the bound makes every one of them a candidate of that row, the smallest
    included. Codebooks with repeated codes (silence frames, dead codes reset to one point) otherwise
    give every such row all of them to re-score.
    """
    unique_codes, inverse = torch.unique(codes, return_inverse=True)  # sorted
    u = unique_codes.numel()
    if u < 2:
        return rows, codes
    _, group = torch.unique(weight.index_select(0, unique_codes), dim=0, return_inverse=True)  # [U]
    position = torch.arange(u, device=codes.device)
    first = torch.full((u,), u, dtype=torch.long, device=codes.device).scatter_reduce(
        0, group, position, "amin", include_self=True)
    keep = first.index_select(0, group) == position  # the smallest code of its group
    if bool(keep.all()):
        return rows, codes
    return _take(keep.index_select(0, inverse), rows, codes)


def _first_max(s: Tensor, rows: Tensor, codes: Tensor, n: int, k: int) -> Tensor:
    """Per row, the smallest code among the candidates with the largest ``s`` -> ``[n]`` (``k``: none)."""
    best = torch.full((n,), -math.inf, dtype=s.dtype, device=s.device).scatter_reduce(
        0, rows, s, "amax", include_self=True)
    top = s == best.index_select(0, rows)
    return torch.full((n,), k, dtype=torch.long, device=s.device).scatter_reduce(
        0, rows[top], codes[top], "amin", include_self=True)


def _take(mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tuple(t[mask] for t in tensors)`` with one ``nonzero`` for all of them."""
    idx = mask.nonzero().squeeze(1)
    return tuple(t.index_select(0, idx) for t in tensors)


def _survivors(s: Tensor, e: Tensor, rows: Tensor, n: int) -> Tensor:
    """Mask of the candidates that can still be the best: ``s_k + e_k >= max_j (s_j - e_j)`` in their row
    (``s``, ``e``: float64 scores and error bounds; a relative 2^-50 covers this function's own rounding).
    A candidate with a non-finite score or bound (overflow: huge values) always stays, and never rules
    out another: float64 decides those rows."""
    lower = s - e
    low = torch.full((n,), -math.inf, dtype=torch.float64, device=s.device).scatter_reduce(
        0, rows, torch.where(torch.isfinite(lower), lower, -math.inf), "amax", include_self=True)
    return (s + e + (s.abs() + e) * 2.0 ** -50 >= low.index_select(0, rows)) | ~torch.isfinite(lower)


def _rescore32(tables: _SearchTables, r: Tensor, level: int, rows: Tensor, codes: Tensor, n: int,
               rn: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 dot products of the candidates, without gathering rows (``sampled_addmm``); returns the
    candidates that fp32 rounding (``gamma_Dc |r| |c_k|``) cannot rule out, sorted as given."""
    if tables.sparse_rescore:
        counts = torch.bincount(rows, minlength=n)
        crow = torch.zeros(n + 1, dtype=torch.long, device=r.device)
        torch.cumsum(counts, 0, out=crow[1:])
        pattern = torch.sparse_csr_tensor(crow, codes, r.new_zeros(codes.shape[0]), (n, tables.codebook_size),
                                          check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, r, tables.weight[level].t(), beta=0.0).values()
    else:
        dots = (r.index_select(0, rows) * tables.weight[level].index_select(0, codes)).sum(1)
    s = dots.double() + tables.bias[level].index_select(0, codes).double()  # exact sum of two fp32 numbers
    # the dot product errs by gamma_Dc |r| |c_k|, the bias by gamma_Dc |c_k|^2/2
    e = _gamma(r.shape[1] + 2) * (rn.index_select(0, rows) * tables.code_norms[level].index_select(0, codes).double()
                                  + tables.half_norms[level].index_select(0, codes).double())
    return _take(_survivors(s, e * (1 + 1e-6), rows, n), rows, codes)


def _exhaustive64(tables: _SearchTables, r: Tensor, level: int) -> Tensor:
    """float64 search over all codes (rows with a non-finite bound only: huge values)."""
    c = tables.weight[level].double()
    return (r.double() @ c.t() - 0.5 * c.square().sum(1)).argmax(dim=1)


def _decide(tables: _SearchTables, r: Tensor, level: int, rows: Tensor, codes: Tensor, rn: Tensor | None = None,
            fallback: Tensor | None = None, record: bool = True) -> Tensor:
    """Codes ``[n]`` from the candidates (sorted by row, then code): a lone candidate is the answer.

    The candidates of the other rows are re-scored exactly in float64, after a cheaper fp32 re-scoring
    when ``rn [n]`` (row norms, rounded up) is given, i.e. when they came from the int8 scores.
    ``fallback [n]`` (bool, optional): rows to search again in fp32 instead (too many int8 candidates).
    """
    n = r.shape[0]
    counts = torch.bincount(rows, minlength=n)
    if fallback is not None:
        rows, codes = _take(~fallback.index_select(0, rows), rows, codes)
        counts = counts.masked_fill(fallback, 0)
    out = torch.empty(n, dtype=torch.long, device=r.device)
    lone = counts.index_select(0, rows) == 1
    lrows, lcodes = _take(lone, rows, codes)
    out[lrows] = lcodes
    rescored = exact = 0
    if lrows.numel() < rows.numel():
        mrows, mcodes = _take(~lone, rows, codes)
        many = counts > 1
        rescored = int(many.sum())
        if rn is not None:
            mrows, mcodes = _rescore32(tables, r, level, mrows, mcodes, n, rn)
            left = torch.bincount(mrows, minlength=n)
            one = left.index_select(0, mrows) == 1
            orows, ocodes = _take(one, mrows, mcodes)
            out[orows] = ocodes
            mrows, mcodes = _take(~one, mrows, mcodes)
            many = left > 1
        if mrows.numel():
            if mrows.numel() > EXACT_DEDUP_PAIRS:  # (sorting the code rows costs more than a few float64 sums)
                mrows, mcodes = _drop_repeated_codes(tables.weight[level], mrows, mcodes)
            best = _exact_best(tables, r, level, mrows, mcodes, n)
            out[many] = best[many]
            exact = int(many.sum())
    n_fb = n_none = 0
    if fallback is not None and bool(fallback.any()):
        idx = fallback.nonzero().squeeze(1)
        out[idx] = _nearest_fp32(tables, r.index_select(0, idx), level, record=False)
        n_fb = idx.numel()
    none = counts == 0
    if fallback is not None:
        none &= ~fallback
    if bool(none.any()):  # only where a bound was not finite (huge values): search everything in float64
        idx = none.nonzero().squeeze(1)
        out[idx] = _exhaustive64(tables, r.index_select(0, idx), level)
        n_none = idx.numel()
    if tables.stats is not None:
        if record:
            tables.stats.add(n, counts if fallback is None else counts[~fallback], rescored, exact, n_fb, n_none)
        else:  # a fallback search: its rows are counted by the caller, its float64 decisions here
            tables.stats.add(0, counts[:0], 0, exact, 0, n_none)
    return out


def _fp32_scores(tables: _SearchTables, r: Tensor, level: int) -> tuple[Tensor, Tensor]:
    """fp32 scores ``A [n, K]`` of ``r [n, Dc]`` and a bound ``E [n]`` (float64): ``|A_ik - S_ik| <= E_i``.

    The GEMM with its bias is an fp32 sum of ``Dc + 1`` terms, so it errs by at most ``gamma_{Dc+1}
    (|r_i| |c_k| + |c_k|^2/2)`` in any summation order, FMA or not (IEEE fp32 is enforced); the bias
    itself, an fp32 sum of ``Dc`` squares, by ``gamma_Dc |c_k|^2/2``.
    """
    d = r.shape[1]
    scores = tables.scores(r, level)
    rn = torch.linalg.vector_norm(r, dim=1).double() * (1 + _gamma(d + 2))
    g = _gamma(d + 1)
    bound = g * (rn * tables.code_max[level] + tables.half_max[level]) + _gamma(d) * tables.half_max[level]
    return scores, bound * (1 + 1e-6)


def _nearest_fp32(tables: _SearchTables, r: Tensor, level: int, record: bool = True) -> Tensor:
    """Exact nearest codes ``[n]`` of ``r [n, Dc]`` (fp32) at ``level``, scored by the fp32 GEMM; the steps
    after it in one fused pass on CPU where numba is installed (:func:`_fused_kernels`), the same codes."""
    n = r.shape[0]
    scores, bound = _fp32_scores(tables, r, level)
    kernels = _fused_kernels(tables, fp32=True)
    if kernels is not None:
        return _decide_fp32_fused(kernels, tables, r, level, scores, bound, record)
    b = tables.block or tables.codebook_size
    bm = scores.view(n, -1, b).amax(2)
    rows, codes, _ = _candidates(scores, _threshold(bm.amax(1), bound), bm, b)
    return _decide(tables, r, level, rows, codes, record=record)


class _Int8Bound:
    """The int8 scores' error bound: ``E_ik = |r_i| |e_k| + |d_i| |t_k q_k| + slack_i`` (float64, rounded up);
    ``row`` is its maximum over codes ``[n]``, ``at(rows, codes)`` its value at candidates."""

    def __init__(self, t8: _Int8Tables, level: int, half_max: float, rn: Tensor, dn: Tensor) -> None:
        self.t8, self.level = t8, level
        self.rn, self.dn = rn, dn
        # fp32 rounding of the scaled score (int32 -> fp32, up to three products, the sum) and the bias's
        # own error (an fp32 sum of Dc squares)
        self.slack = 8 * _U * (rn + dn) * t8.code_max[level] + (8 * _U + _gamma(t8.dim)) * half_max
        self.row = (rn * t8.err_max[level] + dn * t8.code_max[level] + self.slack) * (1 + 1e-6)

    def blocks(self) -> Tensor:
        """Upper bounds of ``E_ik`` over each block of ``t8.block`` codes ``[n, K/b]`` (float64)."""
        t8, level = self.t8, self.level
        return ((self.rn[:, None] * t8.err_block_max[level] + self.dn[:, None] * t8.code_block_max[level])
                .add_(self.slack[:, None]).mul_(1 + 1e-6))

    def at(self, rows: Tensor, codes: Tensor) -> Tensor:
        t8, level = self.t8, self.level
        return (self.rn.index_select(0, rows) * t8.err_norm[level].index_select(0, codes)
                + self.dn.index_select(0, rows) * t8.code_norm[level].index_select(0, codes)
                + self.slack.index_select(0, rows)) * (1 + 1e-6)


def _int8_scores(tables: _SearchTables, r: Tensor, level: int) -> tuple[Tensor, _Int8Bound]:
    """int8 scores ``A [n, K']`` of ``r [n, Dc]`` (fp32) and their error bound (see :class:`_Int8Bound`).

    Row ``i`` is ``r_i = s_i x_i + d_i`` with ``x_i`` int8 and ``s_i = max |r_i| / 127``; codes are
    ``c_k = t_k q_k + e_k`` (see :class:`_Int8Tables`). Then ``r_i·c_k = s_i t_k (x_i·q_k) + r_i·e_k +
    d_i·(t_k q_k)`` exactly, the integer dot product ``x_i·q_k`` is exact (int32), and by Cauchy-Schwarz
    ``|A_ik - S_ik| <= |r_i| |e_k| + |d_i| |t_k q_k|`` plus the fp32 rounding of the scaling.
    """
    d = r.shape[1]
    t8 = tables.int8
    lev = t8.levels[level]
    rn = torch.linalg.vector_norm(r, dim=1)
    amax = torch.maximum(r.amax(1), r.amin(1).neg_())  # (vector_norm(ord=inf), aminmax: several times slower)
    big = amax > _TINY
    s = torch.where(big, amax / 127, torch.ones_like(amax))
    # any integers y_i work (d_i = r_i - s_i y_i is measured below); multiplying by fl(127 / amax) is faster
    # than dividing, and |r_ij * fl(127 / amax_i)| <= 127 (1 + 2u)^2 still rounds to at most 127
    y = torch.mul(r, torch.where(big, 127 / amax, torch.ones_like(amax))[:, None]).round_()
    xq = lev.quantize(y)
    if t8.dim_pad:
        xq = torch.nn.functional.pad(xq, (0, t8.dim_pad), value=128 if t8.kernel == "qlinear" else 0)
    dn = torch.linalg.vector_norm(torch.addcmul(r, y, s[:, None], value=-1, out=y), dim=1)  # |r_i - s_i x_i|
    scores = lev.scores(xq)  # t_k (x_i·q_k)
    torch.addcmul(t8.neg_half_norms[level], scores, s[:, None], out=scores)  # s_i t_k (x_i·q_k) - |c_k|^2/2
    # every fp32-computed norm rounded up by its own error bound; d_i also by the rounding of r - s*y
    up = 1 + _gamma(d + 4)
    rn64 = rn.double() * up
    dn64 = dn.double() * up + 2 * _U * (rn64 + dn.double() * up)
    return scores, _Int8Bound(t8, level, tables.half_max[level], rn64, dn64)


def _nearest_int8(tables: _SearchTables, r: Tensor, level: int) -> Tensor:
    """Exact nearest codes ``[n]`` of ``r [n, Dc]`` (fp32) at ``level`` from int8 scores: the fused CPU
    kernels where they apply (:func:`_fused_kernels`), the eager torch steps otherwise; the same codes."""
    kernels = _fused_kernels(tables)
    if kernels is None:
        return _nearest_int8_eager(tables, r, level)
    return _nearest_int8_fused(kernels, tables, r, level)


# ---------------------------------------------------------------------- fused CPU kernels (numba)
#: Use the fused CPU kernels of ``search_kernels.py`` (numba: the ``fast`` extra) when numba is installed.
#: False (or the environment variable ``GEMMA_RVQ_FUSED_SEARCH=0``) keeps the eager torch steps; the codes
#: are the same either way.
FUSED_KERNELS = os.environ.get("GEMMA_RVQ_FUSED_SEARCH", "1") != "0"
_FUSED: object = None  # the kernels module once imported and compiled, False when unavailable
_KERNELS_ABI = 2  # the kernels' signatures this module calls (search_kernels.ABI)
_FUSED_LOCK = threading.Lock()


def _load_fused_kernels() -> object:
    """``gemma_rvq.search_kernels``, compiled (or loaded from numba's cache), or False without numba."""
    global _FUSED
    with _FUSED_LOCK:
        if _FUSED is None:
            try:  # by name: copied next to a checkpoint (remote code) this module has no package siblings
                module = importlib.import_module("gemma_rvq.search_kernels")
                if getattr(module, "ABI", None) != _KERNELS_ABI:  # an installed gemma-rvq of another version
                    raise ImportError(f"gemma_rvq.search_kernels has ABI {getattr(module, 'ABI', None)}, this search "
                                      f"needs {_KERNELS_ABI}")
                module.warm_up()
                _FUSED = module
            except Exception as err:  # numba missing, or too old / too new for this numpy
                warnings.warn(f"gemma-rvq: the fused int8 search kernels are unavailable ({err!r}); using the "
                              "eager torch search (same codes, slower). pip install 'gemma-rvq[fast]' (numba) "
                              "enables them.", stacklevel=3)
                _FUSED = False
        return _FUSED


def _fused_kernels(tables: _SearchTables, fp32: bool = False):
    """The fused kernels module if they apply to ``tables``, else None: numba importable, CPU, the codes in
    blocks (``K`` with a block divisor), and for the int8 search (``fp32=False``) unpadded int8 tables."""
    if not FUSED_KERNELS or tables.device.type != "cpu" or not tables.block:
        return None
    t8 = tables.int8
    if not fp32 and (t8 is None or t8.dim_pad or t8.block != tables.block):
        return None
    kernels = _load_fused_kernels()
    return kernels or None


def _half64(tables: _SearchTables, level: int) -> np.ndarray:
    """``|c_k|^2/2`` of one level in float64 ``[K]`` (numpy; cached on ``tables``): the fused exact decisions'."""
    cache = tables._half64
    if cache[level] is None:  # (two threads may build it at once: the same values)
        cache[level] = (0.5 * tables.weight[level].double().square().sum(1)).numpy()
    return cache[level]


def _decide_fp32_fused(kernels, tables: _SearchTables, r: Tensor, level: int, scores: Tensor, bound: Tensor,
                       record: bool) -> Tensor:
    """:func:`_nearest_fp32`'s steps after the GEMM (block maxima, threshold, candidates, float64 decision) in
    one pass per row (``search_kernels.decide_rows_fp32``); rows with a +inf / nan score or an infinite bound
    are searched in float64 over all codes."""
    r = r.detach().contiguous()
    n = r.shape[0]
    out = torch.empty(n, dtype=torch.long)
    status = torch.empty(n, dtype=torch.int8)
    counts = torch.empty(n, dtype=torch.int32)
    none = kernels.decide_rows_fp32(scores.numpy(), bound.numpy(), r.numpy(), tables.weight[level].numpy(),
                                    _half64(tables, level), tables.block, out.numpy(), status.numpy(),
                                    counts.numpy())
    if none:
        idx = (status == kernels.EXHAUSTIVE).nonzero().squeeze(1)
        out[idx] = _exhaustive64(tables, r.index_select(0, idx), level)
    if tables.stats is not None:
        exact = int((status == kernels.EXACT).sum())
        if record:
            tables.stats.add(n, counts.clamp(min=0), exact, exact, 0, none)
        else:  # a fallback search: its rows are counted by the caller, its float64 decisions here
            tables.stats.add(0, counts[:0], 0, exact, 0, none)
    return out


class _FusedLevel:
    """One level's tables as the numpy arrays the fused kernels take (views of the tensors, no copies),
    the fp32 re-scoring bound's factor, and ``|c_k|^2/2`` in float64 ``[K]`` for the exact decision."""

    def __init__(self, tables: _SearchTables, level: int, slack: tuple[float, float]) -> None:
        t8 = tables.int8
        self.weight = tables.weight[level].numpy()
        self.half64 = _half64(tables, level)
        self.neg_half = t8.neg_half_norms[level].numpy()
        self.err_block, self.code_block = t8.err_block_max[level].numpy(), t8.code_block_max[level].numpy()
        self.err_norm, self.code_norm = t8.err_norm[level].numpy(), t8.code_norm[level].numpy()
        self.code_norm32, self.half_norm32 = tables.code_norms[level].numpy(), tables.half_norms[level].numpy()
        self.gamma32 = _gamma(tables.dim + 2)
        self.slack_r, self.slack_0 = slack


def _fused_level(kernels, tables: _SearchTables, level: int) -> _FusedLevel:
    cache = tables.int8.fused
    if cache[level] is None:  # (two threads may build it at once: the same values)
        cache[level] = _FusedLevel(tables, level,
                                   kernels.slack_terms(tables.int8.code_max[level], tables.half_max[level], tables.dim))
    return cache[level]


class _FusedBuffers:
    """The fused kernels' per-row working arrays for up to ``rows`` rows of ``dim`` (one pipeline's, reused
    across its chunks and levels): int8 rows ``[rows, dim]`` uint8, scales, the two norm bounds, row status
    and survivor counts."""

    def __init__(self, rows: int, dim: int) -> None:
        self.xq = torch.empty(rows, dim, dtype=torch.uint8)
        self.scale = torch.empty(rows)
        self.rn64, self.dn64 = torch.empty(rows, dtype=torch.float64), torch.empty(rows, dtype=torch.float64)
        self.status, self.counts = torch.empty(rows, dtype=torch.int8), torch.empty(rows, dtype=torch.int32)

    def take(self, n: int) -> tuple[Tensor, ...]:
        return self.xq[:n], self.scale[:n], self.rn64[:n], self.dn64[:n], self.status[:n], self.counts[:n]


def _nearest_int8_fused(kernels, tables: _SearchTables, r: Tensor, level: int,
                        previous: tuple[Tensor, int] | None = None, buffers: _FusedBuffers | None = None,
                        out: Tensor | None = None) -> Tensor:
    """:func:`_nearest_int8_eager` in two fused passes around the int8 GEMM (``search_kernels.py``).

    ``previous = (codes [n], level)``: first subtract that level's codes from ``r`` in place (the residual
    update, fused into the row quantization). The kernels' bounds and thresholds are the eager ones;
    rows they cannot decide (too many survivors, non-finite values) are searched as the eager path
    searches them, so the codes are the same. ``buffers`` (reused working arrays) and ``out [n]`` (int64,
    contiguous: where the codes go) are optional.
    """
    r = r.detach()  # (numpy views; the in-place residual update still reaches the caller's tensor)
    n, d = r.shape
    t8 = tables.int8
    lev = t8.levels[level]
    fl = _fused_level(kernels, tables, level)
    xq, scale, rn64, dn64, status, counts = (buffers or _FusedBuffers(n, d)).take(n)
    codes, prev_level = previous if previous is not None else (torch.zeros(1, dtype=torch.long), level)
    finite = kernels.quantize_rows(r.numpy(), codes.numpy(), tables.weight[prev_level].numpy(), previous is not None,
                                   128 if lev.kernel == "qlinear" else 0, 1 + _gamma(d + 4), xq.numpy(),
                                   scale.numpy(), rn64.numpy(), dn64.numpy())
    if not finite:  # a row with inf / nan or overflowing squares: the eager path's bounds handle it
        return _nearest_int8_eager(tables, r, level)
    scores = lev.scores(xq if lev.kernel == "qlinear" else xq.view(torch.int8))
    if out is None:
        out = torch.empty(n, dtype=torch.long)
    undecided = kernels.decide_rows(
        scores.numpy(), scale.numpy(), fl.neg_half, rn64.numpy(), dn64.numpy(), fl.slack_r, fl.slack_0, fl.err_block,
        fl.code_block, fl.err_norm, fl.code_norm, r.numpy(), fl.weight, fl.code_norm32, fl.half_norm32, fl.gamma32,
        fl.half64, t8.block, MAX_INT8_CANDIDATES, out.numpy(), status.numpy(), counts.numpy())
    n_fb = n_none = 0
    if undecided:
        fallback = (status == kernels.FALLBACK).nonzero().squeeze(1)
        if fallback.numel():  # more than MAX_INT8_CANDIDATES survivors: fp32 scores
            out[fallback] = _nearest_fp32(tables, r.index_select(0, fallback), level, record=False)
            n_fb = fallback.numel()
        none = (status == kernels.EXHAUSTIVE).nonzero().squeeze(1)
        if none.numel():  # non-finite scores or bounds: float64 over all codes
            out[none] = _exhaustive64(tables, r.index_select(0, none), level)
            n_none = none.numel()
    if tables.stats is not None:
        exact = status == kernels.EXACT
        decided = (status == kernels.DECIDED) | exact
        kept = counts[status != kernels.FALLBACK].clamp_(min=0)
        tables.stats.add(n, kept, int((counts > 1).logical_and_(decided).sum()), int(exact.sum()), n_fb, n_none)
    return out


def _nearest_int8_eager(tables: _SearchTables, r: Tensor, level: int) -> Tensor:
    """Exact nearest codes ``[n]`` of ``r [n, Dc]`` (fp32) at ``level``, scored by the int8 GEMM.

    Candidates under per-block thresholds (:func:`_block_thresholds`; the row bound ``max_k E_ik`` where
    the codes are not in blocks), then per code: ``k`` stays only if ``A_ik + E_ik >= max_j (A_ij - E_ij)``
    over the candidates ``j``. Rows left with more than ``MAX_INT8_CANDIDATES``
    are searched again with fp32 scores.
    """
    n = r.shape[0]
    scores, bound = _int8_scores(tables, r, level)
    kp = scores.shape[1]
    t8 = tables.int8
    if t8.block and t8.block == tables.block and kp == tables.codebook_size:
        b = t8.block
        bm = scores.view(n, -1, b).amax(2)
        thr = _block_thresholds(bm, bound.blocks())
    else:
        b = tables.block if tables.block and kp == tables.codebook_size else kp
        bm = scores.view(n, -1, b).amax(2)
        thr = _threshold(bm.amax(1), bound.row)
    rows, codes, vals = _candidates(scores, thr, bm, b)
    rows, codes = _take(_survivors(vals.double(), bound.at(rows, codes), rows, n), rows, codes)
    fallback = torch.bincount(rows, minlength=n) > MAX_INT8_CANDIDATES
    return _decide(tables, r, level, rows, codes, bound.rn, fallback if bool(fallback.any()) else None)


def _search_block(tables: _SearchTables, x: Tensor, levels: range, step: int, residual: bool) -> Tensor:
    """Codes ``[len(levels), n]`` of ``x [n, Dc]``, ``step`` rows at a time (one thread of work)."""
    out = torch.empty(len(levels), x.shape[0], dtype=torch.long, device=tables.device)
    last = len(levels) - 1
    nearest = _nearest_int8 if tables.precision == "int8" else _nearest_fp32
    kernels = _fused_kernels(tables) if tables.precision == "int8" else None
    buffers = None  # the fused kernels' working arrays, sized by the first (largest) chunk
    picked = None  # the chosen codes' rows, one buffer for all chunks and levels
    for start in range(0, x.shape[0], step):
        r = x[start:start + step].to(device=tables.device, dtype=torch.float32, copy=True)
        if kernels is not None:  # the residual update happens inside the next level's first pass
            if buffers is None:
                buffers = _FusedBuffers(r.shape[0], r.shape[1])
            previous = None
            for i, level in enumerate(levels):
                idx = _nearest_int8_fused(kernels, tables, r, level, previous, buffers, out[i, start:start + step])
                previous = (idx, level) if residual else None
            continue
        if residual and last and (picked is None or picked.shape[0] != r.shape[0]):
            picked = torch.empty_like(r)
        for i, level in enumerate(levels):
            idx = nearest(tables, r, level)
            out[i, start:start + step] = idx
            if residual and i < last:
                r.sub_(torch.index_select(tables.weight[level], 0, idx, out=picked))
    return out


#: searches of at most this many (row, code, dimension) products per level run as one float64 exhaustive
#: search (:func:`_search_few`): a stream's few frames against a small codebook (512 KiB of float64)
FEW_ROWS_ELEMENTS = 1 << 16


def _float64_codebooks(tables: _SearchTables) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per level: the float64 codebook ``[1, K, Dc]`` (an exact copy of the fp32 codes), ``|c_k|^2/2`` ``[K]``
    (float64) and the fp32 codebook ``[K, Dc]``; cached on ``tables``."""
    cached = tables._float64
    if cached is None:
        weight = tables.weight.double()
        half = 0.5 * weight.square().sum(-1)
        cached = tables._float64 = (list(weight.unsqueeze(1)), list(half), list(tables.weight))
    return cached


def _search_few(tables: _SearchTables, x: Tensor, levels: range, residual: bool) -> Tensor:
    """Codes ``[len(levels), n]`` of a few rows ``x [n, Dc]`` by the defining search itself: per level the
    float64 score ``r·c_k - |c_k|^2/2`` of every code (each product exact, each row-code pair summed on its
    own, as :func:`_exact_best` sums candidates) and the first maximum, the residual kept in fp32.

    For ``n K Dc`` up to ``FEW_ROWS_ELEMENTS`` this is a handful of operations per level where the bound
    path takes about fifty (GEMM, bound, block maxima, candidates, decision): a stream's push of a few
    frames with a small codebook is dispatch-bound, not compute-bound. The same codes by definition.
    """
    weight64, half64, weight = _float64_codebooks(tables)
    r = x.to(device=tables.device, dtype=torch.float32, copy=True)
    out = []
    last = len(levels) - 1
    for i, level in enumerate(levels):
        scores = torch.mul(r.double().unsqueeze(1), weight64[level]).sum(-1).sub_(half64[level])  # [n, K]
        out.append(scores.argmax(dim=1))  # the first maximum
        if residual and i < last:
            r.sub_(weight[level].index_select(0, out[-1]))
    return torch.stack(out)


def _search(tables: _SearchTables, x: Tensor, levels: range, step: int, residual: bool) -> Tensor:
    """Exact (residual) nearest-code search -> codes ``[len(levels), N]``.

    Why pipelines: per chunk and level the work is one GEMM and then the candidate steps, a gather and a
    subtraction. Run with all torch threads, each of those small ops is its own parallel region with a
    barrier, and together they cost a large fraction of the GEMM time (measured: ~40% at 2 threads on a
    busy machine). On CPU, chunks are therefore handed to a pool of ``T = torch.get_num_threads()``
    threads that each run single-threaded end to end: no barriers, and the small ops of one pipeline
    overlap the GEMMs of the others. Codes are identical either way.
    """
    n = x.shape[0]
    if (tables.device.type == "cpu" and tables.stats is None
            and n * tables.codebook_size * tables.dim <= FEW_ROWS_ELEMENTS):
        return _search_few(tables, x, levels, residual)
    if tables.int8 is not None and tables.int8.kernel == "int_mm" and tables.device.type == "cpu":
        step = max(1, step // 2)  # int32 + fp32 scores: the same memory as one fp32 [step, K] matrix
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


# ---------------------------------------------------------------------- traceable path
def search_traceable(codebooks: Tensor, x: Tensor, levels: int, top: int = 4) -> Tensor:
    """Exact residual codes ``[N, levels]`` as one straight-line graph, for ``torch.compile`` / ``export``.

    No data-dependent shapes and no Python branch on data: per level an fp32 GEMM over all ``N`` rows,
    the ``top`` best fp32 scores re-scored in float64 (the same bound as :func:`_nearest_fp32` says which
    of them are candidates), and, through ``torch.cond``, a float64 search over all codes when some row
    has more candidates than ``top`` (only near-duplicate codes do that). Codes equal the eager search's.
    """
    r = x.float()
    d = r.shape[1]
    k = codebooks.shape[1]
    m = min(top, k)
    g = _gamma(d + 1)
    out = []
    for level in range(levels):
        c = codebooks[level].float()
        h64 = 0.5 * c.double().square().sum(-1)
        cmax = c.double().norm(dim=-1).amax() * (1 + 1e-9)
        hmax = h64.amax() * (1 + 1e-9)
        scores = torch.addmm((-h64).float(), r, c.t())
        vals, idx = scores.topk(m, dim=1)
        rn = torch.linalg.vector_norm(r, dim=1).double() * (1 + _gamma(d + 2))
        bound = (g * (rn * cmax + hmax) + 2 * _U * hmax) * (1 + 1e-6)
        thr = _threshold(vals[:, 0], bound)
        s64 = (r.double().unsqueeze(1) * c[idx].double()).sum(-1) - h64[idx]
        s64 = torch.where(vals >= thr[:, None], s64, -math.inf)
        best = s64.amax(1, keepdim=True)
        code = torch.where(s64 == best, idx, k).amin(1)
        if m < k:
            complete = vals[:, m - 1] < thr
            code = torch.cond(complete.all(), _keep_codes, _exhaustive_rows, (code, complete, r, c, h64))
        out.append(code)
        if level + 1 < levels:
            r = r - c[code]
    return torch.stack(out, dim=1)


def _keep_codes(code: Tensor, complete: Tensor, r: Tensor, c: Tensor, h64: Tensor) -> Tensor:
    return code.clone()


def _exhaustive_rows(code: Tensor, complete: Tensor, r: Tensor, c: Tensor, h64: Tensor) -> Tensor:
    full = (r.double() @ c.double().t() - h64).argmax(dim=1)
    return torch.where(complete, code, full)


# ---------------------------------------------------------------------- the CPU thread pool
_MIN_ROWS_PER_WORKER = 16
_POOL_LOCK = threading.Lock()
_POOL: tuple[int, int, ThreadPoolExecutor | None] | None = None  # (pid, size, pool)


def _pipeline_workers(tables: _SearchTables, n: int) -> int:
    if tables.device.type != "cpu" or not _openmp_threads():
        return 1
    if tables.precision != "int8" and tables.backend != "onednn":
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
