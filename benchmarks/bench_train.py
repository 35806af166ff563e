#!/usr/bin/env python
"""Stage-1 training quality: gemma-rvq's trainer vs vector-quantize-pytorch ``ResidualVQ``, same data, same time.

Data (espeak-ng speech synthesised at benchmark time with ``scripts/make_corpus.py``, 5 languages):

* **train**: the corpus generator's training clips (its train sentences, voices m1-m4, m7, f1-f4);
* **dev**: the corpus's dev sentences (never in train) by the held-out voice f5 at several speeds and
  pitches. Every choice is made here: gemma-rvq's settings (tuned on it in earlier sessions, see
  docs/benchmarks.md) and the baseline's tuning below;
* **test**: sentences written only for this benchmark (:data:`TEST_SENTENCES`, never in train or dev) by a
  third voice, m6, never in train or dev, at several speeds and pitches. Nothing is chosen on it: it is
  scored once per final run and reported.

Features: stacked log-mel frames (64 mel bands, 10 ms hop, 4 frames stacked -> D = 256 at 25 frames/s,
the frame rate of the Gemma 4 audio encoder), written to gemma-rvq embedding caches.

Systems (Q levels x K codes on D = 256, same frame stream, same batch size):

* ``gemma-rvq``: ``RVQTrainer``: k-means init of every level, EMA codebooks (decay 0.95) with usage-balanced
  statistics (``balance_weight`` 1.0), dead-code restarts every step from held-in residuals, ``best`` and
  ``averaged`` exports; no projection (``use_projection=False``, as ``ResidualVQ``). Its CPU time (init +
  training + evaluation + export) is the budget of every baseline run of the same seed.
* ``vqtorch default``: ``ResidualVQ(dim, num_quantizers, codebook_size)`` (EMA, decay 0.8).
* ``vqtorch kmeans+dead``: ``ResidualVQ(..., kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=2)``.
* ``vqtorch tuned``: the best ``ResidualVQ`` configuration on dev found by ``--tune``: a coordinate search
  (:data:`VQTORCH_GRID`, one setting at a time from ``kmeans+dead``: EMA decay, dead-code threshold, k-means
  iterations, then EMA vs learnable codebooks with vqtorch's in-place Adam optimiser at a few learning
  rates), each candidate trained on the tuning seed(s) with the CPU time of a gemma-rvq run of
  ``--tune-steps`` steps, selected by dev FVU. The same kind of budget gemma-rvq's own settings had: one
  setting at a time on dev, mostly in 150-step single-seed runs (docs/benchmarks.md).
* with ``--ablate-balance``, also gemma-rvq with ``balance_weight 0`` (reported, not a budget).

Every system is scored by :func:`gemma_rvq.evaluation.evaluate_frames` (one path; ``ResidualVQ`` through
:class:`ResidualVQCodec`, which is checked against ``ResidualVQ``'s own forward before every report) on a
held-in sample of the training frames, on dev and on test. Each final seed (``--seeds``) repeats the whole
comparison (model init, k-means, batch order); tables give mean ± sd over seeds, per level too, and the
checks count in how many seeds gemma-rvq is at least the best tuned baseline on each level of test.

Every run's scores are stored under ``<workdir>/results`` keyed by its settings: a rerun with the same
``--workdir`` reuses them (and the speech and caches), so an interrupted benchmark resumes where it stopped.

    # the full benchmark (docs/benchmarks.md): tuning on dev, then 5 seeds scored on dev and test
    python benchmarks/bench_train.py --workdir runs/bench_train --threads 1 --tune --seeds 0 1 2 3 4 \
        --baselines kmeans+dead --voice-attribution
    # a sweep of one gemma-rvq setting on dev (the tuning seeds), e.g. the EMA decay
    python benchmarks/bench_train.py --workdir runs/bench_train --sweep ema_decay=0.8,0.9,0.95,0.98
    python benchmarks/bench_train.py --quick        # one seed, smaller corpus and budget, no tuning
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

N_MELS, STACK, SR = 64, 4, 16000
SPLITS = ("train", "dev", "test")
TEST_VARIANT = "m6"  # espeak-ng voice variant of the test split: in neither the train nor the dev voices

# Sentences written for this benchmark's test split only (none occurs in scripts/make_corpus.py).
TEST_SENTENCES: dict[str, list[str]] = {
    "en": ["The old dog sleeps under the kitchen table.", "We will visit our grandmother next Sunday.",
           "Rain fell on the roof all afternoon.", "He forgot his umbrella at the bus stop."],
    "sw": ["Mbwa mzee analala chini ya meza ya jikoni.", "Tutamtembelea bibi yetu Jumapili ijayo.",
           "Mvua ilinyesha juu ya paa mchana wote.", "Alisahau mwavuli wake kwenye kituo cha basi."],
    "vi": ["Con chó già ngủ dưới gầm bàn bếp.", "Chúng tôi sẽ thăm bà vào chủ nhật tới.",
           "Mưa rơi trên mái nhà suốt buổi chiều.", "Anh ấy quên chiếc ô ở trạm xe buýt."],
    "es": ["El perro viejo duerme debajo de la mesa de la cocina.", "Visitaremos a nuestra abuela el próximo domingo.",
           "La lluvia cayó sobre el tejado toda la tarde.", "Él olvidó su paraguas en la parada del autobús."],
    "fr": ["Le vieux chien dort sous la table de la cuisine.", "Nous rendrons visite à notre grand-mère dimanche prochain.",
           "La pluie est tombée sur le toit tout l'après-midi.", "Il a oublié son parapluie à l'arrêt de bus."],
}

# The baseline's tuning space on dev: one coordinate at a time, in this order, from "kmeans+dead".
VQTORCH_START = {"decay": 0.8, "threshold_ema_dead_code": 2.0, "kmeans_iters": 10, "learnable_lr": 0.0}
VQTORCH_GRID = {
    "decay": [0.8, 0.9, 0.95, 0.99],
    "threshold_ema_dead_code": [0, 1, 2, 4],
    "kmeans_iters": [0, 10, 30],  # 0 = no k-means init (vqtorch's random init)
    "learnable_lr": [0.0, 1e-3, 1e-2],  # 0 = EMA codebooks; else learnable, in-place Adam at this lr
}
GEMMA_SWEEPABLE = ("ema_decay", "dead_code_threshold", "balance_weight", "kmeans_iters", "kmeans_frames",
                   "kmeans_seeding", "restart_steps", "lr")


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


def _spoken_variations(folder: Path, sentences: dict[str, list[str]], variant: str, n: int, seed: int,
                       languages: list[str]) -> list[dict]:
    """``n`` clips per language of ``sentences`` (singly and as pairs) by ``variant`` at seeded speeds/pitches."""
    import make_corpus

    rows = []
    rng = np.random.default_rng(seed)
    for lang in languages:
        texts = sentences[lang]
        texts = [*texts, " ".join(texts[:2]), " ".join(reversed(texts[-2:]))]
        for i in range(n):
            text = texts[i % len(texts)]
            speed, pitch = int(rng.integers(150, 205)), int(rng.integers(30, 75))
            path = folder / f"{lang}_{i:03d}.flac"
            voice = f"{make_corpus.LANGUAGES[lang]}+{variant}"
            make_corpus.synthesize(text, voice, path, speed=speed, pitch=pitch)
            rows.append({"path": str(path), "language": lang, "voice": voice, "text": text})
    return rows


def make_speech(workdir: Path, per_language: int, dev_variations: int, test_variations: int,
                languages: list[str] | None = None) -> dict[str, list[dict]]:
    """Synthesise the train, dev and test clips; returns their rows (with absolute ``path``) per split.

    Asserts the split design: dev and test texts never occur in train, test texts never in dev, and the
    three splits' voices are disjoint.
    """
    import make_corpus

    languages = languages or list(make_corpus.LANGUAGES)
    rows = make_corpus.generate_corpus(workdir / "train", per_language, languages=languages, instructions=False,
                                       progress=False)
    train = [{**r, "path": str(workdir / "train" / r["file"])} for r in rows if r["split"] == "train"]
    dev_sentences = {lang: make_corpus.SENTENCES[lang][-make_corpus.N_DEV:] for lang in languages}
    dev = _spoken_variations(workdir / "dev", dev_sentences, make_corpus.DEV_VARIANT, dev_variations, 1, languages)
    test = _spoken_variations(workdir / "test", TEST_SENTENCES, TEST_VARIANT, test_variations, 2, languages)
    words = {split: {r["text"] for r in rs} for split, rs in (("train", train), ("dev", dev), ("test", test))}
    all_corpus_text = {t for s in make_corpus.SENTENCES.values() for t in s}
    assert not any(t in words["train"] for t in words["dev"] | words["test"]), "dev/test text leaked into train"
    assert not any(s in all_corpus_text for s in (t for ts in TEST_SENTENCES.values() for t in ts)), \
        "a test sentence is also a corpus sentence"
    voices = {split: {r["voice"] for r in rs} for split, rs in (("train", train), ("dev", dev), ("test", test))}
    assert voices["train"].isdisjoint(voices["dev"] | voices["test"]) and voices["dev"].isdisjoint(voices["test"]), \
        f"voices overlap between splits: {voices}"
    return {"train": train, "dev": dev, "test": test}


def write_cache(rows: list[dict], path: Path, shard_frames: int = 16384):
    from gemma_rvq.audio import decode_audio, prepare_waveform
    from gemma_rvq.training import EmbeddingCacheWriter, finalize_cache

    writer = EmbeddingCacheWriter(path, N_MELS * STACK, shard_frames=shard_frames,
                                  metadata={"features": f"logmel{N_MELS}x{STACK}"})
    for i, row in enumerate(rows):
        wave, sr = decode_audio(row["path"])
        wave = prepare_waveform(wave, sr, SR)
        writer.add(os.path.basename(row["path"]), i, logmel_stack(wave), seconds=len(wave) / SR,
                   extra={"language": row["language"], "voice": row["voice"]})
    writer.close()
    return finalize_cache(path)


def prepare_caches(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The three caches (built once per workdir; reused when complete)."""
    from gemma_rvq.training import EmbeddingCache

    root = work / "cache"
    if all((root / s / "index.json").exists() for s in SPLITS):
        print(f"reusing the caches in {root}")
        return {s: EmbeddingCache(root / s) for s in SPLITS}
    rows = make_speech(work / "speech", args.per_language, args.dev_variations, args.test_variations,
                       args.languages)
    return {s: write_cache(rows[s], root / s) for s in SPLITS}


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
        shutil.rmtree(workdir / f"ram{scale}", ignore_errors=True)
        frames, streamed, seconds, rss_kb = res.stdout.split()
        out[scale] = {"frames": int(frames), "gigabytes_fp16": int(frames) * 1024 * 2 / 1e9,
                      "streamed_frames": int(streamed), "stream_seconds": float(seconds),
                      "peak_rss_mb": int(rss_kb) / 1024}
    return out


# ---------------------------------------------------------------------------------------------- scoring


class ResidualVQCodec:
    """vector-quantize-pytorch ``ResidualVQ`` as a :class:`gemma_rvq.evaluation.FrameCodec`.

    ``encode_frames``: ``ResidualVQ.forward`` in eval mode (its own nearest-code search) -> indices ``[n, Q]``;
    ``decode_frames``: ``get_output_from_indices`` with the levels beyond k marked -1 (the library's own
    convention for dropped levels: they contribute zero).
    """

    def __init__(self, rvq: torch.nn.Module) -> None:
        self.rvq = rvq
        self.num_quantizers = int(rvq.num_quantizers)
        self.codebook_size = int(rvq.codebook_size)

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        self.rvq.eval()
        _, indices, _ = self.rvq(frames[None])
        return indices[0].long()  # [n, Q]

    @torch.no_grad()
    def decode_frames(self, codes: torch.Tensor) -> torch.Tensor:
        self.rvq.eval()
        missing = self.num_quantizers - codes.shape[1]
        padded = torch.nn.functional.pad(codes, (0, missing), value=-1) if missing else codes
        return self.rvq.get_output_from_indices(padded[None])[0]


@torch.no_grad()
def check_scoring_path(system: Any, frames: torch.Tensor) -> float:
    """The codec that :func:`evaluate_frames` sees must reproduce the system's own output: for
    ``ResidualVQ``, its eval-mode forward (quantized output and indices); for gemma-rvq,
    ``model.quantize``. Returns the largest absolute difference of the reconstructions (raises if the
    codes differ or the difference exceeds float32 rounding)."""
    from gemma_rvq.evaluation import as_frame_codec

    codec = as_frame_codec(system)
    codes = codec.encode_frames(frames)
    recon = codec.decode_frames(codes)
    if isinstance(system, ResidualVQCodec):
        system.rvq.eval()
        own, own_codes, _ = system.rvq(frames[None])
        own, own_codes = own[0], own_codes[0]
    else:
        out = codec.model.quantize(frames[None])
        own, own_codes = out.quantized[0], out.audio_codes[0].t()
    if not torch.equal(codes.cpu(), own_codes.long().cpu()):
        raise AssertionError("the scoring codec's codes differ from the system's own forward")
    diff = float((recon.float() - own.float()).abs().max())
    scale = float(own.abs().max())
    if diff > 1e-5 * max(1.0, scale):
        raise AssertionError(f"the scoring codec's reconstruction differs from the system's own by {diff}")
    return diff


def score(system: Any, frames: dict[str, torch.Tensor], extra: dict | None = None) -> dict:
    """:func:`evaluate_frames` on every split (JSON-ready: code counts dropped)."""
    from gemma_rvq.evaluation import evaluate_frames

    out = {}
    for split, x in frames.items():
        m = evaluate_frames(system, x)
        m.pop("code_counts")
        out[split] = m
    return {**out, **(extra or {})}


# ---------------------------------------------------------------------------------------------- systems


def vqtorch_kwargs(dim: int, levels: int, codes: int, config: dict) -> dict:
    """``ResidualVQ`` keyword arguments of a tuning configuration (see :data:`VQTORCH_GRID`)."""
    from functools import partial

    kw: dict[str, Any] = {"dim": dim, "num_quantizers": levels, "codebook_size": codes}
    if config.get("default"):
        return kw
    kw["decay"] = config["decay"]
    kw["threshold_ema_dead_code"] = config["threshold_ema_dead_code"]
    if config["kmeans_iters"] > 0:
        kw.update(kmeans_init=True, kmeans_iters=config["kmeans_iters"])
    if config["learnable_lr"] > 0:
        kw.update(learnable_codebook=True, ema_update=False,
                  in_place_codebook_optimizer=partial(torch.optim.Adam, lr=config["learnable_lr"]))
    return kw


def train_vqtorch(config: dict, train_cache, args: argparse.Namespace, budget_s: float, seed: int) -> dict:
    """Train ``ResidualVQ`` on the training stream until ``budget_s`` seconds of CPU time are spent (or for
    exactly ``--baseline-steps`` steps, for smoke tests)."""
    from vector_quantize_pytorch import ResidualVQ

    from gemma_rvq.training import FrameStream

    torch.manual_seed(seed)
    rvq = ResidualVQ(**vqtorch_kwargs(train_cache.dim, args.levels, args.codes, config))
    rvq.train()
    learnable = config.get("learnable_lr", 0) > 0
    stream = iter(FrameStream(train_cache, args.batch_size, seed=seed))
    c0, t0, steps = time.process_time(), time.perf_counter(), 0
    while (steps < args.baseline_steps if args.baseline_steps else time.process_time() - c0 < budget_s):
        batch = next(stream)[None]
        if learnable:  # the in-place optimiser needs gradients
            rvq(batch)
        else:
            with torch.no_grad():
                rvq(batch)
        steps += 1
    return {"model": ResidualVQCodec(rvq), "steps": steps, "cpu_seconds": time.process_time() - c0,
            "seconds": time.perf_counter() - t0}


def train_gemma_rvq(train_cache, dev_cache, out: Path, args: argparse.Namespace, seed: int,
                    overrides: dict | None = None) -> dict:
    from transformers import AutoModel

    from gemma_rvq import GemmaRVQConfig, GemmaRVQModel
    from gemma_rvq.training import RVQTrainer, RVQTrainingConfig

    s = {**gemma_settings(args), **(overrides or {})}
    torch.manual_seed(seed)
    # No LayerNorm/projection on log-mel features: a per-frame LayerNorm discards each frame's mean and
    # scale (loudness), which no linear read-out can restore (measured: dev FVU 0.37 at init with it vs
    # 0.10 without); vqtorch's ResidualVQ has no projection either, so this compares the quantizer training.
    model = GemmaRVQModel(GemmaRVQConfig(encoder_name_or_path=None, dim=train_cache.dim, use_projection=False,
                                         num_quantizers=args.levels, codebook_size=args.codes,
                                         ema_decay=s["ema_decay"], dead_code_threshold=s["dead_code_threshold"],
                                         balance_weight=s["balance_weight"]))
    shutil.rmtree(out, ignore_errors=True)
    cfg = RVQTrainingConfig(
        output_dir=str(out), seed=seed, batch_size=args.batch_size, max_steps=s["steps"],
        learning_rate=s["lr"], kmeans_init_frames=s["kmeans_frames"], kmeans_iters=s["kmeans_iters"],
        kmeans_seeding=s["kmeans_seeding"],
        dead_code_restart_steps=s["restart_steps"], dead_code_restart_until=1.0, restart_in_averaging_window=True,
        eval_steps=s["steps"], save_steps=max(s["steps"] // 5, 1),
        average_last_n=3, log_with=None, disable_tqdm=True, make_plots=False, eval_max_frames=10**9,
    )
    c0, t0 = time.process_time(), time.perf_counter()
    result = RVQTrainer(model, cfg, train_cache, dev_cache).train()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    models = {v: AutoModel.from_pretrained(out / v) for v in ("best", "averaged")}
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"steps": result.steps, "cpu_seconds": cpu, "seconds": wall, "models": models}


def gemma_settings(args: argparse.Namespace) -> dict:
    return {"ema_decay": args.ema_decay, "dead_code_threshold": args.dead_code_threshold,
            "balance_weight": args.balance_weight, "kmeans_iters": args.kmeans_iters,
            "kmeans_frames": args.kmeans_frames, "kmeans_seeding": args.kmeans_seeding,
            "restart_steps": args.restart_steps, "lr": args.lr, "steps": args.steps}


# ---------------------------------------------------------------------------------------------- runs


class Runs:
    """Scores of finished runs on disk, keyed by everything that decides them: resumable benchmarks."""

    def __init__(self, folder: Path, common: dict) -> None:
        self.folder = folder
        self.common = common
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, seed: int, settings: dict) -> Path:
        key = json.dumps({"common": self.common, "settings": settings, "seed": seed}, sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        return self.folder / f"{name.replace(' ', '_')}-seed{seed}-{digest}.json"

    def get(self, name: str, seed: int, settings: dict, run: Callable[[], dict]) -> dict:
        path = self._path(name, seed, settings)
        if path.exists():
            return json.loads(path.read_text())
        result = {"name": name, "seed": seed, "settings": settings, **run()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=_jsonable))
        os.replace(tmp, path)
        return result


def _jsonable(o: Any) -> Any:
    return o.tolist() if hasattr(o, "tolist") else str(o)


class Bench:
    """The caches, the evaluation frames and the stored runs of one benchmark invocation."""

    def __init__(self, work: Path, caches: dict, args: argparse.Namespace) -> None:
        self.work, self.caches, self.args = work, caches, args
        self.frames = {"train": caches["train"].sample_frames(args.train_eval_frames, seed=123),
                       "dev": caches["dev"].sample_frames(None), "test": caches["test"].sample_frames(None)}
        common = {"levels": args.levels, "codes": args.codes, "batch_size": args.batch_size,
                  "data": {s: [caches[s].num_frames, caches[s].num_utterances] for s in SPLITS},
                  "train_eval_frames": args.train_eval_frames}
        self.runs = Runs(work / "results", common)
        self.checked: list[float] = []

    def gemma(self, seed: int, overrides: dict | None = None) -> dict:
        """gemma-rvq trained with the command line's settings (+ ``overrides``) on ``seed``, scored."""
        settings = {**gemma_settings(self.args), **(overrides or {})}

        def run() -> dict:
            out = train_gemma_rvq(self.caches["train"], self.caches["dev"], self.work / "runs" / f"gemma-rvq-{seed}",
                                  self.args, seed, overrides)
            self.checked.append(check_scoring_path(out["models"]["best"], self.frames["dev"][:2048]))
            scores = {v: score(m, self.frames) for v, m in out["models"].items()}
            scores["voices"] = voice_attribution(out["models"]["best"], self.caches["train"], self.frames["dev"])
            return {"steps": out["steps"], "cpu_seconds": out["cpu_seconds"], "seconds": out["seconds"],
                    "scores": scores}

        return self.runs.get("gemma-rvq", seed, settings, run)

    def vqtorch(self, seed: int, config: dict, budget: float) -> dict:
        """``ResidualVQ`` of tuning configuration ``config`` trained for ``budget`` CPU seconds, scored."""

        def run() -> dict:
            out = train_vqtorch(config, self.caches["train"], self.args, budget, seed)
            self.checked.append(check_scoring_path(out["model"], self.frames["dev"][:2048]))
            scores = {"final": score(out["model"], self.frames)}
            scores["voices"] = voice_attribution(out["model"], self.caches["train"], self.frames["dev"])
            return {"steps": out["steps"], "cpu_seconds": out["cpu_seconds"], "seconds": out["seconds"],
                    "scores": scores}

        budget_key = {"steps": self.args.baseline_steps} if self.args.baseline_steps else {"budget": round(budget, 3)}
        return self.runs.get("vqtorch", seed, {"config": config, **budget_key}, run)


@torch.no_grad()
def voice_attribution(system: Any, train_cache, dev: torch.Tensor, level: int = 0) -> dict:
    """Where the level-``level`` codes that dev never uses come from: per training voice, its mean share
    of the training hits of the dev-unused codes vs the dev-used ones."""
    from gemma_rvq.evaluation import as_frame_codec

    codec = as_frame_codec(system)
    dev_used = torch.zeros(codec.codebook_size, dtype=torch.bool)
    for x in dev.split(8192):
        dev_used[codec.encode_frames(x)[:, level].cpu()] = True
    hits: dict[str, torch.Tensor] = {}
    for record, emb in train_cache.utterances():
        voice = record.get("voice", "?").split("+")[-1]  # the espeak-ng variant: one speaker over languages
        codes = codec.encode_frames(torch.from_numpy(np.asarray(emb, np.float32)))[:, level].cpu()
        hits[voice] = hits.get(voice, torch.zeros(codec.codebook_size)) + torch.bincount(
            codes, minlength=codec.codebook_size).float()
    total = sum(hits.values())
    share = {v: h / total.clamp(min=1) for v, h in hits.items()}  # per code: fraction of its hits by voice v
    trained = total > 0
    unused, used = trained & ~dev_used, trained & dev_used
    return {"level": level, "dev_unused_codes": int(unused.sum()), "dev_used_codes": int(used.sum()),
            "share_of_unused": {v: float(s[unused].mean()) if unused.any() else 0.0 for v, s in share.items()},
            "share_of_used": {v: float(s[used].mean()) if used.any() else 0.0 for v, s in share.items()}}


# ---------------------------------------------------------------------------------------------- tuning


def tune_vqtorch(bench: Bench) -> tuple[dict, list[dict]]:
    """Coordinate search of ``ResidualVQ`` settings on dev (tuning seeds; each run gets gemma-rvq's budget
    of the same seed). Returns (best configuration, every evaluated configuration with its dev means)."""
    args = bench.args
    budgets = {s: bench.gemma(s, {"steps": args.tune_steps or args.steps})["cpu_seconds"] for s in args.tune_seeds}
    seen: dict[str, dict] = {}

    def evaluate(config: dict) -> dict:
        key = json.dumps(config, sort_keys=True)
        if key not in seen:
            runs = [bench.vqtorch(s, config, budgets[s]) for s in args.tune_seeds]
            dev = [r["scores"]["final"]["dev"] for r in runs]
            seen[key] = {"config": config, "dev_fvu": float(np.mean([d["fvu"] for d in dev])),
                         "dev_utilization": float(np.mean([d["codebook_utilization"] for d in dev])),
                         "dev_perplexity": float(np.mean([d["codebook_perplexity"] for d in dev])),
                         "steps": float(np.mean([r["steps"] for r in runs]))}
            print(f"  tune {_config_name(config)}: dev FVU {seen[key]['dev_fvu']:.4f}, util "
                  f"{seen[key]['dev_utilization']:.3f}, ppl {seen[key]['dev_perplexity']:.0f}", flush=True)
        return seen[key]

    best = dict(VQTORCH_START)
    grid = args.tune_grid
    for key, values in grid.items():
        candidates = [_normalize({**best, key: v}) for v in values]
        best = min(candidates, key=lambda c: evaluate(c)["dev_fvu"])
    return best, list(seen.values())


def _normalize(config: dict) -> dict:
    """One spelling per configuration (``0`` and ``0.0`` are the same learning rate)."""
    return {k: int(v) if k == "kmeans_iters" else float(v) for k, v in config.items()}


def _config_name(config: dict) -> str:
    if config.get("default"):
        return "defaults"
    codebook = f"learnable lr {config['learnable_lr']:g}" if config["learnable_lr"] > 0 else f"EMA decay {config['decay']:g}"
    kmeans = f"k-means {config['kmeans_iters']} it" if config["kmeans_iters"] > 0 else "random init"
    return f"{codebook}, dead-code threshold {config['threshold_ema_dead_code']:g}, {kmeans}"


def sweep_gemma(bench: Bench, key: str, values: list[Any]) -> list[dict]:
    """gemma-rvq on dev for each value of one setting (tuning seeds): the sweeps behind its settings."""
    rows = []
    for value in values:
        runs = [bench.gemma(s, {key: value, "steps": bench.args.tune_steps or bench.args.steps})
                for s in bench.args.tune_seeds]
        dev = [r["scores"]["best"]["dev"] for r in runs]
        rows.append({key: value, "dev_fvu": float(np.mean([d["fvu"] for d in dev])),
                     "dev_utilization": float(np.mean([d["codebook_utilization"] for d in dev])),
                     "dev_utilization_per_level": np.mean([d["codebook_utilization_per_level"] for d in dev], 0),
                     "dev_perplexity": float(np.mean([d["codebook_perplexity"] for d in dev]))})
    return rows


# ---------------------------------------------------------------------------------------------- report


def _mean_sd(values: list) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(values, dtype=np.float64)
    return a.mean(0), (a.std(0, ddof=1) if len(a) > 1 else np.zeros_like(a[0]))


METRIC_KEYS = ("mse", "nmse", "fvu", "cosine_similarity", "centred_cosine_similarity", "codebook_utilization",
               "codebook_perplexity", "codebook_utilization_per_level", "codebook_perplexity_per_level")


def summarize(per_seed: dict[str, list[dict]], split: str) -> dict[str, dict]:
    """Mean and sd over seeds of every system's metrics on ``split``."""
    out: dict[str, dict] = {}
    for name, runs in per_seed.items():
        ms = [r[split] for r in runs]
        out[name] = {"steps": float(np.mean([r["steps"] for r in runs]))}
        for key in METRIC_KEYS:
            out[name][key], out[name][key + "_sd"] = _mean_sd([m[key] for m in ms])
    return out


def row(name: str, m: dict) -> str:
    def f(key: str, digits: int) -> str:
        sd = float(m.get(key + "_sd", 0.0))
        return f"{float(m[key]):.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")

    return (f"| {name} | {m['steps']:.0f} | {f('mse', 4)} | {f('nmse', 4)} | {f('fvu', 4)} | "
            f"{f('cosine_similarity', 4)} | {f('centred_cosine_similarity', 4)} | {f('codebook_utilization', 3)} | "
            f"{f('codebook_perplexity', 0)} |")


def per_level_rows(name: str, m: dict) -> list[str]:
    u = " ".join(f"{v:.3f}" for v in m["codebook_utilization_per_level"])
    p = " ".join(f"{v:.0f}" for v in m["codebook_perplexity_per_level"])
    us = " ".join(f"{v:.3f}" for v in m["codebook_utilization_per_level_sd"])
    ps = " ".join(f"{v:.0f}" for v in m["codebook_perplexity_per_level_sd"])
    return [f"| {name} | {u} | {p} |", f"| sd over seeds, {name} | {us} | {ps} |"]


def final_runs(bench: Bench, tuned: dict | None) -> dict[str, list[dict]]:
    """Every system on every final seed: ``{system: [{"steps", "train", "dev", "test"} per seed]}``."""
    args = bench.args
    systems: dict[str, list[dict]] = {}

    def add(name: str, steps: int, scores: dict) -> None:
        systems.setdefault(name, []).append({"steps": steps, **scores})

    fixed = {"default": ("vqtorch default", {"default": True}), "kmeans+dead": ("vqtorch kmeans+dead", VQTORCH_START)}
    baselines = {fixed[b][0]: dict(fixed[b][1]) for b in args.baselines}
    if tuned is not None and tuned not in baselines.values():
        baselines["vqtorch tuned"] = tuned
    for seed in args.seeds:
        ours = bench.gemma(seed)
        budget = ours["cpu_seconds"]
        print(f"seed {seed}: gemma-rvq {ours['steps']} steps in {budget:.0f} CPU s ({ours['seconds']:.0f} s wall): "
              "the budget", flush=True)
        add("gemma-rvq (best)", ours["steps"], ours["scores"]["best"])
        add("gemma-rvq (averaged)", ours["steps"], ours["scores"]["averaged"])
        if args.ablate_balance and args.balance_weight > 0:
            plain = bench.gemma(seed, {"balance_weight": 0.0})
            add("gemma-rvq, balance_weight 0 (best)", plain["steps"], plain["scores"]["best"])
        for name, config in baselines.items():
            b = bench.vqtorch(seed, config, budget)
            add(name, b["steps"], b["scores"]["final"])
        fvu = {n: r[-1]["test"]["fvu"] for n, r in systems.items()}
        print(f"seed {seed}: test FVU " + ", ".join(f"{n} {v:.4f}" for n, v in fvu.items()), flush=True)
    return systems


def report(bench: Bench, systems: dict[str, list[dict]], tuned_name: str | None) -> dict:
    args = bench.args
    summary = {split: summarize(systems, split) for split in SPLITS}
    header = ("| system | steps | MSE | NMSE | FVU | cosine | centred cos | util | ppl |\n"
              "|---|---|---|---|---|---|---|---|---|")
    describe = {"train": "held-in sample", "dev": "unseen texts, voice f5; every choice made here",
                "test": f"unseen texts and voice {TEST_VARIANT}; never used for any choice"}
    print(f"\nQ = {args.levels} levels x K = {args.codes} codes, D = {bench.caches['train'].dim}, batch "
          f"{args.batch_size} frames; seeds {args.seeds} (mean ± sd over seeds); budget per baseline run = "
          f"gemma-rvq's CPU time on the same seed")
    for split in ("test", "dev", "train"):
        print(f"\n{split} ({describe[split]}, {len(bench.frames[split])} frames)\n{header}")
        for name, m in summary[split].items():
            print(row(name, m))
        print(f"\nper level ({split}, mean over seeds, then sd)\n| system | utilization per level | "
              "perplexity per level |\n|---|---|---|")
        for name, m in summary[split].items():
            print("\n".join(per_level_rows(name, m)))
    baselines = [n for n in systems if n.startswith("vqtorch")]
    best_vq = tuned_name if tuned_name in systems else min(baselines, key=lambda n: summary["dev"][n]["fvu"])
    ours_name = "gemma-rvq (best)"

    def wins(split: str, key: str) -> list[int]:  # per level: in how many seeds gemma-rvq >= the baseline
        return [int(sum(a[split][key][lv] >= b[split][key][lv] for a, b in zip(systems[ours_name], systems[best_vq])))
                for lv in range(args.levels)]

    checks: dict[str, Any] = {"baseline compared": best_vq}
    for split in ("test", "dev"):
        ours, theirs = summary[split][ours_name], summary[split][best_vq]
        lower = sum(a[split]["fvu"] < b[split]["fvu"] for a, b in zip(systems[ours_name], systems[best_vq]))
        checks[f"{split} FVU ratio (gemma-rvq / {best_vq})"] = round(float(ours["fvu"] / theirs["fvu"]), 4)
        checks[f"{split} FVU lower than {best_vq} in seeds"] = f"{lower} of {len(args.seeds)}"
        checks[f"{split} cosine difference"] = round(float(ours["cosine_similarity"] - theirs["cosine_similarity"]), 4)
        checks[f"{split} centred cosine difference"] = round(
            float(ours["centred_cosine_similarity"] - theirs["centred_cosine_similarity"]), 4)
        checks[f"{split} utilization per level, mean difference"] = [
            round(float(v), 3) for v in ours["codebook_utilization_per_level"] - theirs["codebook_utilization_per_level"]]
        checks[f"{split} perplexity per level, mean difference"] = [
            round(float(v), 1) for v in ours["codebook_perplexity_per_level"] - theirs["codebook_perplexity_per_level"]]
        checks[f"{split}: seeds (of {len(args.seeds)}) with gemma-rvq >= {best_vq}, utilization per level"] = wins(
            split, "codebook_utilization_per_level")
        checks[f"{split}: seeds (of {len(args.seeds)}) with gemma-rvq >= {best_vq}, perplexity per level"] = wins(
            split, "codebook_perplexity_per_level")
    checks["min train utilization per level (gemma-rvq, worst seed)"] = round(float(min(
        min(r["train"]["codebook_utilization_per_level"]) for r in systems[ours_name])), 4)
    print()
    for key, value in checks.items():
        print(f"{key}: {value}")
    return {"summary": summary, "checks": checks}


def print_voice_attribution(bench: Bench, seed: int) -> None:
    """Level-1 codes that dev never uses, and which training voices they were fitted to (one seed)."""
    runs = {"gemma-rvq (best)": bench.gemma(seed)["scores"]["voices"]}
    print(f"\nlevel-1 codes unused on dev, seed {seed}: mean share of their training hits per voice (used codes "
          "in brackets)")
    for name, v in runs.items():
        shares = ", ".join(f"{voice} {v['share_of_unused'][voice]:.0%} ({v['share_of_used'][voice]:.0%})"
                           for voice in sorted(v["share_of_unused"]))
        print(f"  {name}: {v['dev_unused_codes']} unused of {v['dev_unused_codes'] + v['dev_used_codes']}: {shares}")


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    key, _, values = text.partition("=")
    if key not in GEMMA_SWEEPABLE or not values:
        raise SystemExit(f"--sweep takes KEY=V1,V2,... with KEY one of {GEMMA_SWEEPABLE}, got {text!r}")
    parsed: list[Any] = []
    for v in values.split(","):
        try:
            parsed.append(int(v) if v.isdigit() else float(v))
        except ValueError:
            parsed.append(v)
    return key, parsed


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller corpus and budget, one seed, no tuning")
    parser.add_argument("--per-language", type=int, default=40, help="train clips per language (~4.5 s each)")
    parser.add_argument("--dev-variations", type=int, default=12, help="dev clips per language")
    parser.add_argument("--test-variations", type=int, default=12, help="test clips per language")
    parser.add_argument("--languages", nargs="+", default=None, help="subset of the corpus languages")
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=300, help="gemma-rvq steps (its CPU time = the budget)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kmeans-frames", type=int, default=32768)
    parser.add_argument("--kmeans-iters", type=int, default=10)
    parser.add_argument("--kmeans-seeding", default="random", choices=("kmeans++", "random"))
    parser.add_argument("--restart-steps", type=int, default=1, help="dead-code restart every N steps")
    parser.add_argument("--ema-decay", type=float, default=0.95)
    parser.add_argument("--dead-code-threshold", type=float, default=2.0)
    parser.add_argument("--balance-weight", type=float, default=1.0, help="usage-balanced EMA (0 = off)")
    parser.add_argument("--ablate-balance", action="store_true",
                        help="also train gemma-rvq with balance_weight 0 (not a budget)")
    parser.add_argument("--train-eval-frames", type=int, default=20000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="final seeds: one full comparison each, scored on train, dev and test")
    parser.add_argument("--tune", action="store_true", help="tune ResidualVQ on dev first (see VQTORCH_GRID)")
    parser.add_argument("--tune-seeds", type=int, nargs="+", default=[100],
                        help="seeds of the tuning runs (distinct from the final seeds)")
    parser.add_argument("--tune-steps", type=int, default=150,
                        help="gemma-rvq steps of the tuning runs, whose CPU time is each candidate's budget "
                             "(default: --steps); also the steps of --sweep runs")
    parser.add_argument("--baselines", nargs="*", default=["default", "kmeans+dead"],
                        choices=["default", "kmeans+dead"],
                        help="fixed ResidualVQ configurations run beside the tuned one on the final seeds")
    parser.add_argument("--tune-grid", type=json.loads, default=VQTORCH_GRID,
                        help="JSON {setting: [values]} searched one coordinate at a time (default: VQTORCH_GRID)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help=f"dev sweep of one gemma-rvq setting on the tuning seeds; KEY in {GEMMA_SWEEPABLE}")
    parser.add_argument("--voice-attribution", action="store_true",
                        help="print which training voices the level-1 codes unused on dev were fitted to")
    parser.add_argument("--skip-ram", action="store_true", help="skip the cache-memory measurement")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: all CPUs; 1 wastes less CPU time on a busy shared machine)")
    parser.add_argument("--baseline-steps", type=int, default=0,
                        help="train each baseline for this many steps instead of gemma-rvq's time (smoke tests)")
    parser.add_argument("--workdir", default=None, help="speech, caches and run scores (reused: resumable)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.quick:
        args.per_language, args.dev_variations, args.test_variations, args.steps = 40, 12, 12, 150
        args.seeds = args.seeds[:1]
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}; torch threads {torch.get_num_threads()}; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    out: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}}
    if not args.skip_ram:
        ram = out["ram"] = measure_stream_ram(work)
        for scale, r in ram.items():
            print(f"cache streaming RAM, {scale}x data: {r['frames']} frames x 1024 ({r['gigabytes_fp16']:.2f} GB "
                  f"fp16) -> peak RSS {r['peak_rss_mb']:.0f} MB, one epoch streamed in {r['stream_seconds']:.1f} s",
                  flush=True)
    t = time.perf_counter()
    caches = prepare_caches(work, args)
    print("data: " + "; ".join(f"{s} {caches[s].seconds / 60:.1f} min, {caches[s].num_frames} frames, "
                               f"{caches[s].num_utterances} clips" for s in SPLITS)
          + f"; D = {caches['train'].dim}; prepared in {time.perf_counter() - t:.0f} s", flush=True)
    bench = Bench(work, caches, args)

    for text in args.sweep:
        key, values = parse_sweep(text)
        rows = out.setdefault("sweeps", {})[key] = sweep_gemma(bench, key, values)
        print(f"\ngemma-rvq sweep of {key} on dev (tuning seeds {args.tune_seeds}, mean)\n| {key} | dev FVU | dev util | "
              "dev util per level | dev ppl |\n|---|---|---|---|---|")
        for r in rows:
            levels = " ".join(f"{v:.3f}" for v in r["dev_utilization_per_level"])
            print(f"| {r[key]} | {r['dev_fvu']:.4f} | {r['dev_utilization']:.3f} | {levels} | {r['dev_perplexity']:.0f} |")
    if args.sweep and not args.tune:  # a sweep is its own invocation
        return out

    tuned = None
    if args.tune:
        tuned, tried = tune_vqtorch(bench)
        out["tuning"] = {"best": tuned, "tried": tried}
        print(f"\nResidualVQ tuning on dev ({len(tried)} configurations x tuning seeds {args.tune_seeds}, mean dev)\n"
              "| configuration | steps | dev FVU | dev util | dev ppl |\n|---|---|---|---|---|")
        for r in sorted(tried, key=lambda r: r["dev_fvu"]):
            mark = " **(selected)**" if r["config"] == tuned else ""
            print(f"| {_config_name(r['config'])}{mark} | {r['steps']:.0f} | {r['dev_fvu']:.4f} | "
                  f"{r['dev_utilization']:.3f} | {r['dev_perplexity']:.0f} |")
    if args.seeds:
        systems = final_runs(bench, tuned)
        tuned_name = None if tuned is None else ("vqtorch tuned" if "vqtorch tuned" in systems else
                                                 "vqtorch kmeans+dead")  # the search kept its start
        out.update(report(bench, systems, tuned_name))
        out["runs"] = systems
        if args.voice_attribution:
            print_voice_attribution(bench, args.seeds[0])
    if bench.checked:
        print(f"\nscoring path checked on {len(bench.checked)} newly trained systems: the codec seen by "
              f"evaluate_frames reproduces each system's own codes exactly and its reconstruction within "
              f"{max(bench.checked):.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=_jsonable))
    return out


if __name__ == "__main__":
    main()
