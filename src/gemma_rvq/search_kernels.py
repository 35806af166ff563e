"""Fused CPU kernels of the exact search (numba): the passes around the score GEMM, one sweep each.

Per chunk of ``n`` rows and level, the eager int8 search (:func:`gemma_rvq.search._nearest_int8`) runs
about fifty torch operations around the GEMM: the residual update, the row quantization and its norms,
the scaling and bias of the scores, block maxima, thresholds, candidates, their bounds, the survivors
and the float64 decision. Each reads or writes whole ``[n, Dc]`` or ``[n, K]`` tensors, and together they
cost about as much as the int8 GEMM itself. Here they are two passes:

* :func:`quantize_rows` ``r [n, Dc]`` -> the residual update ``r -= c[codes]`` (the previous level's codes),
  the int8 rows ``x_i``, their scales ``s_i`` and the rounded-up norms ``|r_i|``, ``|r_i - s_i x_i|``;
* :func:`decide_rows` the int8 GEMM's scores ``[n, K]`` -> per row the block maxima, the per-block
  thresholds, the candidates and their bounds, the survivors, and the code: the lone survivor, else the
  lone survivor of an fp32 re-scoring, else the first maximum of the float64 scores ``r·c_k - |c_k|^2/2``.
  Rows it cannot decide (too many survivors, non-finite values) are marked for the eager fp32 / float64
  search.

The fp32 search has its own one-pass decision (:func:`decide_rows_fp32`) after the fp32 GEMM.

The arithmetic is the eager path's, with the same bounds (see ``docs/benchmarks.md``): sums may be
reordered (every bound holds for any summation order) and products fused into FMAs (one rounding where
the bounds allow two); comparisons stay IEEE (no ``nnan``/``ninf`` assumptions). So the codes are those
of the float64 exhaustive search, as on every other path.

numba comes with the ``fast`` extra (and ``all``); where it cannot be imported (or this module's ``ABI`` is not
the one ``search.py`` expects) the search runs the eager torch steps, with one warning. Compiled on first use and
cached on disk.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_U = 2.0 ** -24  # unit roundoff of fp32
_TINY = np.float32(1e-30)
_F127 = np.float32(127.0)
_ONE = np.float32(1.0)
_FINITE_BITS = 0x7F800000  # |x| bits at or above this: inf or nan (also the order key of +inf)
_NEG_INF_KEY = -2139095041  # the order key of -inf (bits 0xFF800000); -nan keys are below it

# Sums may be reassociated (vectorised) and products fused; nothing may assume finite values.
_FLAGS = {"reassoc", "contract"}


def _jit(fastmath: set[str]):
    """``numba.njit(nogil=True)``, cached on disk where numba finds a writable place (next to this file, else
    the user's cache folder), compiled in memory on each import otherwise."""
    def wrap(fn):
        try:
            return njit(nogil=True, cache=True, fastmath=fastmath)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(nogil=True, fastmath=fastmath)(fn)
    return wrap


#: the kernels' signatures (search.py checks it: a checkpoint's remote-code search.py may meet another version)
ABI = 2

#: decide_rows' row status: decided (one survivor, or one after fp32 re-scoring), more than
#: ``max_candidates`` survivors, a non-finite score or bound, decided in float64
DECIDED, FALLBACK, EXHAUSTIVE, EXACT = 0, 1, 2, 3


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


@_jit(_FLAGS)
def quantize_rows(r, codes, prev, residual, offset, up, xq, scale, rn64, dn64):  # pragma: no cover - compiled
    """One pass per row of ``r [n, Dc]`` (fp32, updated in place when ``residual``: ``r_i -= prev[codes_i]``).

    Writes ``xq [n, Dc]`` (uint8: ``y + offset`` modulo 256 of the integers ``y = rint(r_i * fl(127 / max|r_i|))``;
    offset 128 is qlinear's uint8, offset 0 the bits of int8), ``scale [n]`` (fp32 ``max|r_i| / 127``),
    and ``rn64``, ``dn64`` ``[n]``: float64 upper bounds of ``|r_i|`` and ``|r_i - s_i y_i|`` (their fp32 sums
    rounded up by ``up = 1 + gamma_{Dc+4}``, ``dn`` also by the rounding of ``r - s y``). Returns False if a
    row is not finite or its squares overflow (the eager path then takes the chunk).
    """
    n, d = r.shape
    bits = r.view(np.int32)
    top_bits = np.empty(1, dtype=np.int32)
    top_float = top_bits.view(np.float32)
    finite = True
    for i in range(n):
        ri = r[i]
        if residual:
            ci = prev[codes[i]]
            for j in range(d):
                ri[j] = ri[j] - ci[j]
        bi = bits[i]
        top = np.int32(0)
        for j in range(d):  # max |r_ij| as integer bits: vectorises where a float max does not
            top = max(top, np.int32(bi[j] & 0x7FFFFFFF))
        ss = np.float32(0.0)
        for j in range(d):
            ss += ri[j] * ri[j]
        if top >= _FINITE_BITS or not np.isfinite(ss):
            finite = False
            continue
        top_bits[0] = top
        amax = top_float[0]
        if amax > _TINY:
            inv = _F127 / amax
            s = amax / _F127
        else:
            inv = _ONE
            s = _ONE
        xi = xq[i]
        dd = np.float32(0.0)
        for j in range(d):
            v = ri[j]
            y = np.rint(v * inv)
            xi[j] = np.uint8((np.int32(y) + offset) & 0xFF)
            e = v - s * y
            dd += e * e
        scale[i] = s
        rn = np.float64(np.sqrt(ss)) * up
        dn = np.float64(np.sqrt(dd)) * up
        rn64[i] = rn
        dn64[i] = dn + 2 * _U * (rn + dn)
    return finite


@_jit(set())
def _prune(cand, cs, ce, c):  # pragma: no cover - compiled
    """Keep, in place and in order, the first ``c`` candidates ``cand`` whose float64 score ``cs`` and bound ``ce``
    allow them to be the best: ``s_a + e_a >= max_b (s_b - e_b)`` (a relative 2^-50 covers this rounding). A
    candidate with a non-finite lower end always stays and rules out none. Returns how many stay."""
    low = -np.inf
    for a in range(c):
        lower = cs[a] - ce[a]
        if np.isfinite(lower):
            low = max(low, lower)
    kept = 0
    for a in range(c):
        lower = cs[a] - ce[a]
        if cs[a] + ce[a] + (abs(cs[a]) + ce[a]) * 2.0 ** -50 >= low or not np.isfinite(lower):
            cand[kept] = cand[a]
            kept += 1
    return kept


@_jit({"reassoc"})
def _block_maxima(brow, block, bm):  # pragma: no cover - compiled
    """Block maxima ``bm [K / block]`` (fp32) of one row of scores given as its int32 bits ``brow [K]``, taken on
    order-preserving integer keys of the floats (a float max does not vectorise). In key order: -nan < -inf <
    finite < +inf < +nan. Returns True when the row holds a +inf or a nan (-inf scores, from an overflowing
    bias, never reach a finite threshold: they are allowed, as in the eager path)."""
    lo = np.int32(2147483647)
    hi = np.int32(-2147483647)
    key = np.empty(1, dtype=np.int32)
    key_float = key.view(np.float32)
    for b in range(bm.size):
        seg = brow[b * block:(b + 1) * block]
        m = np.int32(-2147483647)
        for j in range(block):
            x = seg[j]
            kx = np.int32(x ^ ((x >> 31) & 0x7FFFFFFF))
            m = max(m, kx)
            lo = min(lo, kx)
        hi = max(hi, m)
        key[0] = m ^ ((m >> 31) & 0x7FFFFFFF)
        bm[b] = key_float[0]
    return hi >= _FINITE_BITS or lo < _NEG_INF_KEY


@_jit({"reassoc"})
def _first_max64(ri, weight, half64, cand, c):  # pragma: no cover - compiled
    """The first of the candidate codes ``cand[:c]`` with the largest float64 score ``r·c_k - |c_k|^2/2`` (each
    product of two fp32 numbers is exact in float64)."""
    top = -np.inf
    arg = cand[0]
    for a in range(c):
        code = cand[a]
        wk = weight[code]
        acc = 0.0
        for j in range(ri.size):
            acc += np.float64(ri[j]) * np.float64(wk[j])
        acc -= half64[code]
        if acc > top:
            top = acc
            arg = code
    return arg


@_jit({"reassoc"})
def decide_rows(scores, scale, neg_half, rn64, dn64, slack_r, slack_0, err_block, code_block, err_norm, code_norm,
                r, weight, code_norm32, half_norm32, gamma32, half64, block, max_candidates, out, status,
                counts):  # pragma: no cover - compiled
    """Codes of ``n`` rows from the int8 GEMM's scores ``[n, K]`` (fp32 ``t_k (x_i·q_k)``), in one pass per row.

    ``A_ik = s_i scores_ik + neg_half_k`` (as the eager path: a product and a sum, never fused), formed
    row by row in a ``[K]`` buffer (``scores`` is only read); the bound ``E_ik = (|r_i| |e_k| + |d_i| |t_k q_k| + slack_i)(1 + 1e-6)``
    with ``slack_i = slack_r (|r_i| + |d_i|) + slack_0``; per block of ``block`` codes its maxima
    ``err_block``, ``code_block`` ``[K / block]``. Rows with 2+ survivors are re-scored in fp32 against ``r
    [n, Dc]``, ``weight [K, Dc]`` with the bound ``gamma32 (|r_i| code_norm32_k + half_norm32_k)`` (fp32 upper
    bounds of ``|c_k|`` and ``|c_k|^2/2``), then, if still 2+, in float64 with ``half64 [K]``. Writes ``out [n]``
    (int64 code), ``status [n]`` (:data:`DECIDED`, :data:`EXACT`: decided in float64, :data:`FALLBACK`: more
    than ``max_candidates`` survivors, :data:`EXHAUSTIVE`: a non-finite score or bound) and ``counts [n]``
    (survivors of the int8 bound; -1 where a non-finite value stopped the row). Returns the number of rows
    not decided here (:data:`FALLBACK` or :data:`EXHAUSTIVE`).
    """
    n, k = scores.shape
    nb = k // block
    d = r.shape[1]
    # the row's scores A_ik go to an L1-sized buffer, not back to the [n, K] matrix: writing 8 MB back made
    # this pass 17 % slower (the values are identical either way: a product and a sum, never fused)
    tmp = np.empty(k, dtype=np.float32)
    tbits = tmp.view(np.int32)
    bm = np.empty(nb, dtype=np.float32)
    eb = np.empty(nb, dtype=np.float64)
    thr = np.empty(nb, dtype=np.float32)
    cand = np.empty(k, dtype=np.int64)
    cs = np.empty(k, dtype=np.float64)
    ce = np.empty(k, dtype=np.float64)
    undecided = 0
    for i in range(n):
        s = scale[i]
        row = scores[i]
        for j in range(k):
            tmp[j] = s * row[j] + neg_half[j]
        if _block_maxima(tbits, block, bm):  # a +inf or a nan: the float64 search
            status[i] = EXHAUSTIVE
            undecided += 1
            counts[i] = -1
            continue
        rn = rn64[i]
        dn = dn64[i]
        slack = slack_r * (rn + dn) + slack_0
        best = -np.inf
        for b in range(nb):
            e = (rn * err_block[b] + dn * code_block[b] + slack) * (1 + 1e-6)
            eb[b] = e
            best = max(best, np.float64(bm[b]) - e)
        if not np.isfinite(best):
            status[i] = EXHAUSTIVE
            undecided += 1
            counts[i] = -1
            continue
        best = best - abs(best) * 2.0 ** -20 - 2.0 ** -140
        for b in range(nb):
            thr[b] = np.float32(best - eb[b] * (1 + 2.0 ** -20))
        # candidates, their scores and bounds
        c = 0
        for b in range(nb):
            t = thr[b]
            if bm[b] < t:
                continue
            for j in range(b * block, (b + 1) * block):
                v = tmp[j]
                if v >= t:
                    cand[c] = j
                    cs[c] = np.float64(v)
                    ce[c] = (rn * err_norm[j] + dn * code_norm[j] + slack) * (1 + 1e-6)
                    c += 1
        kept = _prune(cand, cs, ce, c)
        counts[i] = kept
        if kept == 0:
            status[i] = EXHAUSTIVE
            undecided += 1
            counts[i] = -1
        elif kept == 1:
            status[i] = DECIDED
            out[i] = cand[0]
        elif kept > max_candidates:
            status[i] = FALLBACK
            undecided += 1
        else:
            ri = r[i]
            # fp32 re-scoring: the dot product errs by gamma_{Dc+2} |r_i| |c_k| in any order, the bias by
            # gamma_{Dc+2} |c_k|^2/2 (the eager ``_rescore32`` bound); then the same survivor rule
            for a in range(kept):
                code = cand[a]
                wk = weight[code]
                acc32 = np.float32(0.0)
                for j in range(d):
                    acc32 += ri[j] * wk[j]
                cs[a] = np.float64(acc32) + np.float64(neg_half[code])
                ce[a] = gamma32 * (rn * np.float64(code_norm32[code]) + np.float64(half_norm32[code])) * (1 + 1e-6)
            left = _prune(cand, cs, ce, kept)
            if left == 1:
                status[i] = DECIDED
                out[i] = cand[0]
                continue
            status[i] = EXACT
            out[i] = _first_max64(ri, weight, half64, cand, left)
    return undecided


@_jit({"reassoc"})
def decide_rows_fp32(scores, bound, r, weight, half64, block, out, status, counts):  # pragma: no cover - compiled
    """Codes of ``n`` rows from fp32 scores ``A [n, K]`` (the GEMM with its bias) with a row bound ``bound [n]``
    (float64, ``|A_ik - S_ik| <= E_i``), in one pass per row: the eager ``_nearest_fp32`` steps.

    Per row the block maxima (``block`` codes), the threshold ``max_k A_ik - 2 E_i`` (float64, lowered by a
    relative 2^-50 for its own rounding, then rounded down to fp32), the candidates at or above it, and the
    code: the lone candidate, else the first maximum of the float64 scores ``r·c_k - |c_k|^2/2``
    (``half64 [K]``). Writes ``out``, ``status`` (:data:`DECIDED`, :data:`EXACT`, :data:`EXHAUSTIVE`: a +inf or
    nan score or a non-finite threshold) and ``counts`` (candidates; -1 where not decided here). Returns the
    number of :data:`EXHAUSTIVE` rows.
    """
    n, k = scores.shape
    nb = k // block
    bits = scores.view(np.int32)
    bm = np.empty(nb, dtype=np.float32)
    cand = np.empty(k, dtype=np.int64)
    undecided = 0
    for i in range(n):
        row = scores[i]
        bad = _block_maxima(bits[i], block, bm)
        t = np.float64(bm.max()) - 2.0 * bound[i]
        t = t - abs(t) * 2.0 ** -50
        if bad or not np.isfinite(t):
            status[i] = EXHAUSTIVE
            counts[i] = -1
            undecided += 1
            continue
        thr = np.float32(t)
        if np.float64(thr) > t:  # round toward minus infinity
            thr = np.nextafter(thr, np.float32(-np.inf))
        c = 0
        for b in range(nb):
            if bm[b] < thr:
                continue
            for j in range(b * block, (b + 1) * block):
                if row[j] >= thr:
                    cand[c] = j
                    c += 1
        counts[i] = c
        if c == 1:
            status[i] = DECIDED
            out[i] = cand[0]
            continue
        status[i] = EXACT
        out[i] = _first_max64(r[i], weight, half64, cand, c)
    return undecided


def slack_terms(code_max: float, half_max: float, dim: int) -> tuple[float, float]:
    """``(slack_r, slack_0)`` of the eager bound's slack ``8u (|r| + |d|) code_max + (8u + gamma_Dc) half_max``."""
    return 8 * _U * code_max, (8 * _U + _gamma(dim)) * half_max


def warm_up() -> None:
    """Compile (or load from the cache) both kernels on tiny arrays."""
    r = np.ones((2, 8), dtype=np.float32)
    xq = np.empty((2, 8), dtype=np.uint8)
    scale, rn, dn = np.empty(2, np.float32), np.empty(2), np.empty(2)
    quantize_rows(r, np.zeros(2, np.int64), r, True, 128, 1.0 + 1e-6, xq, scale, rn, dn)
    scores = np.ones((2, 32), dtype=np.float32)
    out, status, counts = np.empty(2, np.int64), np.empty(2, np.int8), np.empty(2, np.int32)
    z, z32 = np.zeros(32), np.zeros(32, np.float32)
    decide_rows(scores, scale, z32, rn, dn, 0.0, 0.0, z[:2], z[:2], z, z, r, np.ones((32, 8), np.float32), z32, z32,
                0.0, z, 16, 32, out, status, counts)
    decide_rows_fp32(scores, rn, r, np.ones((32, 8), np.float32), z, 16, out, status, counts)
    assert math.isfinite(float(rn[0]))
