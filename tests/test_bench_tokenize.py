"""benchmarks/bench_tokenize.py runs end to end at toy size, so the script cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tokenize_smoke():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tokenize.py"), "--minutes", "0.05",
                           "--rounds", "1", "--threads", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for line in ("(a)  dataset.map(SpeechTokenizer", "(b)  seed card snippet", "(c)  encoder forward alone",
                 "(a) / (b) =", "(a) / (c) ="):
        assert line in out, f"missing {line!r} in:\n{out}"
    # the faithfulness check compares the transform's strings with the fp32 seed snippet's, clip by clip
    checked = out.split("checks: seed snippet in fp32 == transform on ")[1].split(" clips")[0]
    same, total = map(int, checked.split("/"))
    assert total >= 1 and same == total
