"""The nearest-code search (search.py): rigorous bounds, exact codes whatever the kernel, compile / export."""

from __future__ import annotations

import pytest
import torch

from gemma_rvq import search
from gemma_rvq.quantization import ResidualQuantizer

PRECISIONS = ["fp32"] + (["int8"] if search.int8_usable(torch.device("cpu"), 64) else [])
KERNELS = [k for k in search.INT8_KERNELS if search._kernel_exact(k, torch.device("cpu"))]


@pytest.fixture(params=["fused", "eager"])
def int8_path(request, monkeypatch):
    """The int8 search's two implementations: the fused numba kernels (the default where numba is installed,
    as ``make test`` installs it) and the eager torch steps. Same codes, by the same bounds."""
    monkeypatch.setattr(search, "FUSED_KERNELS", request.param == "fused")
    if request.param == "fused":
        assert search._load_fused_kernels(), "make installs the `fast` extra (numba): the fused kernels must load"
    return request.param


def reference_codes(x: torch.Tensor, codebooks: torch.Tensor, levels: int | None = None) -> torch.Tensor:
    """float64 exhaustive search over the fp32 residual the quantizer keeps: ``[N, L]``, first best code.

    Scores ``r·c_k - |c_k|^2/2`` (the same order as distances, without their cancellation for huge
    rows), every (row, code) pair summed on its own: identical codes score identically."""
    r = x.float()
    out = []
    for level in range(levels or codebooks.shape[0]):
        c = codebooks[level].float().double()
        half = 0.5 * c.square().sum(1)
        code = torch.cat([((rc.double()[:, None, :] * c[None]).sum(-1) - half).argmax(1) for rc in r.split(64)])
        out.append(code)
        r = r - codebooks[level].float()[code]
    return torch.stack(out, 1)


def _quantizer(dim, q, k, codebooks=None, seed=0, **kw) -> ResidualQuantizer:
    torch.manual_seed(seed)
    rq = ResidualQuantizer(dim, q, k, **kw).eval()
    if codebooks is not None:
        rq.codebooks.data.copy_(codebooks)
        rq.invalidate_cache()
    return rq


def _near_tie_codebook(dim=64, k=256, near=200, eps=1e-4, seed=0):
    """Level 0: ``near`` codes at distance ~eps of one point p (|p| ~ 10) plus exact duplicates among them,
    the rest random; queries close to p. Score gaps are ~1e-6 of the scores: far inside the int8 bound
    (every near code a candidate: the fp32 fallback) and inside the fp32 bound (float64 decides)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(dim, generator=g)
    p *= 10 / p.norm()
    u = torch.randn(near, dim, generator=g)
    u /= u.norm(dim=1, keepdim=True)
    cb = torch.randn(k, dim, generator=g) * 3
    cb[:near] = p + eps * u
    cb[near - 20:near] = cb[10]  # exact duplicates of code 10: ties, the lowest index must win
    x = p + 3 * eps * torch.randn(300, dim, generator=g) / dim**0.5
    x[:20] = cb[10] + 1e-7 * torch.randn(20, dim, generator=g)  # nearest: code 10 and its duplicates
    return cb, x


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("n", "dim", "k", "chunk"), [(1, 16, 8, 4), (37, 32, 97, 8), (300, 64, 256, 64),
                                                     (513, 48, 2048, 1024)])
def test_codes_equal_float64_exhaustive_search(precision, n, dim, k, chunk, int8_path):
    rq = _quantizer(dim, 3, k, search_precision=precision, search_chunk_size=chunk)
    x = torch.randn(n, dim) * 0.7
    codes = rq.encode(x)
    assert rq._search_tables().precision == precision
    assert torch.equal(codes, reference_codes(x, rq.codebooks))  # identical, not "up to near-ties"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_adversarial_near_ties_and_duplicates_are_exact(precision, int8_path):
    cb, x = _near_tie_codebook()
    rq = _quantizer(64, 1, 256, cb[None], search_precision=precision)
    tables = rq._search_tables()
    tables.stats = search.SearchStats()
    codes = rq.encode(x)
    assert torch.equal(codes, reference_codes(x, rq.codebooks))
    assert torch.all(codes[:20, 0] == 10)  # exact ties: the first of the duplicates
    stats = tables.stats.summary()
    assert stats["exact_rate"] > 0.5  # fp32 could not separate these: float64 decided
    if precision == "int8":
        assert stats["fallback_rate"] > 0.5  # more than MAX_INT8_CANDIDATES: searched again with fp32 scores
    else:
        assert stats["max_candidates"] > search.MAX_INT8_CANDIDATES


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_int8_kernel_gives_the_exact_codes(kernel, monkeypatch, int8_path):
    dim, k = 96, 384
    monkeypatch.setitem(search._INT8_CHOICE, ("cpu", None, dim, k), kernel)
    g = torch.Generator().manual_seed(1)
    rq = _quantizer(dim, 4, k, search_precision="int8", search_chunk_size=100)
    x = torch.randn(400, dim, generator=g)
    codes = rq.encode(x)
    assert rq._search_tables().int8.kernel == kernel
    assert torch.equal(codes, reference_codes(x, rq.codebooks))


@pytest.mark.skipif("int_mm" not in KERNELS, reason="no exact torch._int_mm on this CPU")
@pytest.mark.skipif(len(KERNELS) < 2, reason="needs two exact int8 kernels")
def test_kernel_probe_keeps_the_first_kernel_unless_another_is_much_faster(monkeypatch):
    """A one-off timing on a loaded machine must not swap qlinear (scales in the epilogue, full chunks) for
    int_mm on a coin flip: another kernel is chosen only when INT8_KERNEL_MARGIN times as fast."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(search, "INT8_KERNEL_MARGIN", 1e9)
    assert search._probe_kernels(KERNELS, cpu, 64, 128) == KERNELS[0]
    assert search._probe_kernels(KERNELS[::-1], cpu, 64, 128) == KERNELS[-1]
    monkeypatch.setattr(search, "INT8_KERNEL_MARGIN", 1.0)
    assert search._probe_kernels(KERNELS, cpu, 64, 128) in KERNELS


def test_cuda_layout_runs_exactly_on_cpu():
    """What only CUDA uses, run on CPU: int8 codes padded to multiples of 8, column-major, at least 17
    rows per GEMM, candidates from one compare over the scores, fp32 re-scoring from gathered rows."""
    dim, k = 30, 100  # neither a multiple of 8
    rq = _quantizer(dim, 3, k, search_precision="int8", search_chunk_size=40)
    tables = rq._search_tables()
    tables.int8 = search._Int8Tables(tables.weight, tables.bias, "int_mm", padded=True)
    tables.sparse_rescore = False
    tables.block = 0
    assert tables.int8.dim_pad == 2 and tables.int8.levels[0].qt.shape == (32, 104)
    x = torch.randn(205, dim)  # the last chunk has 5 rows
    assert torch.equal(rq.encode(x), reference_codes(x, rq.codebooks))
    cb, xt = _near_tie_codebook(dim=dim, k=k, near=60)
    rq.codebooks.data[0] = cb
    rq.invalidate_cache()
    tables = rq._search_tables()
    tables.int8 = search._Int8Tables(tables.weight, tables.bias, "int_mm", padded=True)
    tables.sparse_rescore, tables.block = False, 0
    assert torch.equal(rq.encode(xt), reference_codes(xt, rq.codebooks))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_score_error_bounds_hold(precision):
    """The bound every decision rests on: |A_ik - S_ik| <= E_ik, S computed in float64."""
    g = torch.Generator().manual_seed(2)
    dim, k = 128, 512
    # a hard mix: scales from 1e-3 to 1e3, a half-step pattern (maximal rounding), zero rows, tiny codes
    cb = torch.randn(1, k, dim, generator=g) * torch.logspace(-3, 3, k)[None, :, None]
    cb[0, :4] = 0
    cb[0, 4:8] = 1e-31
    r = torch.randn(64, dim, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    r[0] = 0
    r[1] = torch.arange(dim) % 2 + 0.5
    rq = _quantizer(dim, 1, k, cb, search_precision=precision)
    tables = rq._search_tables()
    exact = r.double() @ cb[0].double().t() - 0.5 * cb[0].double().square().sum(1)
    with torch.no_grad(), search._exact_fp32():
        if precision == "int8":
            scores, bound = search._int8_scores(tables, r.clone(), 0)
            rows, codes = torch.meshgrid(torch.arange(64), torch.arange(k), indexing="ij")
            e = bound.at(rows.reshape(-1), codes.reshape(-1)).view(64, k)
            assert torch.all(e <= bound.row[:, None])
        else:
            scores, e = search._fp32_scores(tables, r.clone(), 0)
            e = e[:, None].expand(64, k)
    err = (scores.double() - exact).abs()
    assert torch.all(err <= e), float((err - e).max())
    assert float((err / e).max()) > 1e-3  # not vacuous: the bound is within a few orders of the error


def test_huge_values_take_the_float64_path(int8_path):
    rq = _quantizer(8, 2, 16)
    x = torch.randn(10, 8)
    x[3, 1] = 3e38  # |x|^2 overflows fp32: an infinite bound, every code a candidate, float64 decides
    x[4] = -1e38
    x[5] = 3e38  # scores overflow too: no finite threshold, a float64 search over all codes
    stats = search.SearchStats()
    for precision in PRECISIONS:
        rq.search_precision = precision
        rq._search_tables().stats = stats
        assert torch.equal(rq.encode(x), reference_codes(x, rq.codebooks))
    assert stats.exact > 0 and stats.exhaustive > 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_thread_pool_pipelines_match_one_thread(precision, int8_path):
    rq = _quantizer(64, 4, 256, search_precision=precision, search_chunk_size=32)
    x = torch.randn(333, 64)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = rq.encode(x)
        torch.set_num_threads(2)
        assert torch.equal(rq.encode(x), single)
        assert torch.equal(rq.encode(x[:40]), single[:40])  # fewer rows than workers x chunk
        with torch.inference_mode():
            assert torch.equal(rq.encode(x), single)
            assert torch.equal(rq.encode(x[:40]), single[:40])
        codes = rq.encode(x.clone().requires_grad_(True))
        assert torch.equal(codes, single) and not codes.requires_grad
        assert torch.get_num_threads() == 2  # the pool does not change the caller's thread count
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(single, reference_codes(x, rq.codebooks))


def test_precision_option_validation_and_auto_choice():
    with pytest.raises(ValueError, match="search_precision must be one of"):
        ResidualQuantizer(8, 1, 4, search_precision="bf16")
    rq = _quantizer(8, 1, 4)
    rq.search_precision = "fp16"
    with pytest.raises(ValueError, match="search_precision must be one of"):
        rq.encode(torch.randn(2, 8))
    with pytest.raises(ValueError, match="search_precision='int8' is not available on device meta"):
        search.resolve_precision("int8", torch.device("meta"), 8, 4)
    rq.search_precision = "auto"
    assert rq._search_tables().precision in ("int8", "fp32")  # measured per device and shape, then cached
    assert search.resolve_precision("fp32", torch.device("cpu"), 8, 4) == ("fp32", None)


def test_search_stats_count_rows_and_candidates(int8_path):
    rq = _quantizer(32, 2, 64)
    tables = rq._search_tables()
    tables.stats = search.SearchStats()
    rq.encode(torch.randn(100, 32))
    s = tables.stats.summary()
    assert s["rows"] == 200 and s["mean_candidates"] >= 1 and s["max_candidates"] >= 1
    assert 0 <= s["rescored_rate"] <= 1 and s["fallback_rate"] == 0


def test_traceable_path_equals_eager_including_near_ties():
    cb, x = _near_tie_codebook(dim=32, k=64, near=40, seed=3)
    rq = _quantizer(32, 2, 64, torch.stack([cb, torch.randn(64, 32)]))
    eager = rq.encode(x)
    assert torch.equal(search.search_traceable(rq.codebooks, x, 2), eager)  # torch.cond fallback taken
    y = torch.randn(50, 32)
    assert torch.equal(search.search_traceable(rq.codebooks, y, 2), rq.encode(y))  # top-4 suffices


def test_torch_compile_fullgraph_and_export_match_eager():
    rq = _quantizer(16, 2, 32)
    x = torch.randn(40, 16)
    eager = rq.encode(x)
    compiled = torch.compile(rq.encode, fullgraph=True, backend="aot_eager")  # inductor: the slow test below
    assert torch.equal(compiled(x), eager)

    class Encode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rq = rq

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            return self.rq.encode(frames)

    frames = torch.export.Dim("frames", min=2)
    program = torch.export.export(Encode(), (x,), dynamic_shapes={"frames": {0: frames}})
    assert torch.equal(program.module()(x), eager)
    assert torch.equal(program.module()(x[:9]), rq.encode(x[:9]))  # dynamic number of frames


@pytest.mark.slow  # inductor generates and builds C++ kernels: 230-280 s measured at load 12-15 on 2 cores
def test_torch_compile_of_the_model_with_inductor_matches_eager():
    """Issue 12: ``torch.compile(model)`` with the default backend (inductor) runs on CPU and gives the eager
    codes and loss: under compilation the quantizer takes the traceable search (eager's oneDNN / int8 ops
    never reach inductor)."""
    from gemma_rvq.testing import tiny_rvq_model

    model = tiny_rvq_model("gemma4_audio", num_quantizers=2, codebook_size=16).eval()
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 30, model.config.dim, generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    with torch.no_grad():
        eager = model(embeddings=embeddings, attention_mask=mask)
        compiled = torch.compile(model)(embeddings=embeddings, attention_mask=mask)
    assert torch.equal(compiled.audio_codes, eager.audio_codes)
    assert torch.equal(compiled.codes_mask, eager.codes_mask)
    torch.testing.assert_close(compiled.loss, eager.loss)


@pytest.mark.parametrize("shape", [(3, 8), (64, 64), (1000, 64), (257, 40), (100, 37)])
def test_flat_nonzero_and_block_candidates_match_a_dense_compare(shape):
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=gen) > 0.97
    assert torch.equal(search._flat_nonzero(mask), mask.view(-1).nonzero().squeeze(1))
    # candidates with one threshold per row and block == the dense compare
    n, b, nb = 300, 64, 32
    scores = torch.randn(n, nb * b, generator=gen)
    thr = torch.randn(n, nb, generator=gen) + 2
    bm = scores.view(n, nb, b).amax(2)
    rows, codes, vals = search._candidates(scores, thr, bm, b)
    want_rows, want_codes = (scores >= thr.repeat_interleave(b, dim=1)).nonzero().unbind(1)
    assert torch.equal(rows, want_rows) and torch.equal(codes, want_codes)
    assert torch.equal(vals, scores[want_rows, want_codes])


def test_block_thresholds_are_below_every_real_threshold():
    gen = torch.Generator().manual_seed(2)
    bm = torch.randn(500, 32, generator=gen) * torch.logspace(-30, 30, 500)[:, None]
    eb = torch.rand(500, 32, generator=gen, dtype=torch.float64) * bm.abs().double().amax(1, keepdim=True)
    thr = search._block_thresholds(bm, eb)
    best = (bm.double() - eb).amax(1, keepdim=True)  # float64 here; the real value within 2^-52 of it
    assert thr.dtype == torch.float32
    assert bool((thr.double() <= best - eb - (best.abs() + eb) * 2.0 ** -50).all())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_exact_rescoring_in_slices_equals_one_slice(precision, monkeypatch):
    """Rows with many candidates are re-scored in float64 slices: same codes as all at once."""
    cb, x = _near_tie_codebook()
    whole = _quantizer(64, 1, 256, cb[None], search_precision=precision).encode(x)
    monkeypatch.setattr(search, "EXACT_RESCORE_ELEMENTS", 64 * 7)  # 7 candidates per slice
    sliced = _quantizer(64, 1, 256, cb[None], search_precision=precision).encode(x)
    assert torch.equal(sliced, whole) and torch.equal(sliced, reference_codes(x, cb[None]))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_dropping_repeated_codes_only_for_many_candidates_keeps_the_codes(precision, monkeypatch):
    """Equal candidate codes are dropped before float64 only above ``EXACT_DEDUP_PAIRS`` candidates (the
    usual handful of rows is cheaper to re-score than to sort): the codes are the same either way."""
    cb, x = _near_tie_codebook()
    want = reference_codes(x, cb[None])
    for pairs in (0, 10**9):  # always / never dropped
        monkeypatch.setattr(search, "EXACT_DEDUP_PAIRS", pairs)
        assert torch.equal(_quantizer(64, 1, 256, cb[None], search_precision=precision).encode(x), want)


@pytest.mark.parametrize("spread", [0.0, 1e-6])
def test_codebooks_of_equal_or_nearly_equal_codes_search_in_bounded_memory(spread):
    """Every code equal (silence frames, dead codes reset to one point) or nearly equal: each row has all K
    codes as candidates. Gathering them at once took tens of GB at K=2048, D=256 (a training run was killed
    at 24 GB); equal codes are now dropped but the first, and the rest re-scored in slices."""
    import subprocess
    import sys

    script = (
        "import resource, torch\n"
        "from gemma_rvq.quantization import ResidualQuantizer\n"
        "torch.set_num_threads(1)\n"
        "rq = ResidualQuantizer(256, 1, 2048, search_precision='fp32').eval()\n"
        f"rq.codebooks.data[:] = torch.randn(256) + {spread} * torch.randn(1, 2048, 256)\n"
        "rq.invalidate_cache()\n"
        "x = torch.randn(256, 256)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "codes = rq.encode(x)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    if spread == 0:
        script += "assert bool((codes == 0).all()), 'equal codes: the first wins every tie'\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[0]) < 400, f"peak grew by {out.stdout.split()[0]} MiB"


def test_fused_kernels_run_by_default_and_give_the_eager_codes(monkeypatch):
    """The int8 search on CPU runs the fused numba kernels where they apply: two passes around the GEMM
    instead of ~50 torch ops; codes identical to the eager steps and to float64, pool or not."""
    g = torch.Generator().manual_seed(4)
    rq = _quantizer(96, 4, 512, search_precision="int8", search_chunk_size=256)
    x = torch.randn(1100, 96, generator=g) * torch.logspace(-2, 2, 1100)[:, None]
    x[:5] = 0  # zero rows: scale 1, every code a candidate of equal score but the bias
    tables = rq._search_tables()
    assert search._fused_kernels(tables) is not None
    fused = rq.encode(x)
    monkeypatch.setattr(search, "FUSED_KERNELS", False)
    assert search._fused_kernels(tables) is None
    assert torch.equal(rq.encode(x), fused)
    assert torch.equal(fused, reference_codes(x, rq.codebooks))


def test_codes_whose_scores_overflow_are_searched_exactly(int8_path):
    """Codes so large that |c|^2/2 overflows fp32 (an infinite bias, infinite bounds) and, for code 7, the int8
    score too (nan where the dot product is positive). Rows the bounds cannot decide are searched again (fp32
    scores, then float64) or in float64 over all codes; the huge codes never win, the codes stay exact."""
    g = torch.Generator().manual_seed(5)
    cb = torch.randn(1, 128, 32, generator=g)
    cb[0, 9] = 1e20
    cb[0, 7] = 1e37
    rq = _quantizer(32, 1, 128, cb, search_precision="int8")
    tables = rq._search_tables()
    tables.stats = search.SearchStats()
    x = torch.randn(70, 32, generator=g)
    codes = rq.encode(x)
    assert torch.equal(codes, reference_codes(x, rq.codebooks)) and not bool(((codes == 7) | (codes == 9)).any())
    assert tables.stats.exhaustive > 0


def test_fused_row_quantization_bounds_and_residual_update():
    """``quantize_rows``: the residual update is torch's own fp32 subtraction (bit for bit), the int8 rows are
    integers in [-127, 127] stored with their offset, and the norms are upper bounds of the float64 ones."""
    kernels = search._load_fused_kernels()
    assert kernels
    g = torch.Generator().manual_seed(6)
    n, d, k = 50, 40, 30
    r = torch.randn(n, d, generator=g) * torch.logspace(-15, 15, n)[:, None]
    r[0] = 0
    prev = torch.randn(k, d, generator=g)
    codes = torch.randint(k, (n,), generator=g)
    want = r - prev[codes]
    xq, scale = torch.empty(n, d, dtype=torch.uint8), torch.empty(n)
    rn, dn = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    assert kernels.quantize_rows(r.numpy(), codes.numpy(), prev.numpy(), True, 128, 1 + search._gamma(d + 4),
                                 xq.numpy(), scale.numpy(), rn.numpy(), dn.numpy())
    assert torch.equal(r, want)
    y = xq.long() - 128
    assert int(y.abs().max()) <= 127 and int(y.abs().amax(1)[1:].min()) == 127  # the largest entry maps to 127
    assert bool((rn >= torch.linalg.vector_norm(r.double(), dim=1)).all())
    assert bool((dn >= torch.linalg.vector_norm(r.double() - scale.double()[:, None] * y.double(), dim=1)).all())
    r[3, 2] = float("inf")
    assert not kernels.quantize_rows(r.numpy(), codes.numpy(), prev.numpy(), False, 0, 1.0, xq.numpy(),
                                     scale.numpy(), rn.numpy(), dn.numpy())


def test_missing_numba_falls_back_to_the_eager_search_with_a_warning(monkeypatch):
    def no_numba(name, *args):
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(search, "_FUSED", None)
    monkeypatch.setattr(search.importlib, "import_module", no_numba)
    rq = _quantizer(32, 2, 64, search_precision="int8")
    x = torch.randn(100, 32)
    with pytest.warns(UserWarning, match="fused int8 search kernels are unavailable"):
        codes = rq.encode(x)
    assert search._FUSED is False and search._fused_kernels(rq._search_tables()) is None
    assert torch.equal(codes, reference_codes(x, rq.codebooks))


def test_kernels_of_another_version_are_not_called(monkeypatch):
    """A checkpoint's remote-code search.py imports the installed ``gemma_rvq.search_kernels`` by name: a
    version with other signatures is refused (a warning, the eager steps), never called."""
    import types

    monkeypatch.setattr(search, "_FUSED", None)
    monkeypatch.setattr(search.importlib, "import_module", lambda name, *a: types.SimpleNamespace(ABI=0))
    with pytest.warns(UserWarning, match="ABI 0, this search needs"):
        assert search._load_fused_kernels() is False


# ----------------------------------------------------------------------------- property test (hypothesis)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def search_cases(draw):
    """Codebooks and frames built to stress the bounds: clusters of codes within ``eps`` of one point (near-ties
    inside the int8 and fp32 bounds), exact duplicates, codes and rows on scales from 1e-6 to 1e6, zero rows,
    frames on top of codes."""
    dim = draw(st.sampled_from([8, 16, 40, 64]))
    k = draw(st.sampled_from([32, 64, 100, 128, 256]))
    levels = draw(st.integers(1, 3))
    n = draw(st.integers(1, 150))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    cb = torch.randn(levels, k, dim, generator=g)
    if draw(st.booleans()):  # codes on many scales
        cb *= torch.logspace(-draw(st.integers(0, 6)), draw(st.integers(0, 6)), k)[None, :, None]
    near = draw(st.integers(0, k // 2))
    if near:  # a cluster of near-equal codes at level 0, and duplicates inside it
        eps = 10.0 ** -draw(st.integers(1, 7))
        p = torch.randn(dim, generator=g) * 3
        cb[0, :near] = p + eps * torch.randn(near, dim, generator=g)
        dup = draw(st.integers(0, near // 2))
        cb[0, near - dup:near] = cb[0, 0]
    x = torch.randn(n, dim, generator=g) * 10.0 ** draw(st.integers(-3, 3))
    on_codes = draw(st.integers(0, n))
    x[:on_codes] = cb[0, torch.randint(k, (on_codes,), generator=g)] + 1e-4 * torch.randn(on_codes, dim, generator=g)
    zeros = draw(st.integers(0, 3))
    x[:zeros] = 0
    chunk = draw(st.sampled_from([7, 64, 1024]))
    return cb, x, chunk


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=search_cases())
def test_fused_and_eager_search_equal_float64_on_stressed_codebooks(case):
    cb, x, chunk = case
    want = reference_codes(x, cb)
    saved = search.FUSED_KERNELS
    try:
        for precision in PRECISIONS:
            rq = _quantizer(cb.shape[2], cb.shape[0], cb.shape[1], cb, search_precision=precision,
                            search_chunk_size=chunk)
            for fused in (True, False):
                search.FUSED_KERNELS = fused
                assert torch.equal(rq.encode(x), want), f"{precision}, fused={fused}"
    finally:
        search.FUSED_KERNELS = saved
