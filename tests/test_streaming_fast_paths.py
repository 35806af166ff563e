"""The per-push fast paths of streaming: the few-row exact search (search._search_few), inference-mode state,
mel frames straight from the feature extractor's spectrogram step. Each gives what the general path gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_rvq import search, streaming
from gemma_rvq.quantization import ResidualQuantizer
from gemma_rvq.streaming import Gemma4StreamingEncoder

SR = 16000


def float64_exhaustive(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The defining search: per level the float64 score ``r·c_k - |c_k|^2/2`` of every code (each row-code pair
    summed on its own), the first maximum, the residual kept in fp32 -> codes ``[N, Q]``."""
    r = x.float()
    out = []
    for level in range(codebooks.shape[0]):
        c = codebooks[level].float().double()
        code = ((r.double()[:, None, :] * c[None]).sum(-1) - 0.5 * c.square().sum(1)).argmax(1)
        out.append(code)
        r = r - codebooks[level].float()[code]
    return torch.stack(out, 1)


def near_tie_codebooks(dim: int = 16, k: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two levels: level 0 has codes within 1e-6 of one point p, exact duplicates of code 3 among them, the
    rest random; rows sit on p (score gaps ~1e-12 relative: only float64 separates them) or on code 3
    (exact ties: the lowest index must win). Level 1 random."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(dim, generator=g)
    level0 = torch.randn(k, dim, generator=g)
    u = torch.randn(12, dim, generator=g)
    level0[:12] = p + 1e-6 * u / u.norm(dim=1, keepdim=True)
    level0[20:24] = level0[3]
    x = p + 1e-6 * torch.randn(6, dim, generator=g)
    x[:2] = level0[3]
    return torch.stack([level0, torch.randn(k, dim, generator=g)]), x


def _quantizer(codebooks: torch.Tensor, precision: str = "fp32") -> ResidualQuantizer:
    q, k, dim = codebooks.shape
    rq = ResidualQuantizer(dim, q, k, search_precision=precision).eval()
    rq.codebooks.data.copy_(codebooks)
    rq.invalidate_cache()
    return rq


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_few_row_search_is_the_float64_exhaustive_search_on_near_ties(seed, monkeypatch):
    codebooks, x = near_tie_codebooks(seed=seed)
    rq = _quantizer(codebooks)
    calls = []
    few = search._search_few
    monkeypatch.setattr(search, "_search_few", lambda *a, **k: calls.append(1) or few(*a, **k))
    codes = rq.encode(x)
    assert calls, "a few rows against a small codebook must take the few-row path"
    assert torch.equal(codes, float64_exhaustive(x, codebooks))
    assert torch.all(codes[:2, 0] == 3)  # exact ties with codes 20..23: the lowest index
    # the bound-and-rescore path (forced) gives the same codes
    monkeypatch.setattr(search, "FEW_ROWS_ELEMENTS", 0)
    calls.clear()
    assert torch.equal(_quantizer(codebooks).encode(x), codes)
    assert not calls


@pytest.mark.parametrize("precision", ["fp32"] + (["int8"] if search.int8_usable(torch.device("cpu"), 16) else []))
def test_few_row_search_equals_the_bound_path_on_random_rows(precision, monkeypatch):
    g = torch.Generator().manual_seed(3)
    codebooks = torch.randn(4, 64, 16, generator=g)
    x = torch.randn(40, 16, generator=g)  # 40 x 64 x 16 = 40960 products per level: the few-row path
    few = _quantizer(codebooks, precision).encode(x)
    nearest = _quantizer(codebooks, precision).nearest(x, 1)
    monkeypatch.setattr(search, "FEW_ROWS_ELEMENTS", 0)
    bound = _quantizer(codebooks, precision)
    assert torch.equal(few, bound.encode(x))
    assert torch.equal(nearest, bound.nearest(x, 1))  # one level, no residual
    assert torch.equal(few, float64_exhaustive(x, codebooks))


def test_few_row_search_leaves_large_searches_and_stats_to_the_bound_path(monkeypatch):
    codebooks = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(4))
    calls = []
    few = search._search_few
    monkeypatch.setattr(search, "_search_few", lambda *a, **k: calls.append(1) or few(*a, **k))
    rq = _quantizer(codebooks)
    rq.encode(torch.randn(65, 16))  # 65 x 64 x 16 > FEW_ROWS_ELEMENTS
    assert not calls
    tables = rq._search_tables()
    tables.stats = search.SearchStats()  # benchmarks count the bound path's candidates
    rq.encode(torch.randn(3, 16))
    assert not calls and tables.stats.rows == 6
    tables.stats = None
    rq.encode(torch.randn(3, 16))
    assert calls


def test_stream_returns_normal_tensors_not_inference_tensors(tiny_gemma4_rvq, make_speech):
    """The push runs in inference mode; what it returns must still work like any tensor (in-place ops,
    autograd inputs): codes, token streams and the encoder's embeddings."""
    wave = make_speech(1.0, SR, seed=31)
    stream = tiny_gemma4_rvq.stream(SR)
    pieces = [stream.push(wave[:4000]), stream.push(wave[4000:4001]), stream.flush()]
    for codes in pieces:
        assert not codes.is_inference() and codes.is_contiguous()
        codes += 0  # in place: refused on an inference tensor outside inference mode
    assert pieces[0].shape[1] > 0 and pieces[2].shape[1] > 0
    adapter = tiny_gemma4_rvq._encoder_adapter()
    encoder = Gemma4StreamingEncoder(adapter.model, adapter.feature_extractor)
    for emb in (encoder.push(wave), encoder.flush()):
        assert not emb.is_inference()
        emb.mul_(1.0)


def test_mel_frames_straight_from_the_spectrogram_step_equal_the_feature_extractor_call(tiny_gemma4_rvq, make_speech):
    """``_mel`` skips the feature extractor's batching and padding; the embeddings are bit for bit those of
    the ``__call__`` route, for pushes of 1 sample to 2 s."""
    wave = make_speech(2.5, SR, seed=32)
    adapter = tiny_gemma4_rvq._encoder_adapter()
    rng = np.random.default_rng(1)
    sizes = [1, 1, 399, 2560, 7, 32000, *rng.integers(1, 5000, size=20).tolist()]

    def run(direct: bool) -> torch.Tensor:
        encoder = Gemma4StreamingEncoder(adapter.model, adapter.feature_extractor)
        encoder._direct_mel = direct
        out, i, k = [], 0, 0
        while i < len(wave):
            out.append(encoder.push(wave[i : i + sizes[k % len(sizes)]]))
            i, k = i + sizes[k % len(sizes)], k + 1
        out.append(encoder.flush())
        assert encoder._direct_mel == direct
        return torch.cat(out)

    assert torch.equal(run(True), run(False))


def test_depthwise_taps_equal_the_convolution(make_speech):
    conv = torch.nn.Conv1d(8, 8, 5, groups=8, bias=False)
    x = torch.randn(1, 8, 4 + 7)
    taps = streaming._depthwise_taps(conv)
    torch.testing.assert_close(streaming._causal_depthwise(conv, x, taps), conv(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(streaming._causal_depthwise(conv, x, taps), streaming._causal_depthwise(conv, x))
