"""One prepared run on a CUDA machine: correctness of every CUDA path, then the full-size benchmarks.

CI never has a GPU, so this script is how our CUDA paths get exercised when a GPU is lent. It prints one
line per check and writes everything to ``--out`` (JSON). Sections:

1. ``encode``: tiny random Gemma 4 / HuBERT / wav2vec2 / Whisper models on the committed corpus, codes on
   CUDA (fp32 and bf16) against the CPU fp32 codes of the same model (agreement per frame-level).
2. ``map``: ``dataset.map(SpeechTokenizer(model, device=DEV), batched=True)`` against the CPU map (exact
   token strings per row).
3. ``train``: stage-1 training (``train_rvq``) on CUDA with the tiny YAML, a few steps: losses finite,
   codebooks moved, exports load.
4. ``search``: full-size nearest-code search (N frames, D=1024, Q=8, K=2048) against
   vector-quantize-pytorch ``ResidualVQ`` (eval mode) in the same process; agreement with a float64 search
   on a subsample.
5. ``gemma4``: full-size random Gemma 4 audio encoder (hidden 1024, 12 layers) + 8 x 2048 RVQ in bf16:
   tokenization throughput in audio seconds per wall second, encoder alone and the whole map transform.
6. ``stream`` (not in the default list): ``benchmarks/bench_stream.py --check``: streamed == offline codes on
   the device in fp32 and bf16 (tiny and full-size Gemma 4), cost and latency by chunk size, long-audio memory.

    python benchmarks/gpu_check.py --out gpu.json                 # everything (~3-5 min on one H200)
    python benchmarks/gpu_check.py --sections encode map --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"
RESULTS: dict = {}
DEV = "cuda"


def _log(section: str, **values) -> None:
    RESULTS.setdefault(section, {}).update(values)
    print(f"[{section}] " + " ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _corpus_waves(limit: int | None = None) -> tuple[list[np.ndarray], int]:
    import soundfile

    rows = [json.loads(line) for line in (CORPUS / "metadata.jsonl").read_text().splitlines() if line]
    waves, rate = [], 0
    for row in rows[:limit]:
        wave, rate = soundfile.read(CORPUS / row["file"], dtype="float32")
        waves.append(wave)
    return waves, rate


def _agreement(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of valid frame-levels where codes ``[B, Q, T]`` agree."""
    valid = mask[:, None, :].expand_as(a)
    return float((a == b)[valid].float().mean())


def check_encode() -> None:
    from gemma_rvq.testing import tiny_rvq_model

    waves, rate = _corpus_waves(24)
    for family in ("gemma4_audio", "hubert", "wav2vec2", "whisper"):
        model = tiny_rvq_model(family, num_quantizers=8, codebook_size=256, seed=0).eval()
        with torch.no_grad():
            ref = model.encode(waves, sampling_rate=rate)
            model_cuda = model.to(DEV)
            out = model_cuda.encode(waves, sampling_rate=rate)
            same_mask = bool(torch.equal(out.codes_mask.cpu(), ref.codes_mask))
            agree = _agreement(out.audio_codes.cpu(), ref.audio_codes, ref.codes_mask)
            one = model_cuda.encode(waves[:1], sampling_rate=rate)
            batched_eq_single = bool(
                torch.equal(one.audio_codes[0, :, : int(one.codes_mask[0].sum())].cpu(),
                            out.audio_codes[0, :, : int(one.codes_mask[0].sum())].cpu())
            )
            model_bf16 = model_cuda.to(torch.bfloat16)
            out_bf16 = model_bf16.encode(waves, sampling_rate=rate)
            agree_bf16 = _agreement(out_bf16.audio_codes.cpu(), ref.audio_codes, ref.codes_mask)
            dec = model_cuda.float().decode(out.audio_codes, out.codes_mask).embeddings
        _log(f"encode/{family}", same_mask=same_mask, fp32_vs_cpu=round(agree, 5),
             bf16_vs_cpu=round(agree_bf16, 4), batched_eq_single=batched_eq_single,
             decode_finite=bool(torch.isfinite(dec).all()), frames=int(ref.codes_mask.sum()))


def check_map() -> None:
    import datasets
    from datasets import Audio, Dataset

    from gemma_rvq.testing import tiny_rvq_model
    from gemma_rvq.transforms import SpeechTokenizer

    datasets.disable_progress_bars()
    rows = [json.loads(line) for line in (CORPUS / "metadata.jsonl").read_text().splitlines() if line]
    ds = Dataset.from_dict({"audio": [str(CORPUS / r["file"]) for r in rows[:32]]})
    ds = ds.cast_column("audio", Audio(decode=False))
    model = tiny_rvq_model(num_quantizers=8, codebook_size=256, seed=0).eval()
    cpu = ds.map(SpeechTokenizer(model, device="cpu"), batched=True, load_from_cache_file=False)
    start = time.perf_counter()
    gpu = ds.map(SpeechTokenizer(model, device=DEV), batched=True, load_from_cache_file=False)
    seconds = time.perf_counter() - start
    same = sum(a == b for a, b in zip(cpu["semantic_tokens"], gpu["semantic_tokens"]))
    _log("map", rows=len(ds), identical_rows=same, seconds=round(seconds, 2))
    gpu_bf16 = ds.map(SpeechTokenizer(model, device=DEV, dtype="bfloat16"), batched=True,
                      load_from_cache_file=False)
    same_bf16 = sum(a == b for a, b in zip(cpu["semantic_tokens"], gpu_bf16["semantic_tokens"]))
    _log("map", bf16_identical_rows=same_bf16)


def check_train(workdir: str) -> None:
    from gemma_rvq.training import parse_args, train_rvq

    out = os.path.join(workdir, "rvq-tiny")
    config = parse_args(["--config", str(ROOT / "examples/configs/train_rvq_tiny.yaml"),
                         "--output_dir", out, "--dataset_name", str(CORPUS / "metadata.jsonl"),
                         "--max_steps", "30", "--eval_steps", "10", "--save_steps", "10", "--log_with", "none"])
    start = time.perf_counter()
    result = train_rvq(config)
    seconds = time.perf_counter() - start
    from transformers import AutoModel

    best = AutoModel.from_pretrained(result.folders["best"])
    dev = result.metrics.get("best", {}).get("dev", {})
    _log("train", steps=result.steps, seconds=round(seconds, 1),
         dev_fvu=round(float(dev.get("fvu", float("nan"))), 4),
         dev_utilization=round(float(dev.get("codebook_utilization", float("nan"))), 3),
         codebooks_finite=bool(torch.isfinite(best.quantizer.codebooks).all()),
         device=DEV)


def check_search(num_frames: int) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_encode.py"), "--device", DEV,
           "--num-frames", str(num_frames), "--repeats", "2",
           "--sweep", "8192", "32768", "--vq-chunks", "8192", "32768", "--slice-size", "262144"]
    import subprocess

    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    _log("search", returncode=proc.returncode, seconds=round(time.perf_counter() - start, 1))
    print(proc.stdout[-6000:], proc.stderr[-3000:], flush=True)
    RESULTS["search"]["stdout"] = proc.stdout[-12000:]
    if proc.returncode != 0:
        raise RuntimeError(f"bench_encode.py exited with {proc.returncode}: {proc.stderr[-400:]}")


def check_stream() -> None:
    """Streaming on the device (bench_stream.py --check): exact Gemma 4 streams in fp32 and bf16 against
    offline encode on the same device, cost ratio and push latency by chunk size, long-audio peak memory."""
    import subprocess

    out = Path(tempfile.mkdtemp()) / "stream.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_stream.py"), "--check", "--device", DEV, "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480)
    _log("stream", returncode=proc.returncode, seconds=round(time.perf_counter() - start, 1))
    print(proc.stdout[-8000:], proc.stderr[-3000:], flush=True)
    RESULTS["stream"]["stdout"] = proc.stdout[-12000:]
    if out.exists():
        RESULTS["stream"]["results"] = json.loads(out.read_text())
    if proc.returncode != 0:
        raise RuntimeError(f"bench_stream.py exited with {proc.returncode}: {proc.stderr[-400:]}")


def check_gemma4(minutes: float) -> None:
    import datasets
    from datasets import Dataset
    from transformers import Gemma4AudioFeatureExtractor

    from gemma_rvq.testing import tiny_rvq_model
    from gemma_rvq.transforms import SpeechTokenizer

    datasets.disable_progress_bars()
    model = tiny_rvq_model(num_quantizers=8, codebook_size=2048, seed=0,
                           encoder_kwargs={"hidden_size": 1024, "num_hidden_layers": 12}).eval()
    params = sum(p.numel() for p in model.get_audio_encoder().parameters())
    waves, rate = _corpus_waves()
    import soxr

    stream = np.concatenate([soxr.resample(w, rate, 16000) for w in waves])
    rng = np.random.default_rng(0)
    clips, total = [], 0.0
    while total < minutes * 60:
        n = int(rng.uniform(2.0, 20.0) * 16000)
        start = int(rng.integers(0, max(1, len(stream) - n)))
        clips.append(stream[start:start + n].copy())
        total += n / 16000
    _log("gemma4", encoder_params_m=round(params / 1e6, 1), clips=len(clips), audio_seconds=round(total, 1))

    # Encoder alone on precomputed features, bf16, batches of 32 sorted clips.
    fe = Gemma4AudioFeatureExtractor()
    encoder = model.get_audio_encoder().to(DEV, torch.bfloat16).eval()
    order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
    feats = []
    for i in range(0, len(order), 32):
        f = fe([clips[j] for j in order[i:i + 32]], truncation=False, return_tensors="pt")
        feats.append((f["input_features"], f["input_features_mask"]))
    with torch.no_grad():
        for x, m in feats[:2]:
            encoder(x.to(DEV, torch.bfloat16), attention_mask=m.to(DEV))
        _sync()
        start = time.perf_counter()
        for x, m in feats:
            encoder(x.to(DEV, torch.bfloat16), attention_mask=m.to(DEV))
        _sync()
        enc_s = time.perf_counter() - start
    _log("gemma4", encoder_alone_bf16_x_realtime=round(total / enc_s, 1))

    # model.encode (features + encoder + RVQ) in bf16 and fp32.
    for dtype in (torch.bfloat16, torch.float32):
        m = model.to(DEV, dtype)
        with torch.no_grad():
            m.encode(clips[:4], sampling_rate=16000)
            _sync()
            start = time.perf_counter()
            for i in range(0, len(order), 32):
                m.encode([clips[j] for j in order[i:i + 32]], sampling_rate=16000)
            _sync()
            s = time.perf_counter() - start
        _log("gemma4", **{f"encode_{str(dtype).split('.')[-1]}_x_realtime": round(total / s, 1)})

    # The map transform end to end (arrays in, token strings out), bf16 on the GPU.
    ds = Dataset.from_dict({"audio": [{"array": c, "sampling_rate": 16000} for c in clips]})
    tok = SpeechTokenizer(model, device=DEV, dtype="bfloat16")
    ds.select(range(min(4, len(ds)))).map(tok, batched=True, load_from_cache_file=False)
    start = time.perf_counter()
    ds.map(tok, batched=True, batch_size=256, load_from_cache_file=False)
    s = time.perf_counter() - start
    _log("gemma4", map_bf16_x_realtime=round(total / s, 1), target=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="*", default=["encode", "map", "train", "search", "gemma4"])
    parser.add_argument("--search-frames", type=int, default=1_000_000)
    parser.add_argument("--gemma4-minutes", type=float, default=20.0)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (small sizes)")
    args = parser.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device")
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    _log("device", name=name, torch=torch.__version__)
    workdir = tempfile.mkdtemp()
    steps = {"encode": check_encode, "map": check_map, "train": lambda: check_train(workdir),
             "search": lambda: check_search(args.search_frames),
             "gemma4": lambda: check_gemma4(args.gemma4_minutes), "stream": check_stream}
    for name in args.sections:
        start = time.perf_counter()
        try:
            steps[name]()
            _log(name, ok=True, wall_s=round(time.perf_counter() - start, 1))
        except Exception as err:  # keep going: one broken path must not hide the others
            traceback.print_exc()
            _log(name, ok=False, error=f"{type(err).__name__}: {err}"[:800])
        Path(args.out).write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
