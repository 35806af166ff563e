"""Smoke test of benchmarks/bench_encode.py (issue 13: every benchmark runs in the suite, so it cannot rot)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_encode.py"


@pytest.fixture(scope="module")
def bench_encode():
    spec = importlib.util.spec_from_file_location("bench_encode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_encode"] = module
    spec.loader.exec_module(module)
    return module


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
