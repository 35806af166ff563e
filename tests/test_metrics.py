"""gemma_rvq.metrics: functional math, streaming accumulator, evaluate modules, plots.

Expected numbers are worked out by hand in the comments, not recomputed with the code under test.
"""

from __future__ import annotations

import math

import evaluate
import pytest
import torch
from PIL import Image

import gemma_rvq.metrics as grm
from gemma_rvq.metrics import functional as F
from gemma_rvq.metrics import plots

NAN = float("nan")


# ------------------------------------------------------------------------------------------ helpers


def _hand_frames():
    """Batch of one example, 3 frames (the last padded and full of NaN), D = 2.

    valid targets x: (1, 2), (3, 2); reconstructions x̂: (1, 2), (3, 4).
    """
    target = torch.tensor([[[1.0, 2.0], [3.0, 2.0], [NAN, NAN]]])
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [NAN, 7.0]]])
    mask = torch.tensor([[True, True, False]])
    return pred, target, mask


def _hand_codes():
    """codes [B=2, Q=2, T=3], K = 4; valid frames (b0,t0), (b0,t1), (b1,t0); padding holds -1."""
    codes = torch.tensor(
        [
            [[0, 0, -1], [2, 3, -1]],
            [[1, -1, -1], [3, -1, -1]],
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    return codes, mask


# level 0 counts (2, 1, 0, 0), level 1 counts (0, 0, 1, 2):
# utilization 2/4 per level; p = (2/3, 1/3) per level -> exp(H) = exp(ln 3 - (2/3) ln 2) = 3 / 2^(2/3)
HAND_PPL = 3 / 2 ** (2 / 3)
# pooled counts (2, 1, 1, 2) / 6 -> H = (2/3) ln 3 + (1/3) ln 6 -> exp(H) = (9 * 6)^(1/3)
HAND_POOLED = 54 ** (1 / 3)


# ------------------------------------------------------------------------------------------ functional


def test_reconstruction_metrics_hand_case_ignores_padding():
    pred, target, mask = _hand_frames()
    # squared error: 0 + (4-2)^2 = 4 over N*D = 4 elements; target energy 1+4+9+4 = 18;
    # target mean (2, 2) -> spread (1 + 0) + (1 + 0) = 2
    assert F.mse(pred, target, mask) == pytest.approx(1.0)
    assert F.nmse(pred, target, mask) == pytest.approx(4 / 18)
    assert F.fvu(pred, target, mask) == pytest.approx(2.0)
    # cos((1,2),(1,2)) = 1; cos((3,4),(3,2)) = (9+8) / (5 * sqrt(13))
    cos = (1 + 17 / (5 * math.sqrt(13))) / 2
    assert F.cosine_similarity(pred, target, mask) == pytest.approx(cos)
    # centred by (2,2): x - mu = (-1,0), (1,0); x̂ - mu = (-1,0), (1,2) -> cosines 1 and 1/sqrt(5)
    centred = (1 + 1 / math.sqrt(5)) / 2
    assert F.centred_cosine(pred, target, mask) == pytest.approx(centred)

    flat_pred, flat_target = pred[0, :2], target[0, :2]  # the same frames as [N, D]
    assert F.fvu(flat_pred, flat_target) == pytest.approx(2.0)
    assert F.mse(flat_pred, flat_target, torch.tensor([True, True])) == pytest.approx(1.0)
    every = F.reconstruction_metrics(pred, target, mask)
    assert every == pytest.approx(
        {"num_frames": 2, "mse": 1.0, "nmse": 4 / 18, "fvu": 2.0, "cosine_similarity": cos,
         "centred_cosine_similarity": centred}
    )  # fmt: skip


def test_mean_prediction_has_fvu_one_while_raw_cosine_is_inflated():
    # targets (10, 1), (10, -1): mean (10, 0); predicting the mean everywhere
    target = torch.tensor([[10.0, 1.0], [10.0, -1.0]])
    pred = torch.tensor([[10.0, 0.0], [10.0, 0.0]])
    assert F.fvu(pred, target) == pytest.approx(1.0)  # error 1 + 1 over spread 1 + 1
    assert F.cosine_similarity(pred, target) == pytest.approx(10 / math.sqrt(101))  # 0.995: looks great
    assert F.centred_cosine(pred, target) == pytest.approx(0.0)  # explains nothing
    # an explicit centring vector (0, 0) gives back the raw cosine
    assert F.centred_cosine(pred, target, mean=torch.zeros(2)) == pytest.approx(10 / math.sqrt(101))


def test_code_counts_utilization_perplexity_hand_case():
    codes, mask = _hand_codes()
    counts = F.code_counts(codes, mask, codebook_size=4)
    assert counts.tolist() == [[2, 1, 0, 0], [0, 0, 1, 2]]
    assert F.codebook_utilization(codes, mask, codebook_size=4) == pytest.approx(0.5)
    assert F.codebook_utilization(codes, mask, codebook_size=4, per_level=True) == pytest.approx([0.5, 0.5])
    assert F.codebook_perplexity(codes, mask, codebook_size=4) == pytest.approx(HAND_PPL)
    assert F.perplexity_from_counts(torch.tensor([[2, 1, 1, 0]])) == pytest.approx(2**1.5)  # H = 1.5 ln 2
    assert F.pooled_perplexity(counts) == pytest.approx(HAND_POOLED)
    # the quantizer's flat [N, Q] layout, passed as codes.T[None]
    flat = torch.tensor([[0, 2], [0, 3], [1, 3]])
    assert F.code_counts(flat.T[None], codebook_size=4).tolist() == counts.tolist()


def test_perplexity_never_exceeds_used_codes():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        counts = (torch.rand(3, 64, generator=gen) ** 4 * 50).floor()
        counts[:, 0] += 1
        used = (counts > 0).sum(-1).tolist()
        for ppl, n_used in zip(F.perplexity_from_counts(counts, per_level=True), used):
            assert 1.0 <= ppl <= n_used + 1e-9
    # hence the seed card's pair cannot be per-codebook figures of one histogram
    assert 1756 > 0.70 * 2048


def test_bad_inputs_raise_clear_value_errors():
    pred, target, mask = _hand_frames()
    codes, cmask = _hand_codes()
    with pytest.raises(ValueError, match="out of range"):
        F.code_counts(codes, cmask, codebook_size=3)  # code 3 on a valid frame
    with pytest.raises(ValueError, match="out of range"):
        F.code_counts(codes, codebook_size=4)  # without the mask the -1 padding counts
    with pytest.raises(ValueError, match=r"\[B, Q, T\]"):
        F.code_counts(codes[0], codebook_size=4)
    with pytest.raises(ValueError, match="integers"):
        F.code_counts(codes.float(), codebook_size=4)
    with pytest.raises(ValueError, match="codebook_size"):
        F.code_counts(codes, cmask, codebook_size=0)
    with pytest.raises(ValueError, match="shape"):
        F.mse(pred, target, mask[:, :2])
    with pytest.raises(ValueError, match="same shape"):
        F.mse(pred[:, :2], target, mask)
    with pytest.raises(ValueError, match="NaN"):
        F.mse(pred, target)  # the padded NaN frame counts without its mask
    with pytest.raises(ValueError, match="no valid frames"):
        F.mse(pred, target, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        F.mse(pred, target, mask.float())
    with pytest.raises(ValueError, match="mean"):
        F.fvu(pred, target, mask, mean=torch.zeros(3))
    with pytest.raises(ValueError, match="no counted frames"):
        F.perplexity_from_counts(torch.zeros(2, 4))


def test_accumulator_streaming_equals_full_set():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(6, 9, 5, generator=gen) * 0.5 + 3.0
    pred = target + 0.4 * torch.randn(6, 9, 5, generator=gen)
    codes = torch.randint(0, 8, (6, 3, 9), generator=gen)
    lengths = torch.tensor([9, 4, 7, 1, 9, 5])
    mask = torch.arange(9)[None] < lengths[:, None]
    mu = target[mask].double().mean(0)

    full = F.RVQStatsAccumulator(codebook_size=8, mean=mu)
    full.update(prediction=pred, target=target, mask=mask, codes=codes)
    # three uneven batches, split over two "processes", then merged
    a, b = F.RVQStatsAccumulator(codebook_size=8, mean=mu), F.RVQStatsAccumulator(codebook_size=8, mean=mu)
    a.update(prediction=pred[:1], target=target[:1], mask=mask[:1], codes=codes[:1])
    a.update(prediction=pred[1:4], target=target[1:4], mask=mask[1:4], codes=codes[1:4])
    b.update(prediction=pred[4:], target=target[4:], mask=mask[4:], codes=codes[4:])
    streamed = a.merge(b).compute()

    assert streamed["num_frames"] == int(lengths.sum()) == full.compute()["num_frames"]
    whole = full.compute()
    for key, value in whole.items():
        assert streamed[key] == pytest.approx(value, rel=1e-9), key
    assert streamed["mse"] == pytest.approx(F.mse(pred, target, mask), rel=1e-9)
    assert streamed["nmse"] == pytest.approx(F.nmse(pred, target, mask), rel=1e-9)
    assert streamed["fvu"] == pytest.approx(F.fvu(pred, target, mask), rel=1e-9)
    assert streamed["cosine_similarity"] == pytest.approx(F.cosine_similarity(pred, target, mask), rel=1e-9)
    assert streamed["centred_cosine_similarity"] == pytest.approx(
        F.centred_cosine(pred, target, mask), rel=1e-6
    )
    assert torch.equal(a.counts, F.code_counts(codes, mask, codebook_size=8))
    assert streamed["codebook_perplexity"] == pytest.approx(
        F.codebook_perplexity(codes, mask, codebook_size=8)
    )
    # without a centring vector that key is absent rather than approximate
    assert "centred_cosine_similarity" not in F.RVQStatsAccumulator().merge(a).compute()


def test_accumulator_pools_counts_instead_of_averaging_batches():
    # Q = 1, K = 4; batches use {0,0}, {1,1}, {2,3}
    batches = [torch.tensor([[[0, 0]]]), torch.tensor([[[1, 1]]]), torch.tensor([[[2, 3]]])]
    acc = F.RVQStatsAccumulator(codebook_size=4)
    for codes in batches:
        acc.update(codes=codes)
    out = acc.compute()
    # all 4 codes used; counts (2, 2, 1, 1) / 6 -> H = (2/3) ln 3 + (1/3) ln 6 -> 54^(1/3)
    assert out["codebook_utilization"] == pytest.approx(1.0)
    assert out["codebook_perplexity"] == pytest.approx(54 ** (1 / 3))
    # per-batch averages would be (1/4 + 1/4 + 2/4) / 3 = 1/3 and (1 + 1 + 2) / 3 = 4/3
    assert out["codebook_utilization"] != pytest.approx(1 / 3)
    assert out["codebook_perplexity"] != pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="levels"):
        acc.update(codes=torch.zeros(1, 2, 3, dtype=torch.long))


def test_batch_utilization_and_expected_batch_utilization_hand_cases():
    # Q = 1, K = 4, frames 0 1 0 1 | 2 3 2 3 | 0 (remainder dropped)
    codes = torch.tensor([[[0, 1, 0, 1, 2, 3, 2, 3, 0]]])
    assert F.codebook_utilization(codes, codebook_size=4) == pytest.approx(1.0)
    assert F.batch_utilization(codes, codebook_size=4, batch_frames=4) == pytest.approx(0.5)
    assert F.batch_utilization(codes, codebook_size=4, batch_frames=100) == pytest.approx(1.0)  # one batch
    # K = 2 uniform, batches of 2 frames: each code seen with probability 1 - (1/2)^2 = 3/4
    assert F.expected_batch_utilization(torch.tensor([[5, 5]]), 2) == pytest.approx(0.75)
    # a code that is always used is always seen; an unused one never
    assert F.expected_batch_utilization(torch.tensor([[7, 0]]), 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="batch_frames"):
        F.batch_utilization(codes, codebook_size=4, batch_frames=0)


def test_seed_card_reading_reproduces_70_percent_and_1756():
    # a codebook used uniformly over 1756 of its 2048 entries: perplexity 1756 and full-set utilization
    # 1756/2048 = 85.7 %; a batch of n frames sees each used code with probability 1 - (1 - 1/1756)^n,
    # so n = 2976 frames (about 2 minutes at 25 fps) shows 1756/2048 * (1 - e^(-2976/1756)) = 70.0 %.
    counts = torch.zeros(1, 2048)
    counts[0, :1756] = 1
    assert F.perplexity_from_counts(counts) == pytest.approx(1756)
    assert F.utilization_from_counts(counts) == pytest.approx(1756 / 2048)
    assert F.expected_batch_utilization(counts, 2976) == pytest.approx(0.700, abs=5e-4)
    # and on sampled codes: per-batch utilization about 70 %, full-set perplexity about 1756
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1756, (1, 1, 2976 * 12), generator=gen)
    assert F.batch_utilization(codes, codebook_size=2048, batch_frames=2976) == pytest.approx(0.70, abs=0.01)
    # a finite sample's entropy is biased low by about (K - 1) / (2 N) nats: 1756 * e^-0.0246 = 1713
    assert F.codebook_perplexity(codes, codebook_size=2048) == pytest.approx(1713, rel=0.005)
    assert F.codebook_utilization(codes, codebook_size=2048) == pytest.approx(1756 / 2048, abs=1e-3)


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_modules_hand_cases():
    out = grm.load("reconstruction_mse", keep_in_memory=True).compute(
        predictions=[[[1.0, 2.0], [3.0, 4.0]]], references=[[[1.0, 2.0], [3.0, 2.0]]]
    )
    assert out == pytest.approx({"mse": 1.0, "nmse": 4 / 18, "fvu": 2.0, "num_frames": 2})

    out = grm.load("cosine_similarity", keep_in_memory=True).compute(
        predictions=[[[1.0, 0.0], [0.0, 1.0]]], references=[[[1.0, 0.0], [1.0, 1.0]]]
    )
    # cosines 1 and 1/sqrt(2); centred by (1, 0.5): 1 and 0.25 / (sqrt(1.25) * 0.5) = 1/sqrt(5)
    assert out == pytest.approx(
        {
            "cosine_similarity": (1 + 2**-0.5) / 2,
            "centred_cosine_similarity": (1 + 5**-0.5) / 2,
            "num_frames": 2,
        }
    )

    out = grm.load("codebook_utilization", codebook_size=4, keep_in_memory=True).compute(
        predictions=[[[0, 1, 1], [2, 2, 2]]]
    )
    assert out == {
        "codebook_utilization": 0.375,
        "codebook_utilization_per_level": [0.5, 0.25],
        "num_frames": 3,
    }

    out = grm.load("codebook_perplexity", codebook_size=4, keep_in_memory=True).compute(
        predictions=[[[0, 1, 2, 3], [0, 0, 0, 0]]]
    )
    # level 0 uniform over 4 -> 4, level 1 one code -> 1; pooled (5,1,1,1)/8
    pooled = math.exp(-(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(1 / 8)))
    assert out["codebook_perplexity_per_level"] == pytest.approx([4.0, 1.0])
    assert out["codebook_perplexity"] == pytest.approx(2.5)
    assert out["pooled_perplexity"] == pytest.approx(pooled)
    assert out["num_frames"] == 4

    # two examples of different lengths; rows (1,0),(0,1) | (2,2) vs (1,0),(0,2) | (2,1), codes [[0,1]] | [[1]]
    out = grm.load("rvq_quality", codebook_size=2, keep_in_memory=True).compute(
        predictions=[[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0]]],
        references=[[[1.0, 0.0], [0.0, 2.0]], [[2.0, 1.0]]],
        codes=[[[0, 1]], [[1]]],
        batch_frames=2,
    )
    # error 0 + 1 + 1 = 2 over 6 elements; energy 1 + 4 + 5 = 10; mean (1, 1) -> spread 1 + 2 + 1 = 4
    assert out["mse"] == pytest.approx(2 / 6)
    assert out["nmse"] == pytest.approx(2 / 10)
    assert out["fvu"] == pytest.approx(2 / 4)
    assert out["num_frames"] == out["num_code_frames"] == 3
    # counts (1, 2): utilization 1; perplexity exp(-(1/3 ln 1/3 + 2/3 ln 2/3)) = 3 / 2^(2/3)
    assert out["codebook_utilization"] == 1.0
    assert out["codebook_perplexity"] == pytest.approx(3 / 2 ** (2 / 3))
    assert out["batch_utilization"] == 1.0  # first batch of 2 frames uses codes 0 and 1; remainder dropped


def test_evaluate_options_at_load_or_compute(tmp_path):
    metric = evaluate.load(grm.module_path("codebook_perplexity"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="codebook_size"):
        metric.compute(predictions=[[[0, 1]]])
    assert metric.compute(predictions=[[[0, 1]]], codebook_size=2)["codebook_perplexity"] == pytest.approx(
        2.0
    )
    loaded = grm.load("codebook_utilization", codebook_size=2, keep_in_memory=True)
    with pytest.raises(ValueError, match="out of range"):
        loaded.compute(predictions=[[[0, 3]]])
    assert loaded.compute(predictions=[[[0, 3]]], codebook_size=4)["codebook_utilization"] == 0.5  # override
    with pytest.raises(ValueError, match="codebok_size"):
        grm.load("codebook_perplexity", codebok_size=2048)  # typo is refused, not ignored
    with pytest.raises(ValueError, match="unknown metric"):
        grm.module_path("bleu")


# Every documented option of every evaluate module, through evaluate.load, at load and at compute (compute
# overrides load). Frames: predictions (1, 0), (0, 1); references (1, 0), (1, 1).
_P, _R = [[[1.0, 0.0], [0.0, 1.0]]], [[[1.0, 0.0], [1.0, 1.0]]]
_RAW = (1 + 2**-0.5) / 2  # cosines 1 and 1/sqrt(2)
_CENTRED = (1 + 5**-0.5) / 2  # centred by the reference mean (1, 0.5): cosines 1 and 1/sqrt(5)
_CENTRED_55 = (1 + 36 / math.sqrt(41 * 32)) / 2  # centred by (5, 5): (-4,-5).(-4,-5) -> 1; (-5,-4).(-4,-4) = 36
# eps = 10 clamps each norm to 10 (torch's cosine_similarity): raw dots 1 and 1 -> 1/100 each; centred dots
# 0.25 and 0.25 -> 0.0025 each
_RAW_EPS10, _CENTRED_EPS10 = 0.01, 0.0025
_CODES = [[[0, 1, 1, 2]]]  # Q = 1, counts (1, 2, 1, 0): utilization 3/4; perplexity exp(1.5 ln 2) = 2^1.5
# batch_frames = 2: batches (0, 1) and (1, 2) use 2 of 4 codes each -> 0.5


def _load(name, **options):
    return evaluate.load(grm.module_path(name), keep_in_memory=True, **options)


def test_reconstruction_mse_takes_no_option_and_says_so():
    out = _load("reconstruction_mse").compute(predictions=_P, references=_R)
    assert out == pytest.approx({"mse": 0.25, "nmse": 1 / 3, "fvu": 2.0, "num_frames": 2})
    with pytest.raises(ValueError, match="no options"):
        _load("reconstruction_mse", mean=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"unknown option.*'mean'.*none"):
        _load("reconstruction_mse").compute(predictions=_P, references=_R, mean=[0.0, 0.0])


@pytest.mark.parametrize("where", ["load", "compute"])
def test_cosine_similarity_mean_and_eps_options(where):
    def run(**options):
        if where == "load":
            return _load("cosine_similarity", **options).compute(predictions=_P, references=_R)
        return _load("cosine_similarity").compute(predictions=_P, references=_R, **options)

    assert run() == pytest.approx({"cosine_similarity": _RAW, "centred_cosine_similarity": _CENTRED, "num_frames": 2})
    assert run(mean=[5.0, 5.0])["centred_cosine_similarity"] == pytest.approx(_CENTRED_55)
    assert run(mean=[0.0, 0.0])["centred_cosine_similarity"] == pytest.approx(_RAW)  # no centring
    out = run(eps=10.0)
    assert out["cosine_similarity"] == pytest.approx(_RAW_EPS10)
    assert out["centred_cosine_similarity"] == pytest.approx(_CENTRED_EPS10)
    with pytest.raises(ValueError, match="mean must have 2 elements"):
        run(mean=[5.0])


def test_cosine_similarity_compute_option_overrides_the_loaded_one():
    metric = _load("cosine_similarity", mean=[0.0, 0.0], eps=10.0)
    metric.add_batch(predictions=_P, references=_R)
    out = metric.compute(mean=[5.0, 5.0], eps=1e-8)
    assert out["centred_cosine_similarity"] == pytest.approx(_CENTRED_55)
    assert out["cosine_similarity"] == pytest.approx(_RAW)
    with pytest.raises(ValueError, match=r"unknown option.*'means'"):
        _load("cosine_similarity").compute(predictions=_P, references=_R, means=[5.0, 5.0])


@pytest.mark.parametrize("where", ["load", "compute"])
def test_codebook_utilization_options(where):
    def run(**options):
        if where == "load":
            return _load("codebook_utilization", **options).compute(codes=_CODES)
        return _load("codebook_utilization").compute(codes=_CODES, **options)

    assert run(codebook_size=4) == {"codebook_utilization": 0.75, "codebook_utilization_per_level": [0.75],
                                    "num_frames": 4}
    assert run(codebook_size=8)["codebook_utilization"] == 3 / 8
    assert run(codebook_size=4, batch_frames=2)["batch_utilization"] == 0.5
    assert run(codebook_size=4, batch_frames=4)["batch_utilization"] == 0.75
    with pytest.raises(ValueError, match="codebook_size"):
        run()
    with pytest.raises(ValueError, match="out of range"):
        run(codebook_size=2)
    with pytest.raises(ValueError, match="batch_frames"):
        run(codebook_size=4, batch_frames=0)


@pytest.mark.parametrize("where", ["load", "compute"])
def test_codebook_perplexity_options(where):
    def run(**options):
        if where == "load":
            return _load("codebook_perplexity", **options).compute(codes=_CODES)
        return _load("codebook_perplexity").compute(codes=_CODES, **options)

    out = run(codebook_size=4)
    assert out["codebook_perplexity"] == pytest.approx(2**1.5)
    assert out["codebook_perplexity_per_level"] == pytest.approx([2**1.5])
    assert out["pooled_perplexity"] == pytest.approx(2**1.5) and out["num_frames"] == 4
    assert run(codebook_size=3)["codebook_perplexity"] == pytest.approx(2**1.5)  # K only bounds the codes
    with pytest.raises(ValueError, match="codebook_size"):
        run()
    with pytest.raises(ValueError, match="out of range"):
        run(codebook_size=2)


@pytest.mark.parametrize("where", ["load", "compute"])
def test_rvq_quality_options(where):
    codes = [[[0, 1]]]

    def run(**options):
        if where == "load":
            return _load("rvq_quality", **options).compute(predictions=_P, references=_R, codes=codes)
        return _load("rvq_quality").compute(predictions=_P, references=_R, codes=codes, **options)

    out = run(codebook_size=2)
    assert out["mse"] == pytest.approx(0.25) and out["fvu"] == pytest.approx(2.0)
    assert out["cosine_similarity"] == pytest.approx(_RAW)
    assert out["centred_cosine_similarity"] == pytest.approx(_CENTRED)
    assert out["codebook_utilization"] == 1.0 and out["codebook_perplexity"] == pytest.approx(2.0)
    assert "batch_utilization" not in out
    assert run(codebook_size=4)["codebook_utilization"] == 0.5
    assert run(codebook_size=2, batch_frames=1)["batch_utilization"] == 0.5  # one code of 2 per batch
    assert run(codebook_size=2, mean=[5.0, 5.0])["centred_cosine_similarity"] == pytest.approx(_CENTRED_55)
    out = run(codebook_size=2, eps=10.0)
    assert out["cosine_similarity"] == pytest.approx(_RAW_EPS10)
    assert out["centred_cosine_similarity"] == pytest.approx(_CENTRED_EPS10)
    with pytest.raises(ValueError, match="codebook_size"):
        run()


def test_unknown_options_are_refused_at_load_and_at_compute():
    for name in grm.METRICS:
        with pytest.raises(ValueError, match="batch_frame"):
            _load(name, batch_frame=2)
    with pytest.raises(ValueError, match=r"unknown option.*'codebook_sise'"):
        _load("codebook_utilization").compute(codes=_CODES, codebook_sise=4)
    with pytest.raises(ValueError, match=r"unknown option.*'batch_frame'"):
        _load("rvq_quality", codebook_size=2).compute(predictions=_P, references=_R, codes=[[[0, 1]]],
                                                      batch_frame=1)


@pytest.mark.parametrize("name", ["codebook_utilization", "codebook_perplexity"])
def test_codebook_modules_take_codes_under_one_name(name):
    expected = _load(name, codebook_size=4).compute(predictions=_CODES)  # evaluate's name keeps working
    assert _load(name, codebook_size=4).compute(codes=_CODES) == expected
    metric = _load(name, codebook_size=4)
    metric.add_batch(codes=_CODES)
    assert metric.compute() == expected
    metric = _load(name, codebook_size=4)
    metric.add(codes=_CODES[0])
    assert metric.compute() == expected
    with pytest.raises(ValueError, match="once"):
        _load(name, codebook_size=4).compute(codes=_CODES, predictions=_CODES)
    with pytest.raises(ValueError, match="without references"):
        _load(name, codebook_size=4).compute(codes=_CODES, references=_CODES)


def test_evaluate_add_batch_pools_counts_over_the_whole_set(tmp_path):
    batches = [[[[0, 0]]], [[[1, 1]]], [[[2, 3]]]]  # one example per batch, Q = 1, K = 4
    util = grm.load("codebook_utilization", codebook_size=4, cache_dir=str(tmp_path), experiment_id="u")
    ppl = grm.load("codebook_perplexity", codebook_size=4, cache_dir=str(tmp_path), experiment_id="p")
    for batch in batches:
        util.add_batch(predictions=batch)
        ppl.add_batch(predictions=batch)
    u, p = util.compute(), ppl.compute()
    once_u = grm.load("codebook_utilization", codebook_size=4, keep_in_memory=True).compute(
        predictions=[b[0] for b in batches]
    )
    assert u == once_u
    assert u["codebook_utilization"] == 1.0 != pytest.approx(1 / 3)  # per-batch mean would be 1/3
    assert p["codebook_perplexity"] == pytest.approx(54 ** (1 / 3))  # counts (2,2,1,1)/6, not 4/3
    assert p["num_frames"] == 6


def test_rvq_quality_on_padded_batches_matches_functional():
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(4, 7, 6, generator=gen) + 2.0
    rec = emb + 0.3 * torch.randn(4, 7, 6, generator=gen)
    codes = torch.randint(0, 5, (4, 3, 7), generator=gen)
    mask = torch.arange(7)[None] < torch.tensor([7, 0, 5, 1])[:, None]  # one example has no frame
    rec[~mask] = NAN  # padding must never be read
    codes[:, :, :][~mask[:, None, :].expand_as(codes)] = -1

    metric = grm.load("rvq_quality", codebook_size=5, keep_in_memory=True)
    for sl in (slice(0, 1), slice(1, 4)):
        metric.add_batch(
            predictions=grm.unpad_frames(rec[sl], mask[sl]),
            references=grm.unpad_frames(emb[sl], mask[sl]),
            codes=grm.unpad_codes(codes[sl], mask[sl]),
        )
    out = metric.compute()
    assert out["num_frames"] == 13
    assert out["mse"] == pytest.approx(F.mse(rec, emb, mask), rel=1e-6)
    assert out["fvu"] == pytest.approx(F.fvu(rec, emb, mask), rel=1e-6)
    assert out["centred_cosine_similarity"] == pytest.approx(F.centred_cosine(rec, emb, mask), rel=1e-6)
    assert out["codebook_utilization_per_level"] == pytest.approx(
        F.codebook_utilization(codes, mask, codebook_size=5, per_level=True)
    )
    assert out["codebook_perplexity"] == pytest.approx(F.codebook_perplexity(codes, mask, codebook_size=5))


def test_evaluate_rows_must_match():
    metric = grm.load("rvq_quality", codebook_size=4, keep_in_memory=True)
    with pytest.raises(ValueError, match="row 1"):
        metric.compute(
            predictions=[[[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]]],
            references=[[[1.0, 2.0]], [[1.0, 2.0]]],
            codes=[[[0]], [[1]]],
        )
    with pytest.raises(ValueError, match="row 0"):
        metric.compute(predictions=[[[1.0, 2.0]]], references=[[[1.0, 2.0]]], codes=[[[0, 1]]])


def test_unpad_helpers():
    emb = torch.arange(12.0).view(2, 3, 2)
    codes = torch.arange(12).view(2, 2, 3)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    frames = grm.unpad_frames(emb, mask)
    assert [f.tolist() for f in frames] == [[[0.0, 1.0], [4.0, 5.0]], []]
    assert frames[1].shape == (0, 2)
    assert [c.tolist() for c in grm.unpad_codes(codes, mask)] == [[[0, 2], [3, 5]], [[], []]]
    with pytest.raises(ValueError, match="mask"):
        grm.unpad_codes(codes, mask[:, :2])


# ------------------------------------------------------------------------------------------ plots


def _check_png(path, min_bytes=5_000):
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 300 and img.size[1] > 150
    import os

    assert os.path.getsize(path) > min_bytes


def test_plot_code_usage_writes_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    counts = F.code_counts(torch.randint(0, 64, (3, 5, 40), generator=gen), codebook_size=64)
    path = plots.plot_code_usage(counts, tmp_path / "sub" / "usage.png")
    assert path == str(tmp_path / "sub" / "usage.png")
    _check_png(path)
    with pytest.raises(ValueError, match="png"):
        plots.plot_code_usage(counts, tmp_path / "usage.jpg")
    with pytest.raises(ValueError, match=r"\[Q, K\]"):
        plots.plot_code_usage(torch.zeros(2, 2, 2), tmp_path / "bad.png")


def test_plot_level_errors_writes_png(tmp_path):
    _check_png(plots.plot_level_errors([0.9, 0.5, 0.3, 0.2], tmp_path / "one.png", ylabel="fvu"))
    curves = {"num_quantizers": [1, 2, 3], "mse": [0.5, 0.3, 0.2], "fvu": [0.9, 0.6, 0.4]}
    _check_png(plots.plot_level_errors(curves, tmp_path / "many.png"))
    with pytest.raises(ValueError, match="finite"):
        plots.plot_level_errors([0.5, NAN], tmp_path / "nan.png")


# ------------------------------------------------------------------------------------------ per level


def test_per_level_errors_hand_case_with_residual_quantizer():
    from gemma_rvq.quantization import ResidualQuantizer

    quantizer = ResidualQuantizer(1, 2, 2)
    # level 0 codes {0, 10}, level 1 codes {-1, 1}: x = 9 -> 10 then -1; x = 1 -> 0 then +1: exact at k = 2
    quantizer.codebooks.copy_(torch.tensor([[[0.0], [10.0]], [[-1.0], [1.0]]]))
    x = torch.tensor([[[9.0], [1.0], [NAN]]])
    out = F.per_level_errors(quantizer, x, torch.tensor([[True, True, False]]))
    assert out["num_quantizers"] == [1, 2]
    # after level 0 the errors are -1 and +1: mse 1; target mean 5 -> spread 16 + 16 -> fvu 2/32
    assert out["mse"] == pytest.approx([1.0, 0.0])
    assert out["fvu"] == pytest.approx([2 / 32, 0.0])
    assert out["nmse"] == pytest.approx([2 / 82, 0.0])
    assert F.per_level_errors(quantizer, x[0, :2], num_quantizers=1)["mse"] == pytest.approx([1.0])
    with pytest.raises(ValueError, match="num_quantizers"):
        F.per_level_errors(quantizer, x[0, :2], num_quantizers=3)


def test_per_level_errors_with_gemma_rvq_model():
    from gemma_rvq import GemmaRVQConfig, GemmaRVQModel

    torch.manual_seed(0)
    model = GemmaRVQModel(GemmaRVQConfig(dim=8, num_quantizers=3, codebook_size=4))
    model.train()
    emb = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    emb[~mask] = NAN
    out = F.per_level_errors(model, emb, mask)
    assert model.training  # mode restored
    assert out["num_quantizers"] == [1, 2, 3] and len(out["fvu"]) == 3
    # k = Q equals the full reconstruction that quantize() returns
    full = model.eval().quantize(emb, mask).quantized
    assert out["mse"][-1] == pytest.approx(F.mse(full, emb, mask), rel=1e-6)
    assert out["centred_cosine_similarity"][-1] == pytest.approx(F.centred_cosine(full, emb, mask), rel=1e-6)
