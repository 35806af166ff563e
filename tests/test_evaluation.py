"""gemma_rvq.evaluation: the one scoring path, checked against a computation that shares no code with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_rvq import GemmaRVQConfig, GemmaRVQModel
from gemma_rvq.evaluation import GemmaRVQFrameCodec, evaluate_frames

Q, K, D, DC, N = 3, 8, 12, 6, 300


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def _numpy_reference(weights: dict[str, np.ndarray], eps: float, x: np.ndarray) -> dict:
    """Every number evaluate_frames reports, from the raw weights, in float64 numpy."""
    z = _layer_norm(x, weights["in_norm.weight"], weights["in_norm.bias"], eps) @ weights["in_proj.weight"].T
    z = z + weights["in_proj.bias"]
    books = weights["quantizer.codebooks"]  # [Q, K, Dc]
    residual, codes = z.copy(), []
    for level in range(Q):
        dist = ((residual[:, None, :] - books[level][None]) ** 2).sum(-1)  # [N, K]
        codes.append(dist.argmin(1))
        residual = residual - books[level][codes[-1]]
    codes = np.stack(codes, 1)  # [N, Q]
    mu = x.mean(0)

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    levels = []
    for k in range(1, Q + 1):
        zq = sum(books[q][codes[:, q]] for q in range(k))
        recon = _layer_norm(zq, weights["out_norm.weight"], weights["out_norm.bias"], eps)
        recon = recon @ weights["out_proj.weight"].T + weights["out_proj.bias"]
        err = ((x - recon) ** 2).sum()
        levels.append({"mse": err / x.size, "nmse": err / (x**2).sum(), "fvu": err / ((x - mu) ** 2).sum(),
                       "cosine_similarity": cos(recon, x), "centred_cosine_similarity": cos(recon - mu, x - mu)})
    counts = np.stack([np.bincount(codes[:, q], minlength=K) for q in range(Q)])  # [Q, K]
    p = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    pooled = counts.sum(0) / counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled_entropy = -np.where(pooled > 0, pooled * np.log(pooled), 0.0).sum()
    return {"codes": codes, "counts": counts, "levels": levels,
            "utilization": (counts > 0).mean(1), "perplexity": np.exp(entropy),
            "pooled_perplexity": float(np.exp(pooled_entropy))}


@pytest.fixture(scope="module")
def scored():
    """A GemmaRVQModel with non-trivial weights (random LayerNorm affine, codebooks drawn from the data's
    residuals level by level), frames, and the numpy reference."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(N, D)) * rng.uniform(0.5, 3.0, size=D) + rng.normal(size=D) * 2).astype(np.float32)
    torch.manual_seed(0)
    model = GemmaRVQModel(GemmaRVQConfig(dim=D, codebook_dim=DC, num_quantizers=Q, codebook_size=K)).eval()
    weights = {k: v.double().numpy() for k, v in model.state_dict().items()}
    for name in ("in_norm", "out_norm"):
        size = weights[f"{name}.weight"].shape[0]
        weights[f"{name}.weight"] = rng.uniform(0.5, 1.5, size)
        weights[f"{name}.bias"] = rng.normal(size=size) * 0.1
    weights["in_proj.weight"] = rng.normal(size=(DC, D)) / np.sqrt(D)
    weights["in_proj.bias"] = rng.normal(size=DC) * 0.1
    eps = model.config.layer_norm_eps
    # codebooks: level q's codes are K residual rows of distinct frames, so every level matters
    z = _layer_norm(x.astype(np.float64), weights["in_norm.weight"], weights["in_norm.bias"], eps)
    residual = z @ weights["in_proj.weight"].T + weights["in_proj.bias"]
    books = np.zeros((Q, K, DC))
    for q in range(Q):
        books[q] = residual[rng.choice(N, K, replace=False)]
        nearest = ((residual[:, None, :] - books[q][None]) ** 2).sum(-1).argmin(1)
        residual = residual - books[q][nearest]
    weights["quantizer.codebooks"] = books
    # out-projection: least squares from the normalised full reconstruction back to the frames
    h = _layer_norm(z @ weights["in_proj.weight"].T + weights["in_proj.bias"] - residual,
                    weights["out_norm.weight"], weights["out_norm.bias"], eps)
    sol = np.linalg.lstsq(np.c_[h, np.ones(N)], x.astype(np.float64), rcond=None)[0]  # [Dc + 1, D]
    weights["out_proj.weight"], weights["out_proj.bias"] = sol[:-1].T, sol[-1]
    # float32 round trip first, so both sides use exactly the same weights
    state = {k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()}
    model.load_state_dict(state, strict=False)
    weights = {k: v.double().numpy() for k, v in state.items()}
    ref = _numpy_reference(weights, model.config.layer_norm_eps, x.astype(np.float64))
    return model, torch.from_numpy(x), ref


def _assert_matches(out: dict, ref: dict) -> None:
    for i, level in enumerate(ref["levels"]):
        for key, value in level.items():
            assert out["level_errors"][key][i] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, i + 1)
    full = ref["levels"][-1]
    for key, value in full.items():
        assert out[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert out["num_frames"] == N and out["level_errors"]["num_quantizers"] == [1, 2, 3]
    assert np.array_equal(out["code_counts"].numpy(), ref["counts"])
    assert out["codebook_utilization_per_level"] == pytest.approx(ref["utilization"].tolist())
    assert out["codebook_utilization"] == pytest.approx(float(ref["utilization"].mean()))
    assert out["codebook_perplexity_per_level"] == pytest.approx(ref["perplexity"].tolist(), rel=1e-6)
    assert out["codebook_perplexity"] == pytest.approx(float(ref["perplexity"].mean()), rel=1e-6)
    assert out["pooled_perplexity"] == pytest.approx(ref["pooled_perplexity"], rel=1e-6)


@pytest.mark.parametrize("chunk_size", [N, 37], ids=["one-chunk", "streamed"])
def test_evaluate_frames_matches_an_independent_numpy_computation(scored, chunk_size):
    model, x, ref = scored
    # the reference is non-trivial: each level lowers the error, and codes spread over every level
    mse = [lv["mse"] for lv in ref["levels"]]
    assert mse[0] > 1.05 * mse[1] > 1.05**2 * mse[2], mse
    assert (ref["counts"] > 0).sum(1).min() >= K // 2
    codes = GemmaRVQFrameCodec(model).encode_frames(x)
    assert np.array_equal(codes.numpy(), ref["codes"])
    _assert_matches(evaluate_frames(model, x, chunk_size=chunk_size), ref)
    # the same numbers when the frames come as an iterable of chunks with the centring vector given
    _assert_matches(evaluate_frames(model, iter(x.split(50)), mean=x.double().mean(0), chunk_size=chunk_size), ref)


def test_the_independent_check_catches_a_decoder_that_uses_only_level_0(scored):
    model, x, ref = scored

    class FirstLevelOnly(GemmaRVQFrameCodec):
        def decode_frames(self, codes):
            return super().decode_frames(codes[:, :1])

    with pytest.raises(AssertionError):
        _assert_matches(evaluate_frames(FirstLevelOnly(model), x), ref)


def test_evaluate_frames_restores_training_mode_and_refuses_bad_input(scored):
    model, x, _ = scored
    model.train()
    evaluate_frames(model, x[:10], per_level=False)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        evaluate_frames(model, x[None])
    with pytest.raises(ValueError, match="no frames"):
        evaluate_frames(model, x[:0])
    with pytest.raises(ValueError, match="mean="):
        evaluate_frames(model, iter([x]))
    with pytest.raises(ValueError, match="cannot score"):
        evaluate_frames(object(), x)


def test_trainer_keeps_the_old_import_path():
    import gemma_rvq.evaluation
    import gemma_rvq.training
    import gemma_rvq.training.trainer

    assert gemma_rvq.training.trainer.evaluate_frames is gemma_rvq.evaluation.evaluate_frames
    assert gemma_rvq.training.evaluate_frames is gemma_rvq.evaluation.evaluate_frames
    assert gemma_rvq.training.trainer.metric_plots is gemma_rvq.evaluation.metric_plots


def test_audio_files_are_decoded_and_encoded_a_bounded_batch_at_a_time(tiny_gemma4_rvq, make_speech, tmp_path,
                                                                       monkeypatch):
    import soundfile

    import gemma_rvq.evaluation as ev

    files = []
    for i, seconds in enumerate((3.0, 0.5, 2.0, 1.0, 2.5)):
        path = tmp_path / f"clip{i}.wav"
        soundfile.write(path, make_speech(seconds, 22050, seed=i), 22050)
        files.append(path)
    calls = []
    real_embed = tiny_gemma4_rvq.embed

    def spy(waves, **kwargs):
        calls.append([round(len(w) / tiny_gemma4_rvq.sampling_rate, 2) for w in waves])
        return real_embed(waves, **kwargs)

    decoded = []
    real_load = ev._load_waveform
    monkeypatch.setattr(ev, "_load_waveform", lambda m, p: decoded.append(p) or real_load(m, p))
    monkeypatch.setattr(tiny_gemma4_rvq, "embed", spy)
    chunks = list(ev.iter_audio_frames(tiny_gemma4_rvq, files, batch_size=2, batch_seconds=3.5))
    # sorted by length, at most 2 files and 3.5 s per encoder call; a file longer than the budget goes alone
    assert calls == [[0.5, 1.0], [2.0], [2.5], [3.0]]
    assert len(chunks) == 4 and len(decoded) == 5
    monkeypatch.undo()
    # the same numbers whatever the batching
    whole = ev.evaluate_audio_files(tiny_gemma4_rvq, files, batch_size=16, batch_seconds=1000)
    small = ev.evaluate_audio_files(tiny_gemma4_rvq, files, batch_size=1)
    assert small["num_frames"] == whole["num_frames"] == sum(c.shape[0] for c in chunks)
    assert small["fvu"] == pytest.approx(whole["fvu"], rel=1e-4)
    assert whole["seconds_of_audio"] == pytest.approx(9.0, abs=0.3)
    with pytest.raises(ValueError, match="no audio files"):
        list(ev.iter_audio_frames(tiny_gemma4_rvq, []))
