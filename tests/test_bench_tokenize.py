"""benchmarks/bench_tokenize.py runs end to end at toy size, so the script cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tokenize_smoke():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tokenize.py"), "--quick", "--minutes",
                           "0.05", "--rounds", "1", "--threads", "2"], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for line in ("GEMM GFLOP/s (1 thread: fp32", "dtype='auto' chose", "(a)   map(SpeechTokenizer), defaults",
                 "(a1)  map, cpu_streams=1", "(b1)  seed card snippet", "(c1)  encoder forward alone",
                 "(a2)  map, cpu_streams=2", "(b2)  seed card snippet", "(c2)  encoder forward alone",
                 "(a) / (b1) =", "(a1) / (b1) =", "(a2) / (b2) =", "code agreement", "with the snippet's bf16 codes"):
        assert line in out, f"missing {line!r} in:\n{out}"
    # the faithfulness check compares the transform's strings with the fp32 seed snippet's on every clip
    checked = out.split("checks: seed snippet in fp32 == transform (dtype='float32') on ")[1].split(" clips")[0]
    same, total = map(int, checked.split("/"))
    assert total >= 1 and same == total
    # agreement rows: the fp32 snippet is the fp32 reference itself, the (a) row is one of the two dtypes
    fp32_row = next(line for line in out.splitlines() if "(b) the snippet in fp32" in line)
    assert fp32_row.rstrip().endswith("with fp32 100.00%, 100.00%"), fp32_row


def test_bench_encoder_variants_smoke():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_encoder_variants.py"), "--quick",
                           "--minutes", "0.05", "--rounds", "1"], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if "audio s/s" in line}
    assert set(rows) == {"fp32", "bf16", "bf16-fp32-kernels"}, done.stdout
    assert "equal to bf16's 100.00%" in rows["bf16"] and "to fp32's 100.00%" in rows["fp32"]
