"""Ways to run the Gemma 4 audio encoder on a CPU, timed in one process on the same features.

Variants (the encoder's last hidden state, then the same 8 x 2048 RVQ for the codes):

- ``fp32``: the encoder in float32, eager;
- ``bf16``: the encoder in bfloat16, eager (the seed card's dtype);
- ``bf16-fp32-kernels``: the bf16 model, but every ``Linear`` / ``Conv`` runs the float32 kernel on its
  bf16-valued operands and rounds the result back to bf16 (what a bf16 GEMM computes, up to the order of
  accumulation): bf16 numbers on a CPU whose bf16 GEMM is emulated;
- ``fp32-compiled`` (with ``--compile``): the fp32 encoder under ``torch.compile`` (inductor, default mode;
  compile time printed separately, not counted in the rate).

The random encoder holds bf16-valued weights, as the published checkpoints do (``--fp32-weights``: full
float32 random weights). Printed: audio seconds per second of each (features precomputed, one pass after a warm-up, best of
``--rounds``), the load average, and the share of level-0 codes identical to the bf16 variant's and to
fp32's.

    python benchmarks/bench_encoder_variants.py --minutes 0.2 --rounds 1     # full size (305M)
    python benchmarks/bench_encoder_variants.py --quick
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import time
import types

import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Gemma4AudioFeatureExtractor

from bench_tokenize import FULL, QUICK, SeedRVQWrapper, as_published, make_clips
from gemma_rvq.testing import tiny_rvq_model


def fp32_kernels(module: nn.Module) -> nn.Module:
    """``module`` (in bf16) with each Linear / Conv computed by the fp32 kernel, output rounded to bf16."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m._w32 = m.weight.float()
            m._b32 = None if m.bias is None else m.bias.float()
            if isinstance(m, nn.Linear):
                m.forward = types.MethodType(lambda self, x: F.linear(x.float(), self._w32, self._b32).to(x.dtype), m)
            else:
                base = type(m)._conv_forward
                m._conv_forward = types.MethodType(
                    lambda self, x, w, b, base=base: base(self, x.float(), self._w32, self._b32).to(x.dtype), m
                )
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny encoder (hidden 64, 2 layers)")
    parser.add_argument("--minutes", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fp32 encoder)")
    parser.add_argument("--fp32-weights", action="store_true",
                        help="keep float32 random encoder weights (default: bf16 values, as published)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_rvq_model(num_quantizers=8, codebook_size=2048, seed=0,
                           encoder_kwargs=dict(QUICK if args.quick else FULL)).eval()
    encoder = model.get_audio_encoder()
    if not args.fp32_weights:
        as_published(encoder)
    layers = len(encoder.layers)
    clips, durations, rate = make_clips(args.minutes, 0)
    total = sum(durations)
    fe = Gemma4AudioFeatureExtractor()
    feats = [fe([soxr.resample(soundfile.read(io.BytesIO(c), dtype="float32")[0], rate, 16000, quality="HQ")],
                truncation=False, return_tensors="pt") for c in clips]
    params = sum(p.numel() for p in encoder.parameters()) / 1e6
    print(f"{len(clips)} clips, {total:.0f} s of audio; encoder {params:.0f}M parameters; {args.threads} threads")
    rvq = SeedRVQWrapper(model)
    variants = {
        "fp32": (encoder, torch.float32),
        "bf16": (copy.deepcopy(encoder).to(torch.bfloat16), torch.bfloat16),
        "bf16-fp32-kernels": (fp32_kernels(copy.deepcopy(encoder).to(torch.bfloat16)), torch.bfloat16),
    }
    if args.compile:
        variants["fp32-compiled"] = (torch.compile(encoder), torch.float32)

    @torch.no_grad()
    def run(name: str) -> list[np.ndarray]:
        module, dtype = variants[name]
        out = []
        for f in feats:
            h = module(f["input_features"].to(dtype), attention_mask=f["input_features_mask"],
                       output_hidden_states=[layers]).hidden_states[-1]
            out.append(rvq(h.float())[0].T.numpy())
        return out

    codes, best = {}, {}
    for name in variants:
        start = time.perf_counter()
        codes[name] = run(name)  # warm-up (and, for the compiled variant, compilation)
        if name == "fp32-compiled":
            print(f"torch.compile + first pass: {time.perf_counter() - start:.0f} s")
    for _ in range(args.rounds):
        for name in variants:  # alternating
            start = time.perf_counter()
            run(name)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)

    def agree(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return sum(int((x[0] == y[0]).sum()) for x, y in zip(a, b)) / sum(y.shape[1] for y in b)

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name in variants:
        print(f"  {name:<18} {total / best[name]:8.2f} audio s/s  ({best['bf16'] / best[name]:.2f}x bf16)   "
              f"level-0 codes equal to bf16's {agree(codes[name], codes['bf16']):7.2%}, "
              f"to fp32's {agree(codes[name], codes['fp32']):7.2%}")


if __name__ == "__main__":
    main()
