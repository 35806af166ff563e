"""The per-push fast paths of streaming: the few-row exact search (search._search_few), inference-mode state,
mel frames straight from the feature extractor's spectrogram step. Each gives what the general path gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_rvq import search, streaming_plan
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
    taps = streaming_plan._depthwise_taps(conv)
    torch.testing.assert_close(streaming_plan._causal_depthwise(conv, x, taps), conv(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(streaming_plan._causal_depthwise(conv, x, taps), streaming_plan._causal_depthwise(conv, x))


# ------------------------------------------------------------------------------ several streams per forward
def _push_batch(batch, waves: np.ndarray, sizes: list[int]) -> torch.Tensor:
    """Push ``waves [B, S]`` in chunks of ``sizes`` (cycled) -> codes ``[B, Q, T]``."""
    pieces, i, k = [], 0, 0
    while i < waves.shape[1]:
        size = sizes[k % len(sizes)]
        pieces.append(batch.push(waves[:, i : i + size]))
        i, k = i + size, k + 1
    pieces.append(batch.flush())
    assert all(not p.is_inference() and p.shape[:2] == (waves.shape[0], batch._levels) for p in pieces)
    return torch.cat(pieces, 2)


def test_stream_batch_codes_equal_each_utterances_offline_codes(tiny_gemma4_rvq, make_speech):
    from gemma_rvq.streaming import StreamBatch

    model = tiny_gemma4_rvq
    waves = np.stack([make_speech(2.3, SR, seed=40 + b) for b in range(3)])
    references = [model.encode(w, sampling_rate=SR).audio_codes[0] for w in waves]
    rng = np.random.default_rng(2)
    edge = [1] * 400 + [4000] * ((waves.shape[1] - 800) // 4000) + [(waves.shape[1] - 800) % 4000] + [1] * 400
    batch = StreamBatch(model, 3, sampling_rate=SR)
    for sizes in ([2560], rng.integers(1, 6000, size=40).tolist(), edge):
        codes = _push_batch(batch, waves, sizes)
        for b in range(3):
            assert torch.equal(codes[b], references[b]), (sizes[:3], b)
        batch.reset()
    assert batch.lookahead_ms == pytest.approx(40.0625)
    # one utterance in a batch of one: the single stream's codes
    single = StreamBatch(model, 1, sampling_rate=SR)
    assert torch.equal(_push_batch(single, waves[:1], [2560])[0], references[0])


def test_stream_batch_resamples_and_flushes_short_utterances(tiny_gemma4_rvq, make_speech):
    from gemma_rvq.streaming import StreamBatch

    model = tiny_gemma4_rvq
    waves = np.stack([make_speech(1.2, 22050, seed=50 + b) for b in range(2)])
    batch = StreamBatch(model, 2, sampling_rate=22050, num_quantizers=1)
    codes = _push_batch(batch, waves, [3528])
    for b in range(2):
        assert torch.equal(codes[b], model.encode(waves[b], sampling_rate=22050).audio_codes[0][:1])
    short = StreamBatch(model, 2, sampling_rate=SR)
    short.push(np.zeros((2, 100), dtype=np.float32))
    assert short.state_nbytes >= 2 * 100 * 4
    assert tuple(short.flush().shape) == (2, 2, 0)  # shorter than one frame: no frame (encode refuses it)


def test_stream_batch_refusals(tiny_gemma4_rvq, tiny_hubert_rvq):
    from gemma_rvq.streaming import StreamBatch

    with pytest.raises(ValueError, match="batch_size"):
        StreamBatch(tiny_gemma4_rvq, 0, sampling_rate=SR)
    with pytest.raises(ValueError, match="Gemma 4"):
        StreamBatch(tiny_hubert_rvq, 2, sampling_rate=SR)
    with pytest.raises(ValueError, match="num_quantizers"):
        StreamBatch(tiny_gemma4_rvq, 2, sampling_rate=SR, num_quantizers=5)
    batch = StreamBatch(tiny_gemma4_rvq, 2, sampling_rate=SR)
    with pytest.raises(ValueError, match=r"\[2, S\]"):
        batch.push(np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[2, S\]"):
        batch.push(np.zeros((3, 100), dtype=np.float32))
    with pytest.raises(ValueError, match=r"samples\[1\]"):
        batch.push(np.array([[0.0, 0.1], [np.nan, 0.0]], dtype=np.float32))
    batch.reset()
    batch.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        batch.push(np.zeros((2, 10), dtype=np.float32))


def test_bench_stream_measures_stream_batches(tiny_gemma4_rvq):
    """``bench_stream.py --batch``: the per-stream cost and agreement of a StreamBatch of each size."""
    from conftest import load_script

    bench = load_script("benchmarks/bench_stream.py")
    lines: list[str] = []
    rows = bench.batch_compare(tiny_gemma4_rvq, 1.0, [1, 2], 160.0, 1, lines.append)
    assert [row["streams"] for row in rows] == [1, 2] and len(lines) == 2
    assert all(row["agreement"] == 1.0 and row["cpu_ratio_per_stream"] > 0 for row in rows)


# ------------------------------------------------------------------------------ the per-push plan (issue 16)
def _gemma4_layer(model):
    return model._encoder_adapter().model.layers[0]


def test_log_mel_is_the_spectrogram_steps_bits(tiny_gemma4_rvq, make_speech):
    """``_log_mel`` redoes the feature extractor's spectrogram step without its padding helpers: the same bits
    for pieces shorter than a frame, of one frame and of many, and a stream switches to it after checking."""
    extractor = tiny_gemma4_rvq._encoder_adapter().feature_extractor
    wave = make_speech(1.0, SR, seed=60)
    for length in (100, 161, 320, 2560 + 480, 16000):
        piece = wave[:length]
        step, _ = extractor._extract_spectrogram(piece[None], np.ones(length, dtype=np.int32))
        mine = streaming_plan._log_mel(extractor, piece)
        assert mine.dtype == np.float32 and mine.shape == step.shape
        assert np.array_equal(mine, step.astype(np.float32)), length
    stream = tiny_gemma4_rvq.stream(SR)
    stream.push(wave[:4000])
    assert stream.encoder._mirror_mel is True


def test_rms_norm_and_products_resolved_per_stream_give_the_modules_bits(tiny_gemma4_rvq):
    """The plan's norms (``_norm_fast`` where it was found exact: on this CPU it is) and products (``torch.mm`` on the
    transposed weight, the stacked q/k/v product) give the bits of the modules' own forwards."""
    layer = _gemma4_layer(tiny_gemma4_rvq)
    adapter = tiny_gemma4_rvq._encoder_adapter()
    encoder = Gemma4StreamingEncoder(adapter.model, adapter.feature_extractor)
    g = torch.Generator().manual_seed(5)
    for rows in (1, 3, 4, 12):
        x = 3 * torch.randn(rows, 64, generator=g)
        for norm in (layer.norm_pre_attn, layer.lconv1d.conv_norm):
            assert torch.equal(streaming_plan._RMSNorm(norm)(x.clone(), fresh=True), norm(x))
            transposed = x.t().contiguous().t()  # the light convolution's output layout
            assert torch.equal(streaming_plan._RMSNorm(norm)(transposed), norm(transposed))
        attn = layer.self_attn
        products = [encoder._product_for(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        stacked = streaming_plan._Product.stack(products)
        assert stacked is not None
        parts = stacked(x).split(64, dim=1)
        for module, product, part in zip((attn.q_proj, attn.k_proj, attn.v_proj), products, parts):
            with torch.no_grad():
                reference = module(x[None])[0]
            assert torch.equal(product(x), reference) and torch.equal(part, reference)
    assert streaming_plan._fast_norm_exact(torch.device("cpu"))


def test_stream_window_state_across_blocks_and_push_sizes(tiny_gemma4_rvq, make_speech):
    """The attention window moves block by block and the convolution keeps a buffer per push size: pushes
    that end mid-block, span several blocks (2 s = 50 frames, 12 per block), bring one frame, or none, give
    the offline codes; the state stays bounded."""
    model = tiny_gemma4_rvq
    wave = make_speech(6.0, SR, seed=61)
    reference = model.encode(wave, sampling_rate=SR).audio_codes[0]
    rng = np.random.default_rng(7)
    for sizes in ([32000, 640, 1, 1, 2559, 12 * 640], [641] * 3 + [19200], rng.integers(1, 12000, size=25).tolist()):
        stream = model.stream(SR)
        pieces, i, k = [], 0, 0
        while i < len(wave):
            pieces.append(stream.push(wave[i : i + sizes[k % len(sizes)]]))
            i, k = i + sizes[k % len(sizes)], k + 1
        pieces.append(stream.flush())
        assert torch.equal(torch.cat(pieces, 1), reference), sizes[:4]
        assert stream.state_nbytes < 512 * 1024


def test_depthwise_convolution_general_route_gives_the_offline_codes(tiny_gemma4_rvq, make_speech, monkeypatch):
    """Where the taps do not apply (a biased convolution, or another device than the CPU) the light
    convolution keeps its input tail and runs the module's convolution: here forced with a zero bias."""
    import copy

    model = copy.deepcopy(tiny_gemma4_rvq)
    wave = make_speech(2.0, SR, seed=62)
    reference = model.encode(wave, sampling_rate=SR).audio_codes[0]
    original = Gemma4StreamingEncoder._make_plan

    def biased(self, like):
        plan = original(self, like)
        for layer in plan.layers:
            conv = copy.deepcopy(layer.conv)
            conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels))
            layer.conv = conv
        return plan

    monkeypatch.setattr(Gemma4StreamingEncoder, "_make_plan", biased)
    adapter = model._encoder_adapter()
    encoder = Gemma4StreamingEncoder(adapter.model, adapter.feature_extractor)
    emb = torch.cat([encoder.push(wave[i : i + 2560]) for i in range(0, len(wave), 2560)] + [encoder.flush()])
    assert all("conv_tail" in cache and "conv" not in cache for cache in encoder._caches)
    offline = model.embed(wave, sampling_rate=SR)[0][0]
    torch.testing.assert_close(emb, offline, rtol=1e-4, atol=1e-5)
    stream = model.stream(SR)
    codes = torch.cat([stream.push(wave[i : i + 2560]) for i in range(0, len(wave), 2560)] + [stream.flush()], 1)
    assert torch.equal(codes, reference)
