"""Throughput of ``dataset.map(SpeechTokenizer(...), batched=True)`` against the seed card's snippet.

Everything is measured in one process, on the same random Gemma 4 audio encoder and the same 8 x 2048
codebooks, over the same clips (the committed espeak-ng corpus at 22.05 kHz, concatenated into clips of
1-20 s), stored as FLAC bytes in an ``Audio(decode=False)`` column. The encoder is full size by default
(``Gemma4AudioConfig()``: hidden 1024, 12 conformer layers, 8 heads, ~300M parameters, as in Gemma 4);
``--quick`` takes the tiny test encoder (hidden 64, 2 layers), where the conv front end dominates.
The random encoder's weights are rounded to bfloat16 values, as the published Gemma 4 checkpoints store
them (``audio_config.dtype`` is ``"bfloat16"``): a float32 run then computes with exactly the weights a
user loads, and only the activations' rounding separates it from the snippet's bf16 run
(``--fp32-weights`` keeps full float32 random weights, as before 2026-11-29).

(a)  ``ds.map(SpeechTokenizer(model), batched=True)`` with the defaults (``dtype="auto"``,
     ``cpu_streams="auto"``) end to end: FLAC decode, resampling to 16 kHz, log-mel features, encoder,
     RVQ, token strings, Arrow cache-file writing.
(b)  the seed card's snippet: soundfile decode + soxr resampling, ``Gemma4AudioFeatureExtractor``, the
     encoder in bfloat16 (the card's ``torch_dtype``) with a forward hook on ``output_proj`` catching its
     input, the seed's ``RVQWrapper`` (LayerNorm -> Linear -> vector-quantize-pytorch ``ResidualVQ``, fp32
     as loaded) holding the same codebooks, token strings.
(c)  the limit: the encoder's own forward on already-computed features, in the dtype (a) runs it in.
(a32), (a16): (a) with ``dtype="float32"`` / ``dtype="bfloat16"`` (the card's encoder dtype), whichever
     of the two ``"auto"`` did not pick.

Like is compared with like: "1 stream" rows make one encoder call at a time with all ``--threads`` torch
threads ((a) with ``cpu_streams=1``, the snippet as written, (c) one clip per call); "2 streams" rows run
two calls at once with the torch threads split between them ((a) with ``cpu_streams=2``, the snippet and
(c) each in two Python threads over half the clips, longest first).

Methods alternate within each round and the best round of each counts; the machine's load average and its
GEMM rates (fp32 and bf16 ``torch.mm`` at the encoder's feed-forward shape) are printed beside the
ratios: these shared machines drift, so only ratios taken in one run mean anything.

Checks, on every clip: the snippet run in fp32 gives the same token strings as the transform with
``dtype="float32"``; and, for every (a) row and the fp32 snippet, the share of codes identical to the
snippet's own (bf16) codes and to the fp32 codes (level 0, and all levels).

    python benchmarks/bench_tokenize.py                          # full size, 1 min of audio, 2 rounds
    python benchmarks/bench_tokenize.py --quick --minutes 3 --rounds 3
    python benchmarks/bench_tokenize.py --quick --minutes 1 --rounds 1 --profile
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import soundfile
import soxr
import torch
from datasets import Audio, Dataset, load_from_disk
from torch import nn
from transformers import Gemma4AudioFeatureExtractor

from gemma_rvq.testing import tiny_rvq_model
from gemma_rvq.tokens import get_format
from gemma_rvq.transforms import SpeechTokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
FULL = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 8,
        "subsampling_conv_channels": [128, 32], "output_proj_dims": 1536}  # Gemma4AudioConfig() defaults
QUICK = {"hidden_size": 64, "num_hidden_layers": 2}  # gemma_rvq.testing.tiny_gemma4_audio_config


@torch.no_grad()
def as_published(encoder: nn.Module) -> nn.Module:
    """Round what ``encoder``'s checkpoint would hold (its state dict) to bfloat16 values, in place, kept in fp32.

    The published Gemma 4 checkpoints store the audio tower in bfloat16, so a user's float32 encoder holds
    bf16-valued weights; a random float32 encoder would differ from the snippet's bf16 one in every weight.
    Buffers outside the state dict (the positional timescales) are computed at load time and stay as they are.
    """
    for tensor in encoder.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(torch.bfloat16).to(tensor.dtype))
    return encoder


def make_clips(minutes: float, seed: int) -> tuple[list[bytes], list[float], int]:
    """FLAC clips of 1-20 s (corpus clips concatenated, cut to a drawn length), ``minutes`` in all."""
    rows = [json.loads(line) for line in (CORPUS / "metadata.jsonl").read_text().splitlines() if line]
    waves, rate = [], None
    for row in rows:
        wave, rate = soundfile.read(CORPUS / row["file"], dtype="float32")
        waves.append(wave)
    rng = np.random.default_rng(seed)
    stream = np.concatenate([waves[i] for i in rng.permutation(len(waves))] * 8)
    clips, durations, pos, total = [], [], 0, 0.0
    while total < minutes * 60:
        seconds = float(rng.uniform(1.0, 20.0))
        n = int(seconds * rate)
        if pos + n > len(stream):
            pos = 0
        buf = io.BytesIO()
        soundfile.write(buf, stream[pos : pos + n], rate, format="FLAC", subtype="PCM_16")
        clips.append(buf.getvalue())
        durations.append(n / rate)
        pos += n
        total += n / rate
    return clips, durations, rate


class SeedRVQWrapper(nn.Module):
    """The seed's ``RVQWrapper`` layout (LayerNorm -> Linear -> ResidualVQ), codebooks copied from ``model``."""

    def __init__(self, model) -> None:
        from vector_quantize_pytorch import ResidualVQ

        super().__init__()
        cfg = model.config
        self.norm = copy.deepcopy(model.in_norm)
        self.proj = copy.deepcopy(model.in_proj)
        self.rvq = ResidualVQ(
            dim=cfg.codebook_dim, num_quantizers=cfg.num_quantizers, codebook_size=cfg.codebook_size
        )
        state = self.rvq.state_dict()
        codebooks = model.quantizer.codebooks.detach().float()
        for q in range(cfg.num_quantizers):
            state[f"layers.{q}._codebook.embed"] = codebooks[q][None].clone()
            state[f"layers.{q}._codebook.embed_avg"] = codebooks[q][None].clone()
            state[f"layers.{q}._codebook.cluster_size"] = torch.ones(1, cfg.codebook_size)
            state[f"layers.{q}._codebook.initted"] = torch.tensor(True)
        self.rvq.load_state_dict(state)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> indices [B, T, Q]
        _, indices, _ = self.rvq(self.proj(self.norm(x)))
        return indices


class SeedSnippet:
    """(b): the card's usage, one clip at a time (safe to call from several threads at once)."""

    def __init__(self, model, dtype: torch.dtype) -> None:
        self.encoder = copy.deepcopy(model.get_audio_encoder()).to(dtype).eval()
        self.dtype = dtype
        self.feature_extractor = Gemma4AudioFeatureExtractor()
        self.rvq = SeedRVQWrapper(model)
        self.format = get_format("gemma_rvq")
        self._local = threading.local()  # the hook's catch, per calling thread
        self.encoder.output_proj.register_forward_hook(
            lambda mod, args, out: setattr(self._local, "captured", args[0])
        )

    @torch.no_grad()
    def codes(self, flac: bytes) -> np.ndarray:
        wave, rate = soundfile.read(io.BytesIO(flac), dtype="float32")
        wave = soxr.resample(wave, rate, 16000, quality="HQ")
        feats = self.feature_extractor([wave], return_tensors="pt")
        out = self.encoder(
            feats["input_features"].to(self.dtype), attention_mask=feats["input_features_mask"]
        )
        hidden = self._local.captured.float()  # [1, T, D]: the input of output_proj
        mask = out.attention_mask.bool()
        indices = self.rvq(hidden)[0]  # [T, Q]
        return indices[mask[0]].T.numpy()  # [Q, T]

    def __call__(self, clips: Sequence[bytes]) -> list[str]:
        return [self.format.render(self.codes(c)) for c in clips]


def file_backed(clips: list[bytes], folder: str) -> Dataset:
    ds = Dataset.from_dict({"audio": [{"bytes": c, "path": None} for c in clips]})
    ds = ds.cast_column("audio", Audio(decode=False))
    ds.save_to_disk(folder)
    return load_from_disk(folder)


def split_longest_first(sizes: Sequence[float], parts: int) -> list[list[int]]:
    """Indices split into ``parts`` lists of about equal total size (longest first, each to the lightest)."""
    out: list[list[int]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        k = load.index(min(load))
        out[k].append(i)
        load[k] += sizes[i]
    return out


def in_streams(work: Callable[[list[int]], object], shares: list[list[int]]) -> list:
    """``work(share)`` for each share at once in threads, the torch threads split between them (as the
    transform's ``cpu_streams`` does)."""
    if len(shares) == 1:
        return [work(shares[0])]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // len(shares)))
    try:
        with ThreadPoolExecutor(len(shares)) as pool:
            return list(pool.map(work, shares))
    finally:
        torch.set_num_threads(threads)


def gemm_rates(threads: int, rows: int, hidden: int) -> dict[str, float]:
    """GFLOP/s of ``torch.mm`` [rows, hidden] x [hidden, 4 hidden] (the conformer feed-forward) in fp32 and bf16."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rates = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(rows, hidden).to(dtype), torch.randn(hidden, 4 * hidden).to(dtype)
            for _ in range(2):  # warm-up: the thread pool, the kernel choice
                torch.mm(a, b)
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - start)
            rates[str(dtype).removeprefix("torch.")] = 2 * rows * hidden * 4 * hidden / best / 1e9
        return rates
    finally:
        torch.set_num_threads(before)


def machine_line(args, hidden: int) -> str:
    rates = {t: gemm_rates(t, 256, hidden) for t in sorted({args.threads, 1})}
    shown = "; ".join(f"{t} thread{'s' if t > 1 else ''}: fp32 {r['float32']:.0f}, bf16 {r['bfloat16']:.0f}"
                      for t, r in rates.items())
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; GEMM GFLOP/s ({shown})"


def agreement(codes: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[float, float]:
    """(level-0 share, all-levels share) of equal codes over every frame of every clip."""
    same0 = sum(int((c[0] == r[0]).sum()) for c, r in zip(codes, reference))
    same = sum(int((c == r).sum()) for c, r in zip(codes, reference))
    frames = sum(r.shape[1] for r in reference)
    return same0 / frames, same / (frames * reference[0].shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny encoder (hidden 64, 2 layers): seconds")
    parser.add_argument("--minutes", type=float, default=None, help="total audio (default: 1, --quick: 3)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default: 2, --quick: 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", default="auto", help="SpeechTokenizer batch_size (int or auto)")
    parser.add_argument("--batch-seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=None, help="encoder hidden size (default: 1024, --quick: 64)")
    parser.add_argument("--layers", type=int, default=None, help="encoder layers (default: 12, --quick: 2)")
    parser.add_argument("--profile", action="store_true", help="cProfile one (a) run, print the top entries")
    parser.add_argument("--fp32-weights", action="store_true",
                        help="keep float32 random encoder weights (default: bf16 values, as published)")
    args = parser.parse_args()
    minutes = args.minutes if args.minutes is not None else (3.0 if args.quick else 1.0)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 2)
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    encoder_kwargs = dict(QUICK if args.quick else FULL)
    if args.hidden is not None:
        encoder_kwargs["hidden_size"] = args.hidden
    if args.layers is not None:
        encoder_kwargs["num_hidden_layers"] = args.layers
    hidden = encoder_kwargs["hidden_size"]
    two = args.threads >= 2  # the 2-stream rows need 2 threads to split

    clips, durations, rate = make_clips(minutes, args.seed)
    total = sum(durations)
    print(machine_line(args, hidden), flush=True)
    print(
        f"{len(clips)} clips, {total:.0f} s of audio at {rate} Hz (FLAC), {min(durations):.1f}-"
        f"{max(durations):.1f} s; torch threads {torch.get_num_threads()}"
    )
    model = tiny_rvq_model(num_quantizers=8, codebook_size=2048, seed=args.seed, encoder_kwargs=encoder_kwargs).eval()
    encoder = model.get_audio_encoder()
    if not args.fp32_weights:
        as_published(encoder)
    params = sum(p.numel() for p in encoder.parameters())
    print(
        f"model: random Gemma 4 audio encoder (hidden {hidden}, {len(encoder.layers)} layers, "
        f"{params / 1e6:.0f}M parameters, {'float32' if args.fp32_weights else 'bf16-valued'} weights), RVQ {model.config.num_quantizers} x {model.config.codebook_size}",
        flush=True,
    )
    seed = SeedSnippet(model, torch.bfloat16)
    tmp = tempfile.TemporaryDirectory()
    ds = file_backed(clips, f"{tmp.name}/ds")
    fmt = get_format("gemma_rvq")

    def transform(streams: int | str = "auto", dtype: str | None = "auto") -> SpeechTokenizer:
        return SpeechTokenizer(model, batch_size=batch_size, batch_seconds=args.batch_seconds, cpu_streams=streams,
                               dtype=dtype)

    default = transform()
    chosen = default.precision.encoder  # what dtype="auto" picked on this machine
    print(f"dtype='auto' chose {chosen} for the encoder (quantizer {default.precision.quantizer})")

    # (c) inputs: each clip's features, computed once; the encoder in (a)'s dtype.
    fe = Gemma4AudioFeatureExtractor()
    waves = [
        soxr.resample(soundfile.read(io.BytesIO(c), dtype="float32")[0], rate, 16000, quality="HQ")
        for c in clips
    ]
    feats = [fe([w], truncation=False, return_tensors="pt") for w in waves]
    limit_encoder = encoder if chosen == "float32" else copy.deepcopy(encoder).to(getattr(torch, chosen))
    limit_dtype = next(limit_encoder.parameters()).dtype
    shares = {1: [list(range(len(clips)))]}
    if two:
        shares[2] = split_longest_first(durations, 2)

    @torch.inference_mode()
    def run_c(share: list[int]) -> None:
        for i in share:
            f = feats[i]
            limit_encoder(f["input_features"].to(limit_dtype), attention_mask=f["input_features_mask"],
                          output_hidden_states=[len(limit_encoder.layers)])

    def run_a(streams: int | str = "auto", dtype: str | None = "auto") -> tuple[SpeechTokenizer, Dataset]:
        tok = transform(streams, dtype)
        return tok, ds.map(tok, batched=True, batch_size=256, load_from_cache_file=False)

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        return (time.perf_counter() - wall, time.process_time() - cpu), result

    labels = {
        "a": "(a)   map(SpeechTokenizer), defaults",
        "a1": "(a1)  map, cpu_streams=1                  [1 stream]",
        "b1": "(b1)  seed card snippet (bf16 encoder)    [1 stream]",
        "c1": f"(c1)  encoder forward alone, {chosen:<9}    [1 stream]",
    }
    if two:
        labels |= {
            "a2": "(a2)  map, cpu_streams=2                  [2 streams]",
            "b2": "(b2)  seed card snippet (bf16 encoder)    [2 streams]",
            "c2": f"(c2)  encoder forward alone, {chosen:<9}    [2 streams]",
        }
    if chosen != "float32":
        labels["a32"] = "(a32) map, dtype='float32'"
    if chosen != "bfloat16":
        labels["a16"] = "(a16) map, dtype='bfloat16' (the card's)"
    best = {k: (float("inf"), float("inf")) for k in labels}  # best (wall, cpu) seconds
    seed_codes: list[np.ndarray] = []
    outputs: dict[str, list[str]] = {}
    for r in range(rounds):
        measured = {}
        measured["a"], (tok, out) = timed(run_a)
        outputs["a"] = out["semantic_tokens"]
        measured["a1"], (_, out1) = timed(lambda: run_a(1))
        assert out1["semantic_tokens"] == outputs["a"], "cpu_streams changed the tokens"
        if two:
            measured["a2"], (_, out2) = timed(lambda: run_a(2))
            assert out2["semantic_tokens"] == outputs["a"], "cpu_streams changed the tokens"
        for key, dtype in (("a32", "float32"), ("a16", "bfloat16")):
            if key in labels:
                measured[key], (_, out_) = timed(lambda dtype=dtype: run_a(dtype=dtype))
                outputs[key] = out_["semantic_tokens"]
        measured["b1"], (seed_codes,) = timed(lambda: in_streams(lambda s: [seed.codes(clips[i]) for i in s], shares[1]))
        measured["c1"], _ = timed(lambda: in_streams(run_c, shares[1]))
        if two:
            measured["b2"], _ = timed(lambda: in_streams(lambda s: [seed.codes(clips[i]) for i in s], shares[2]))
            measured["c2"], _ = timed(lambda: in_streams(run_c, shares[2]))
        for key, t in measured.items():
            best[key] = (min(best[key][0], t[0]), min(best[key][1], t[1]))
        used = tok.batch_plan.choice or {"count": batch_size}
        print(
            f"round {r + 1} (load {os.getloadavg()[0]:.1f}): "
            + "  ".join(f"{key} {total / t[0]:.2f}" for key, t in measured.items())
            + f" audio s/s; (a) chose {used}",
            flush=True,
        )

    speeds = {k: total / v[0] for k, v in best.items()}
    cpu = {k: total / v[1] for k, v in best.items()}
    print()
    print(f"audio seconds per second, best of {rounds} rounds (per CPU-second in brackets):")
    for key, label in labels.items():
        print(f"  {label:<56} {speeds[key]:8.2f}  [{cpu[key]:7.2f}]")

    def ratio(a: str, b: str, percent: bool = False) -> str:
        value, per_cpu = speeds[a] / speeds[b], cpu[a] / cpu[b]
        return f"{value:.0%}  [{per_cpu:.0%}]" if percent else f"{value:.2f}x  [{per_cpu:.2f}x]"

    print(f"  (a) / (b1) = {ratio('a', 'b1')}   the defaults against the snippet as written   (target >= 2x)")
    print(f"  (a1) / (b1) = {ratio('a1', 'b1')}   (a1) / (c1) = {ratio('a1', 'c1', True)}   [1 stream each]")
    if two:
        print(f"  (a2) / (b2) = {ratio('a2', 'b2')}   (a2) / (c2) = {ratio('a2', 'c2', True)}   [2 streams each]")
    streams = (tok.batch_plan.choice or {}).get("streams", 1)
    print(f"  (a) / (c{streams}) = {ratio('a', f'c{streams}', True)}   [(a) chose {streams} stream(s)]   (target >= 70%)")
    for key in ("a32", "a16"):
        if key in labels:
            print(f"  ({key}) / (b1) = {ratio(key, 'b1')}")
    print(machine_line(args, hidden))

    # Faithfulness, on every clip.
    exact = SpeechTokenizer(model, dtype="float32", batch_size=batch_size, batch_seconds=args.batch_seconds)
    ours32 = ds.map(exact, batched=True, batch_size=256, load_from_cache_file=False)["semantic_tokens"]
    if chosen == "float32":
        assert ours32 == outputs["a"]
    seed32 = SeedSnippet(model, torch.float32)
    seed32_codes = [seed32.codes(c) for c in clips]
    same = sum(seed32.format.render(c) == s for c, s in zip(seed32_codes, ours32))
    print(f"  checks: seed snippet in fp32 == transform (dtype='float32') on {same}/{len(clips)} clips")
    if same < len(clips):
        ours32_codes = [fmt.parse(s).expand() for s in ours32]
        differ = sum(int((a != b).sum()) for a, b in zip(seed32_codes, ours32_codes))
        print(f"    {len(clips) - same} clips differ, in {differ} of {sum(c.size for c in seed32_codes)} codes")
    rows = {f"(a) dtype='auto' ({chosen})": outputs["a"]}
    rows |= {f"(a{k[1:]}) dtype='{d}'": outputs[k] for k, d in (("a32", "float32"), ("a16", "bfloat16")) if k in outputs}
    rows = {name: [fmt.parse(s).expand() for s in strings] for name, strings in rows.items()}
    rows["(b) the snippet in fp32"] = seed32_codes
    print("  code agreement (share of identical codes; level 0, all levels):")
    for name, codes in rows.items():
        bf0, bf = agreement(codes, seed_codes)
        fp0, fp = agreement(codes, seed32_codes)
        print(f"    {name:<34} with the snippet's bf16 codes {bf0:7.2%}, {bf:7.2%};  with fp32 {fp0:7.2%}, {fp:7.2%}")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run_a(1)  # one stream, so that the profiler sees the work
        prof.disable()
        print("\ncProfile of one (a1) run, top 20 by internal time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
