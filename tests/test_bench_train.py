"""benchmarks/bench_train.py runs end to end at toy size (seconds) and resumes from its stored runs."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from conftest import load_script

ESPEAK_MISSING = ("espeak-ng is not installed: the training benchmark's speech generator (and "
                  "tests/test_corpus.py's regeneration checks) cannot run. `make test` installs it with apt-get "
                  "where it can; otherwise `apt-get install espeak-ng`.")


def _bench():
    return load_script("benchmarks/bench_train.py")


TINY = ["--languages", "en", "sw", "--per-language", "3", "--dev-variations", "2", "--test-variations", "2",
        "--levels", "2", "--codes", "8", "--batch-size", "64", "--steps", "3", "--kmeans-frames", "256",
        "--kmeans-iters", "2", "--train-eval-frames", "300", "--seeds", "0", "--tune", "--tune-seeds", "100", "--tune-steps", "3",
        "--tune-grid", '{"decay": [0.8, 0.9], "learnable_lr": [0, 0.01]}', "--baseline-steps", "3",
        "--skip-ram", "--voice-attribution"]


@pytest.fixture
def espeak():
    if shutil.which("espeak-ng") is None:
        warnings.warn(ESPEAK_MISSING, stacklevel=1)
        pytest.skip(ESPEAK_MISSING)


def test_bench_train_smoke_runs_scores_every_split_and_resumes(espeak, tmp_path, capsys):
    bench = _bench()
    out = bench.main([*TINY, "--workdir", str(tmp_path), "--json", str(tmp_path / "out.json")])
    printed = capsys.readouterr().out
    # the tuned baseline is chosen on dev and compared on test; every system is scored on every split
    assert out["checks"]["baseline compared"] in ("vqtorch tuned", "vqtorch kmeans+dead")
    assert {"gemma-rvq (best)", "gemma-rvq (averaged)", "vqtorch default", "vqtorch kmeans+dead"} <= set(out["runs"])
    for runs in out["runs"].values():
        assert {"train", "dev", "test"} <= set(runs[0])
        assert 0 < runs[0]["test"]["fvu"] < 2 and len(runs[0]["test"]["level_errors"]["mse"]) == 2
    assert len(out["tuning"]["tried"]) == 3  # decay 0.8 and 0.9, then learnable lr 0.01 (lr 0 = the best so far)
    assert "test (unseen texts and voice m6; never used for any choice" in printed
    assert "scoring path checked on" in printed and "level-1 codes unused on dev" in printed
    assert json.loads((tmp_path / "out.json").read_text())["checks"] == out["checks"]
    # a second invocation trains nothing: every run comes back from <workdir>/results
    stored = sorted((tmp_path / "results").iterdir())
    again = bench.main([*TINY, "--workdir", str(tmp_path)])
    assert sorted((tmp_path / "results").iterdir()) == stored
    assert again["checks"] == out["checks"]
    assert "scoring path checked" not in capsys.readouterr().out  # nothing newly trained


def test_residual_vq_codec_is_checked_against_the_library_forward():
    import torch
    from vector_quantize_pytorch import ResidualVQ

    from gemma_rvq.evaluation import evaluate_frames

    bench = _bench()
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=6, num_quantizers=3, codebook_size=5, kmeans_init=True, kmeans_iters=2)
    x = torch.randn(200, 6)
    rvq.train()
    rvq(x[None])  # k-means init
    codec = bench.ResidualVQCodec(rvq)
    assert bench.check_scoring_path(codec, x) <= 1e-6
    own, _, _ = rvq.eval()(x[None])
    out = evaluate_frames(codec, x)
    assert out["mse"] == pytest.approx(float((own[0] - x).pow(2).mean()), rel=1e-5)
    # decoding k < Q levels marks the others -1: the sum of the first k levels' codes
    first = codec.decode_frames(codec.encode_frames(x)[:, :1])
    assert torch.allclose(first, rvq.layers[0].codebook[codec.encode_frames(x)[:, 0]], atol=1e-6)
    assert out["level_errors"]["mse"][0] > out["level_errors"]["mse"][-1]
