"""Smoke test of benchmarks/bench_encode.py (issue 13: every benchmark runs in the suite, so it cannot rot)."""

from __future__ import annotations

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench_encode():
    return load_script("benchmarks/bench_encode.py")


def test_bench_encode_runs_at_tiny_sizes(bench_encode, capsys):
    pytest.importorskip("vector_quantize_pytorch")
    result = bench_encode.main(["-Q", "2", "-K", "64", "-D", "32", "-N", "600", "--threads", "1", "--repeats", "1",
                                "--sweep", "128", "--vq-chunks", "256", "--slice-size", "256",
                                "--check-frames", "200"])
    out = capsys.readouterr().out
    for line in ("ratio gemma-rvq / fp32 GEMM bound", "ratio gemma-rvq / vqtorch", "candidates per frame and level",
                 "codes identical to float64 exhaustive search", "peak extra memory gemma-rvq"):
        assert line in out
    assert result["identical"] == 1.0 and result["identical_fp32"] == 1.0  # exact, whatever the kernel
    assert result["same_as_vqtorch"] > 0.99  # continuous random data: no ties
    assert result["stats"]["rows"] == 600 * 2 and result["stats"]["mean_candidates"] >= 1
    assert all(v > 0 for v in result["fps"].values())


def test_bench_encode_kmeans_codebooks_from_a_cache(bench_encode, tmp_path, capsys):
    """``--kmeans TRAIN --frames DEV``: codebooks fitted by residual k-means, frames from another cache."""
    import numpy as np

    from gemma_rvq.training.cache import EmbeddingCacheWriter, finalize_cache

    rng = np.random.default_rng(0)
    for split, utts in (("train", 6), ("dev", 3)):
        writer = EmbeddingCacheWriter(tmp_path / split, 16)
        for i in range(utts):
            writer.add(f"{split}{i}", i, rng.standard_normal((50, 16), dtype=np.float32))
        writer.close()
        finalize_cache(tmp_path / split)
    result = bench_encode.main(["--kmeans", str(tmp_path / "train"), "--frames", str(tmp_path / "dev"), "-Q", "2",
                                "-K", "16", "-N", "150", "--threads", "1", "--repeats", "1", "--sweep", "64",
                                "--slice-size", "64", "--check-frames", "150", "--skip-vqtorch", "--kmeans-iters", "3"])
    out = capsys.readouterr().out
    assert "k-means codebooks: 2 x 16 on 300 frames" in out
    assert result["identical"] == 1.0 and result["stats"]["rows"] == 150 * 2
