"""Smoke runs of the benchmarks without a test of their own (tiny arguments): a script cannot rot unnoticed.

Each runs as a user would (``python benchmarks/X.py ...``, a subprocess) and must print its result lines;
the numbers themselves are the benchmark's business (docs/benchmarks.md), not the test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_bench_generate_smoke(tmp_path):
    out = _run("bench_generate.py", "--rounds", "1", "--new-tokens", "8", "--device", "cpu",
               "--json", str(tmp_path / "g.json"))
    results = json.loads((tmp_path / "g.json").read_text())
    assert results and "grammar" in out


def test_bench_stream_smoke(tmp_path):
    out = _run("bench_stream.py", "--seconds", "2", "--chunk-ms", "160", "random", "--repeats", "1",
               "--out", str(tmp_path / "s.json"))
    results = json.loads((tmp_path / "s.json").read_text())
    assert results and "160" in out


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The GPU check's harness on CPU (``--device cpu`` is its documented dry run), with its cheapest section."""
    out = _run("gpu_check.py", "--device", "cpu", "--sections", "train", "--out", str(tmp_path / "gpu.json"))
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert "train" in results and "ok=True" in out


@pytest.mark.skipif(not (ROOT / "data" / "corpus").is_dir(), reason="needs the committed corpus")
def test_bench_cluster_smoke():
    out = _run("bench_cluster.py", "--workers", "1", "--rounds", "1")
    assert "datatrove" in out.lower()
