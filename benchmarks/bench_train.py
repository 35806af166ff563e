#!/usr/bin/env python
"""Stage-1 training quality: gemma-rvq's trainer vs vector-quantize-pytorch ``ResidualVQ``, same data, same time.

Data: espeak-ng speech synthesised at benchmark time with ``scripts/make_corpus.py`` (5 languages, ~38
min of training speech by default). Dev: the corpus's dev sentences (never in train) spoken by the held-out
voice variant (never in train) at several speeds and pitches: unseen texts AND an unseen voice.
Features: stacked log-mel frames (64 mel bands, 10 ms hop, 4 frames stacked -> D = 256 at 25 frames/s,
the frame rate of the Gemma 4 audio encoder), written to a gemma-rvq embedding cache.

Systems (Q levels x K codes on D = 256, same frame stream, same batch size):

* ``gemma-rvq``: ``RVQTrainer``: k-means init of every level, EMA codebooks (decay 0.95) with usage-balanced
  statistics (``balance_weight``, 1.0), dead-code restarts every step from held-in residuals, ``best`` and
  ``averaged`` exports; no projection (``use_projection=False``, as ``ResidualVQ``). Its wall time (init +
  training + evaluation + export) is the budget for the baselines.
* ``vqtorch default``: ``ResidualVQ(dim, num_quantizers, codebook_size)`` (EMA, decay 0.8), trained for the
  same wall-clock time on the same batches.
* ``vqtorch kmeans+dead``: ``ResidualVQ(..., kmeans_init=True, threshold_ema_dead_code=2)``.
* with ``--ablate-balance``, also gemma-rvq with ``balance_weight 0`` (reported, not a budget).

Every seed (``--seeds``) repeats the whole comparison (model init, k-means, batch order); tables give the
mean ± sd over seeds, and the checks count in how many seeds gemma-rvq is at least the best vqtorch
configuration on each level.

Metrics (``gemma_rvq.metrics.functional``, identical for all systems) on a held-in sample of the training
frames and on the dev set: MSE, NMSE, FVU, cosine, centred cosine; utilization and perplexity per level
(over the whole evaluation set). Ratios are against the best vqtorch configuration.

    python benchmarks/bench_train.py --per-language 40 --dev-variations 12 --seeds 0 1 2 3 4 --ablate-balance
    python benchmarks/bench_train.py --quick        # one seed, smaller budget
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

N_MELS, STACK, SR = 64, 4, 16000


# ---------------------------------------------------------------------------------------------- data


def logmel_stack(wave: np.ndarray) -> np.ndarray:
    """float32 16 kHz waveform -> stacked log-mel frames ``[T, N_MELS * STACK]`` (25 frames/s)."""
    from transformers.audio_utils import mel_filter_bank

    x = torch.from_numpy(wave)
    spec = torch.stft(x, n_fft=400, hop_length=160, win_length=400, window=torch.hann_window(400),
                      return_complex=True).abs().pow(2)  # [201, frames]
    fb = torch.from_numpy(mel_filter_bank(num_frequency_bins=201, num_mel_filters=N_MELS, min_frequency=20.0,
                                          max_frequency=8000.0, sampling_rate=SR, norm="slaney",
                                          mel_scale="slaney")).float()  # [201, N_MELS]
    mel = torch.log10(torch.clamp(fb.T @ spec, min=1e-6)).T  # [frames, N_MELS]
    t = mel.shape[0] // STACK
    return mel[: t * STACK].reshape(t, N_MELS * STACK).numpy().astype(np.float32)


def make_speech(workdir: Path, per_language: int, dev_variations: int) -> tuple[list[dict], list[dict]]:
    """Synthesise train + dev clips; returns their metadata rows (with absolute ``path``)."""
    import make_corpus

    train_rows = make_corpus.generate_corpus(workdir / "train", per_language, instructions=False, progress=False)
    train = [{**r, "path": str(workdir / "train" / r["file"])} for r in train_rows if r["split"] == "train"]
    # dev: the dev-only sentences by the held-out voice, at several speeds/pitches (and as pairs)
    dev = []
    rng = np.random.default_rng(1)
    for lang, sentences in make_corpus.SENTENCES.items():
        dev_texts = sentences[-make_corpus.N_DEV:]
        texts = [*dev_texts, " ".join(dev_texts), " ".join(reversed(dev_texts))]
        for i in range(dev_variations):
            text = texts[i % len(texts)]
            speed, pitch = int(rng.integers(150, 205)), int(rng.integers(30, 75))
            path = workdir / "dev" / f"{lang}_{i:03d}.flac"
            voice = f"{make_corpus.LANGUAGES[lang]}+{make_corpus.DEV_VARIANT}"
            make_corpus.synthesize(text, voice, path, speed=speed, pitch=pitch)
            dev.append({"path": str(path), "language": lang, "voice": voice, "text": text})
    train_texts = {r["text"] for r in train}
    assert not any(t in train_texts for t in {d["text"] for d in dev}), "dev text leaked into train"
    assert {d["voice"] for d in dev}.isdisjoint({r["voice"] for r in train}), "dev voice seen in train"
    return train, dev


def write_cache(rows: list[dict], path: Path, shard_frames: int = 16384):
    from gemma_rvq.audio import decode_audio, prepare_waveform
    from gemma_rvq.training import EmbeddingCacheWriter, finalize_cache

    writer = EmbeddingCacheWriter(path, N_MELS * STACK, shard_frames=shard_frames,
                                  metadata={"features": f"logmel{N_MELS}x{STACK}"})
    for i, row in enumerate(rows):
        wave, sr = decode_audio(row["path"])
        wave = prepare_waveform(wave, sr, SR)
        writer.add(os.path.basename(row["path"]), i, logmel_stack(wave), seconds=len(wave) / SR,
                   extra={"language": row["language"]})
    writer.close()
    return finalize_cache(path)


_RAM_SCRIPT = """
import importlib.util, resource, sys, time, numpy as np
spec = importlib.util.spec_from_file_location("rvq_cache", sys.argv[3])
mod = sys.modules["rvq_cache"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
path, n_utts = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
w = mod.EmbeddingCacheWriter(path, 1024, shard_frames=32768)
for i in range(n_utts):
    w.add(str(i), i, rng.standard_normal((250, 1024), dtype=np.float32))
w.close()
cache = mod.finalize_cache(path)
t0, n = time.perf_counter(), 0
for batch in mod.FrameStream(cache, 4096, seed=0, shuffle_shards=2).iter_epoch(0):
    n += batch.shape[0]
print(cache.num_frames, n, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure_stream_ram(workdir: Path, base_utterances: int = 400) -> dict:
    """Peak RSS of writing + streaming one epoch of a 1024-d cache, at 1x and 4x the data (subprocesses)."""
    import subprocess

    from gemma_rvq.training import cache as cache_module

    out = {}
    for scale in (1, 4):
        shutil.rmtree(workdir / f"ram{scale}", ignore_errors=True)  # a reused workdir: the writer would resume
        res = subprocess.run([sys.executable, "-c", _RAM_SCRIPT, str(workdir / f"ram{scale}"),
                              str(base_utterances * scale), cache_module.__file__],
                             capture_output=True, text=True, check=True)
        frames, streamed, seconds, rss_kb = res.stdout.split()
        out[scale] = {"frames": int(frames), "gigabytes_fp16": int(frames) * 1024 * 2 / 1e9,
                      "streamed_frames": int(streamed), "stream_seconds": float(seconds),
                      "peak_rss_mb": int(rss_kb) / 1024}
    return out


# ---------------------------------------------------------------------------------------------- systems


def evaluate_vqtorch(rvq, frames: torch.Tensor, chunk: int = 4096) -> dict:
    from gemma_rvq.metrics.functional import RVQStatsAccumulator

    acc = RVQStatsAccumulator(rvq.codebook_size, mean=frames.double().mean(0))
    rvq.eval()
    with torch.no_grad():
        for s in range(0, len(frames), chunk):
            x = frames[s: s + chunk]
            quantized, indices, _ = rvq(x[None])
            acc.update(prediction=quantized[0], target=x, codes=indices[0].t()[None])
    rvq.train()
    return acc.compute()


def train_vqtorch(name: str, kwargs: dict, train_cache, batch_size: int, budget_s: float, seed: int) -> dict:
    from vector_quantize_pytorch import ResidualVQ

    from gemma_rvq.training import FrameStream

    torch.manual_seed(seed)
    rvq = ResidualVQ(**kwargs)
    rvq.train()
    stream = iter(FrameStream(train_cache, batch_size, seed=seed))
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget_s:
        with torch.no_grad():
            rvq(next(stream)[None])
        steps += 1
    return {"name": name, "model": rvq, "steps": steps, "seconds": time.perf_counter() - t0}


def train_gemma_rvq(train_cache, dev_cache, out: Path, args) -> dict:
    from gemma_rvq import GemmaRVQConfig, GemmaRVQModel
    from gemma_rvq.training import RVQTrainer, RVQTrainingConfig

    torch.manual_seed(args.seed)
    # No LayerNorm/projection on log-mel features: a per-frame LayerNorm discards each frame's mean and
    # scale (loudness), which no linear read-out can restore (measured: dev FVU 0.37 at init with it vs
    # 0.10 without); vqtorch's ResidualVQ has no projection either, so this compares the quantizer training.
    model = GemmaRVQModel(GemmaRVQConfig(encoder_name_or_path=None, dim=N_MELS * STACK, use_projection=False,
                                         num_quantizers=args.levels, codebook_size=args.codes,
                                         ema_decay=args.ema_decay, dead_code_threshold=args.dead_code_threshold,
                                         balance_weight=args.balance_weight))
    cfg = RVQTrainingConfig(
        output_dir=str(out), seed=args.seed, batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, kmeans_init_frames=args.kmeans_frames, kmeans_iters=args.kmeans_iters,
        kmeans_seeding=args.kmeans_seeding,
        dead_code_restart_steps=args.restart_steps, dead_code_restart_until=1.0, restart_in_averaging_window=True,
        eval_steps=args.steps, save_steps=max(args.steps // 5, 1),
        average_last_n=3, log_with=None, disable_tqdm=True, make_plots=False, eval_max_frames=10**9,
    )
    t0 = time.perf_counter()
    result = RVQTrainer(model, cfg, train_cache, dev_cache).train()
    seconds = time.perf_counter() - t0
    from transformers import AutoModel

    return {"name": "gemma-rvq", "steps": result.steps, "seconds": seconds, "result": result,
            "models": {v: AutoModel.from_pretrained(out / v) for v in ("best", "averaged")}}


# ---------------------------------------------------------------------------------------------- report


def _mean_sd(values: list) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(values, dtype=np.float64)
    return a.mean(0), (a.std(0, ddof=1) if len(a) > 1 else np.zeros_like(a[0]))


def summarize(runs: list[dict], split: str) -> dict[str, dict]:
    """Mean and sd over seeds of every system's metrics on ``split``."""
    out: dict[str, dict] = {}
    for name in runs[0]["results"]:
        ms = [run["results"][name][split] for run in runs]
        out[name] = {"steps": float(np.mean([run["results"][name]["steps"] for run in runs]))}
        for key in ("mse", "nmse", "fvu", "cosine_similarity", "centred_cosine_similarity", "codebook_utilization",
                    "codebook_perplexity", "codebook_utilization_per_level", "codebook_perplexity_per_level"):
            out[name][key], out[name][key + "_sd"] = _mean_sd([m[key] for m in ms])
    return out


def row(name: str, m: dict) -> str:
    def f(key: str, digits: int) -> str:
        sd = float(m.get(key + "_sd", 0.0))
        return f"{float(m[key]):.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")

    return (f"| {name} | {f('mse', 4)} | {f('nmse', 4)} | {f('fvu', 4)} | {f('cosine_similarity', 4)} | "
            f"{f('centred_cosine_similarity', 4)} | {f('codebook_utilization', 3)} | {f('codebook_perplexity', 0)} |")


def per_level(name: str, m: dict) -> str:
    u = " ".join(f"{v:.3f}" for v in m["codebook_utilization_per_level"])
    p = " ".join(f"{v:.0f}" for v in m["codebook_perplexity_per_level"])
    return f"| {name} | {u} | {p} |"


def run_seed(seed: int, train_cache, dev_cache, train_eval: torch.Tensor, dev: torch.Tensor, work: Path,
             args) -> dict:
    """One seed: gemma-rvq (+ the no-balance ablation), then both vqtorch configurations in its time."""
    from gemma_rvq.training import evaluate_frames

    seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
    ours = train_gemma_rvq(train_cache, dev_cache, work / f"gemma-rvq-{seed}", seed_args)
    budget = ours["seconds"]
    print(f"seed {seed}: gemma-rvq {ours['steps']} steps in {budget:.0f} s (the budget)", flush=True)
    results: dict[str, dict] = {}
    for variant in ("best", "averaged"):
        model = ours["models"][variant]
        results[f"gemma-rvq ({variant})"] = {"train": evaluate_frames(model, train_eval, per_level=False),
                                             "dev": evaluate_frames(model, dev, per_level=False),
                                             "steps": ours["steps"], "seconds": budget}
    if args.ablate_balance and args.balance_weight > 0:
        plain = train_gemma_rvq(train_cache, dev_cache, work / f"gemma-rvq-plain-{seed}",
                                argparse.Namespace(**{**vars(seed_args), "balance_weight": 0.0}))
        results["gemma-rvq, balance_weight 0 (best)"] = {
            "train": evaluate_frames(plain["models"]["best"], train_eval, per_level=False),
            "dev": evaluate_frames(plain["models"]["best"], dev, per_level=False),
            "steps": plain["steps"], "seconds": plain["seconds"]}
    base = dict(dim=train_cache.dim, num_quantizers=args.levels, codebook_size=args.codes)
    for name, kwargs in (("vqtorch default", base),
                         ("vqtorch kmeans+dead", {**base, "kmeans_init": True, "kmeans_iters": 10,
                                                  "threshold_ema_dead_code": 2})):
        b = train_vqtorch(name, kwargs, train_cache, args.batch_size, budget, seed)
        results[name] = {"train": evaluate_vqtorch(b["model"], train_eval), "dev": evaluate_vqtorch(b["model"], dev),
                         "steps": b["steps"], "seconds": b["seconds"]}
    dev_fvu = {n: r["dev"]["fvu"] for n, r in results.items()}
    print(f"seed {seed}: dev FVU " + ", ".join(f"{n} {v:.4f}" for n, v in dev_fvu.items()), flush=True)
    return {"seed": seed, "budget_s": budget, "results": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller corpus and budget, one seed (~3 min)")
    parser.add_argument("--per-language", type=int, default=100, help="train clips per language (~4.5 s each)")
    parser.add_argument("--dev-variations", type=int, default=24, help="dev clips per language")
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=300, help="gemma-rvq steps (its time = the budget)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kmeans-frames", type=int, default=32768)
    parser.add_argument("--kmeans-iters", type=int, default=10)
    parser.add_argument("--kmeans-seeding", default="random", choices=("kmeans++", "random"))
    parser.add_argument("--restart-steps", type=int, default=1, help="dead-code restart every N steps")
    parser.add_argument("--ema-decay", type=float, default=0.95)
    parser.add_argument("--dead-code-threshold", type=float, default=2.0)
    parser.add_argument("--balance-weight", type=float, default=1.0, help="usage-balanced EMA (0 = off)")
    parser.add_argument("--ablate-balance", action="store_true",
                        help="also train gemma-rvq with balance_weight 0 (not timed against the baselines)")
    parser.add_argument("--train-eval-frames", type=int, default=20000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one full comparison per seed (model init, k-means, batch order); mean ± sd reported")
    parser.add_argument("--workdir", default=None, help="reuse the speech and caches already written here")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_language, args.dev_variations, args.steps, args.seeds = 40, 12, 150, args.seeds[:1]
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    from gemma_rvq.training import EmbeddingCache

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    ram = measure_stream_ram(work)
    for scale, r in ram.items():
        print(f"cache streaming RAM, {scale}x data: {r['frames']} frames x 1024 ({r['gigabytes_fp16']:.2f} GB fp16) "
              f"-> peak RSS {r['peak_rss_mb']:.0f} MB, one epoch streamed in {r['stream_seconds']:.1f} s", flush=True)
    t = time.perf_counter()
    if (work / "cache" / "dev" / "index.json").exists():
        train_cache, dev_cache = EmbeddingCache(work / "cache" / "train"), EmbeddingCache(work / "cache" / "dev")
        print(f"reusing the caches in {work / 'cache'}")
    else:
        train_rows, dev_rows = make_speech(work / "speech", args.per_language, args.dev_variations)
        train_cache = write_cache(train_rows, work / "cache" / "train")
        dev_cache = write_cache(dev_rows, work / "cache" / "dev")
    print(f"data: train {train_cache.seconds / 60:.1f} min, {train_cache.num_frames} frames; dev "
          f"{dev_cache.seconds / 60:.1f} min, {dev_cache.num_frames} frames (unseen texts + voice); D = "
          f"{train_cache.dim}; prepared in {time.perf_counter() - t:.0f} s", flush=True)
    train_eval = train_cache.sample_frames(args.train_eval_frames, seed=123)
    dev = dev_cache.sample_frames(None)

    runs = [run_seed(seed, train_cache, dev_cache, train_eval, dev, work, args) for seed in args.seeds]
    summary = {split: summarize(runs, split) for split in ("train", "dev")}
    header = ("| system | MSE | NMSE | FVU | cosine | centred cos | util | ppl |\n"
              "|---|---|---|---|---|---|---|---|")
    print(f"\nQ = {args.levels} levels x K = {args.codes} codes, D = {train_cache.dim}, batch {args.batch_size} "
          f"frames; seeds {args.seeds} (mean ± sd over seeds); budget per system = gemma-rvq's time, "
          f"{np.mean([r['budget_s'] for r in runs]):.0f} s on average")
    for split in ("train", "dev"):
        n_frames = len(train_eval) if split == "train" else len(dev)
        print(f"\n{split} ({'held-in sample' if split == 'train' else 'unseen texts and voice'}, {n_frames} frames)"
              f"\n{header}")
        for name, m in summary[split].items():
            print(row(f"{name}, {m['steps']:.0f} steps", m))
        print(f"\nper level ({split}, mean over seeds)\n| system | utilization per level | perplexity per level |"
              "\n|---|---|---|")
        for name, m in summary[split].items():
            print(per_level(name, m))
    best_vq = min(("vqtorch default", "vqtorch kmeans+dead"), key=lambda n: summary["dev"][n]["fvu"])
    ours_dev, theirs = summary["dev"]["gemma-rvq (best)"], summary["dev"][best_vq]

    def wins(key: str) -> list[int]:  # per level: in how many seeds gemma-rvq >= the best vqtorch config
        return [int(sum(run["results"]["gemma-rvq (best)"]["dev"][key][level] >= run["results"][best_vq]["dev"][key][level]
                        for run in runs)) for level in range(args.levels)]

    checks = {
        "dev FVU ratio (gemma-rvq / best vqtorch)": float(ours_dev["fvu"] / theirs["fvu"]),
        "dev cosine difference": float(ours_dev["cosine_similarity"] - theirs["cosine_similarity"]),
        "min train utilization per level (gemma-rvq, worst seed)": float(min(
            min(run["results"]["gemma-rvq (best)"]["train"]["codebook_utilization_per_level"]) for run in runs)),
        "dev utilization per level, mean difference (gemma-rvq - best vqtorch)": [
            round(float(v), 3) for v in ours_dev["codebook_utilization_per_level"]
            - theirs["codebook_utilization_per_level"]],
        "dev perplexity per level, mean difference (gemma-rvq - best vqtorch)": [
            round(float(v), 1) for v in ours_dev["codebook_perplexity_per_level"]
            - theirs["codebook_perplexity_per_level"]],
        f"seeds (of {len(runs)}) with gemma-rvq >= best vqtorch, dev utilization per level":
            wins("codebook_utilization_per_level"),
        f"seeds (of {len(runs)}) with gemma-rvq >= best vqtorch, dev perplexity per level":
            wins("codebook_perplexity_per_level"),
    }
    print(f"\nbest vqtorch configuration on dev FVU: {best_vq}")
    for key, value in checks.items():
        print(f"{key}: {round(value, 4) if isinstance(value, float) else value}")
    out = {"args": vars(args), "runs": runs, "summary": summary, "checks": checks, "best_vqtorch": best_vq,
           "ram": ram}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                              else str(o)))
    return out


if __name__ == "__main__":
    main()
