"""Streaming tokenization against offline encoding: cost, latency and agreement, measured in one process.

For each chunk size the same clip is pushed through ``model.stream`` and compared with ``model.encode`` of
the whole clip (same model, device and dtype):

- cost ratio: wall time of the whole stream (every push and the flush) / wall time of one offline encode
  (best of ``--repeats``, timed just before), both per audio second; also the same ratio in process CPU
  time, steadier on a shared machine;
- per-push latency: wall time of each ``push`` (p50 / p95 / max), on top of the encoder's algorithmic
  lookahead (``stream.lookahead_ms``);
- FLOPs: matrix products and convolutions counted by ``torch.utils.flop_counter`` (stream / offline);
- agreement: share of frame-levels whose codes equal the offline ones, and for each differing frame the
  relative distance gap at its first differing level (a float near-tie is < 1e-4).

``--check`` is the CUDA check (``--device cuda``): fp32 and bf16, tiny and full-size Gemma 4, chunkings from
10 ms to 2 s and random boundaries; also long-audio peak memory (1 min vs 10 min) and a windowed HuBERT
stream. It prints one line per measurement and writes JSON to ``--out``.

    python benchmarks/bench_stream.py                                  # tiny Gemma 4, 20 s, CPU
    python benchmarks/bench_stream.py --size full --seconds 8 --chunk-ms 160 640 2000 --roofline
    python benchmarks/bench_stream.py --size full --seconds 4 --chunk-ms 160 --batch 1 4 8  # StreamBatch
    python benchmarks/bench_stream.py --family hubert --lookahead-ms 500 --chunk-ms 160   # windowed
    python benchmarks/bench_stream.py --model ./my-rvq --seconds 30                       # a real checkpoint
    python benchmarks/bench_stream.py --check --device cuda --out stream_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"
SR = 16000


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """``seconds`` of the committed espeak-ng corpus at 16 kHz (clips concatenated), or speech-like noise
    when soundfile / soxr are not installed."""
    try:
        import soundfile
        import soxr

        rows = [json.loads(line) for line in (CORPUS / "metadata.jsonl").read_text().splitlines() if line]
        rng = np.random.default_rng(seed)
        pieces, total = [], 0
        while total < seconds * SR:
            row = rows[int(rng.integers(len(rows)))]
            wave, rate = soundfile.read(CORPUS / row["file"], dtype="float32")
            wave = soxr.resample(wave, rate, SR)
            pieces.append(wave)
            total += len(wave)
        return np.concatenate(pieces)[: int(seconds * SR)].astype(np.float32)
    except (ImportError, OSError):
        rng = np.random.default_rng(seed)
        t = np.arange(int(seconds * SR)) / SR
        wave = np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 4 * t)) + 0.1 * rng.standard_normal(len(t))
        return (0.3 * wave).astype(np.float32)


def build_model(size: str, num_quantizers: int, codebook_size: int, device: str, dtype: torch.dtype,
                family: str = "gemma4_audio", checkpoint: str | None = None):
    """A model with random weights: the tiny test encoder of ``family``, or the full-size Gemma 4 one
    (1024 x 12 layers); or a saved checkpoint (its own codebooks are kept)."""
    if checkpoint:
        from gemma_rvq.convert import load_any

        return load_any(checkpoint).to(device, dtype).eval()
    from gemma_rvq.testing import tiny_rvq_model

    encoder_kwargs: dict = {}
    extra: dict = {}
    if size == "full":
        encoder_kwargs = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8,
                              subsampling_conv_channels=[128, 32], output_proj_dims=1536)
    if family == "hubert":
        encoder_kwargs, extra = {"feat_extract_norm": "layer"}, {"encoder_layer": 2}
    model = tiny_rvq_model(family, num_quantizers=num_quantizers, codebook_size=codebook_size, seed=0,
                           encoder_kwargs=encoder_kwargs, **extra)
    with torch.no_grad():  # codebooks fitted to real embeddings: codes spread like a trained model's
        emb, mask = model.embed(speech(6.0, seed=123), sampling_rate=SR)
        z = model.project_in(emb[mask])
        quantizer = model.quantizer
        if z.shape[0] >= codebook_size:
            quantizer.kmeans_init(z, num_iters=5)
        else:  # fewer frames than codes: every level samples its residuals, with a little noise
            gen = torch.Generator().manual_seed(0)
            residual = z.float()
            for level in range(quantizer.num_quantizers):
                rows = residual[torch.randint(len(residual), (codebook_size,), generator=gen)]
                noise = 0.05 * residual.std(0) * torch.randn(rows.shape, generator=gen)
                quantizer.codebooks.data[level] = (rows + noise).to(quantizer.codebooks.dtype)
                quantizer.invalidate_cache()
                residual = residual - quantizer.codebooks.data[level].float()[quantizer.nearest(residual, level)]
    return model.to(device, dtype).eval()


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def offline(model, wave: np.ndarray, device: str, repeats: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(best wall seconds, best process CPU seconds of ``model.encode``, codes ``[Q, T]``, embeddings ``[T, D]``)."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        out = model.encode(wave, sampling_rate=SR)
        _sync(device)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu, out.audio_codes[0], out.embeddings[0]


def chunk_sizes(chunk_ms: float | str, length: int, seed: int = 0) -> list[int]:
    """Push sizes in samples: fixed, or ``"random"`` (uniform in 1 .. 2 x 160 ms)."""
    if chunk_ms == "random":
        rng = np.random.default_rng(seed)
        sizes = rng.integers(1, 2 * 2560, size=2 * length // 2560 + 2).tolist()
    else:
        sizes = [max(1, round(float(chunk_ms) * SR / 1000))]
    return sizes


def stream(model, wave: np.ndarray, sizes: list[int], device: str, **kwargs) -> dict:
    """Push ``wave`` in chunks of ``sizes`` (cycled): codes, total wall seconds, per-push latencies.
    ``kwargs`` go to ``model.stream`` (``lookahead_ms`` / ``context_ms`` for bidirectional encoders)."""
    handle = model.stream(SR, **kwargs)
    latencies, pieces, i, k = [], [], 0, 0
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    while i < len(wave):
        size = sizes[k % len(sizes)]
        tic = time.perf_counter()
        pieces.append(handle.push(wave[i : i + size]))
        _sync(device)
        latencies.append(time.perf_counter() - tic)
        i, k = i + size, k + 1
    tic = time.perf_counter()
    pieces.append(handle.flush())
    _sync(device)
    latencies.append(time.perf_counter() - tic)
    total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    ms = np.array(latencies) * 1000
    return {
        "codes": torch.cat(pieces, 1), "seconds": total, "cpu_seconds": total_cpu, "pushes": len(latencies),
        "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "max_ms": float(ms.max()),
        "state_bytes": handle.state_nbytes, "lookahead_ms": handle.lookahead_ms,
    }


def near_ties(model, embeddings: torch.Tensor, ref: torch.Tensor, codes: torch.Tensor) -> list[float]:
    """Relative distance gap at the first differing level of every frame whose codes differ (offline residual)."""
    gaps = []
    with torch.no_grad():
        z = model.project_in(embeddings.to(model.dtype)).float()
        books = model.quantizer.codebooks.float()
        for t in (ref != codes).any(0).nonzero().flatten().tolist():
            level = int((ref[:, t] != codes[:, t]).nonzero()[0])
            residual = z[t] - sum((books[j, ref[j, t]] for j in range(level)), torch.zeros_like(z[t]))
            d_ref = (residual - books[level, ref[level, t]]).pow(2).sum()
            d_new = (residual - books[level, codes[level, t]]).pow(2).sum()
            gaps.append(float((d_new - d_ref) / d_ref))
    return gaps


def flops(model, wave: np.ndarray, chunk: int) -> tuple[float, float]:
    """(offline FLOPs, stream FLOPs) of ``wave``, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.encode(wave, sampling_rate=SR)
    offline_flops = counter.get_total_flops()
    import gemma_rvq.streaming as streaming

    # the counter knows aten's products, not oneDNN's packed-weight linear: count the same products unpacked
    packing = getattr(streaming, "PACK_WEIGHTS", False)
    streaming.PACK_WEIGHTS = False
    try:
        handle = model.stream(SR)
        with FlopCounterMode(display=False) as counter:
            for i in range(0, len(wave), chunk):
                handle.push(wave[i : i + chunk])
            handle.flush()
    finally:
        streaming.PACK_WEIGHTS = packing
    return offline_flops, counter.get_total_flops()


def compare(model, wave, device, chunkings, repeats, log, label="", **kwargs) -> list[dict]:
    """Every chunking against the offline encode timed just before it (best of ``repeats``: on a shared
    machine the load drifts between measurements): one result row each."""
    seconds = len(wave) / SR
    rows = []
    for chunk_ms in chunkings:
        offline_s, offline_cpu, ref, emb = offline(model, wave, device, repeats)
        if not rows:
            log(f"{label}offline encode: {offline_s:.3f} s for {seconds:.1f} s of audio "
                f"({seconds / offline_s:.0f}x real time), {ref.shape[1]} frames")
        run = stream(model, wave, chunk_sizes(chunk_ms, len(wave)), device, **kwargs)
        codes = run.pop("codes")
        same = codes.shape == ref.shape
        agree = float((codes == ref).float().mean()) if same else float("nan")
        # windowed (approximate) streams differ by design: the near-tie analysis is for exact ones
        gaps = near_ties(model, emb, ref, codes) if same and not kwargs else []
        row = {"chunk_ms": chunk_ms, "cost_ratio": run["seconds"] / offline_s,
               "cpu_ratio": run["cpu_seconds"] / offline_cpu, "agreement": agree, "differing_frames": len(gaps),
               "max_gap": max(gaps, default=0.0), "offline_s": offline_s, "offline_cpu_s": offline_cpu, **run}
        rows.append(row)
        log(f"{label}chunk {chunk_ms!s:>6} ms: cost {row['cost_ratio']:5.2f}x offline (CPU time "
            f"{row['cpu_ratio']:.2f}x), push p50 {run['p50_ms']:.1f} "
            f"p95 {run['p95_ms']:.1f} max {run['max_ms']:.1f} ms ({run['pushes']} pushes), agreement {agree:.5f}, "
            f"{len(gaps)} differing frames (max gap {row['max_gap']:.1e}), state {run['state_bytes']} B")
    return rows


def batch_compare(model, seconds: float, counts: list[int], chunk_ms: float, repeats: int, log) -> list[dict]:
    """``StreamBatch`` of ``n`` utterances (different clips of ``seconds``) pushed in ``chunk_ms`` chunks, for each
    ``n`` in ``counts``: cost per utterance against one offline encode (best of ``repeats``, timed just before),
    agreement of every utterance's codes with its offline ones, and the near-tie gap of any differing frame."""
    from gemma_rvq.streaming import StreamBatch

    waves = np.stack([speech(seconds, seed=s) for s in range(max(counts))])
    offline_runs = [offline(model, w, "cpu", 1) for w in waves]
    chunk = max(1, round(chunk_ms * SR / 1000))
    rows = []
    for n in counts:
        offline_s, offline_cpu, _, _ = offline(model, waves[0], "cpu", repeats)
        batch = StreamBatch(model, n, SR)
        start, start_cpu = time.perf_counter(), time.process_time()
        pieces = [batch.push(waves[:n, i : i + chunk]) for i in range(0, waves.shape[1], chunk)] + [batch.flush()]
        total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        codes = torch.cat(pieces, 2)
        agree, gaps = [], []
        for b in range(n):
            _, _, ref, emb = offline_runs[b]
            agree.append(float((codes[b] == ref).float().mean()))
            gaps += near_ties(model, emb, ref, codes[b])
        row = {"streams": n, "chunk_ms": chunk_ms, "seconds": total, "cpu_seconds": total_cpu,
               "cost_ratio_per_stream": total / n / offline_s, "cpu_ratio_per_stream": total_cpu / n / offline_cpu,
               "push_ms": total / len(pieces) * 1000, "agreement": float(np.mean(agree)),
               "differing_frames": len(gaps), "max_gap": max(gaps, default=0.0)}
        rows.append(row)
        log(f"batch of {n:2d} streams, {chunk_ms:g} ms chunks: cost per stream {row['cost_ratio_per_stream']:5.2f}x offline "
            f"(CPU time {row['cpu_ratio_per_stream']:.2f}x), push {row['push_ms']:.1f} ms for all {n}, agreement "
            f"{row['agreement']:.5f}, {len(gaps)} differing frames (max gap {row['max_gap']:.1e})")
    return rows


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> tuple[float, float]:
    """Read bandwidth of one thread in bytes per second of wall time and of process CPU time: best of
    ``repeats`` sums over ``nbytes`` of fp32 (larger than any cache; a sum does one add per 4 bytes read, far
    below what a core computes). On a shared machine the CPU-time figure is the steadier one."""
    x = torch.ones(nbytes // 4)
    best = best_cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        x.sum()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return nbytes / best, nbytes / best_cpu


def roofline(model, rows: list[dict], seconds: float, log) -> dict:
    """The memory bound of a push: every push reads every weight of the encoder, the projection and the
    codebooks once, whatever its frame count, so no push can take less than weight bytes / bandwidth.
    Per chunk size: the lowest possible cost ratio (pushes x bound / offline time) and the measured push
    against the bound, both in wall time and in process CPU time."""
    # what a push reads: the encoder's layers and subsampling, the input projection and the codebooks (not the
    # relative position projections, computed once per stream, nor the decoder side)
    skip = ("out_", "encoder.output_proj.", "encoder.rel_pos")
    read = [p for name, p in model.named_parameters() if not name.startswith(skip) and "relative_k_proj" not in name]
    read.append(model.quantizer.codebooks)
    nbytes = sum(p.numel() * p.element_size() for p in read)
    bandwidth, bandwidth_cpu = memory_bandwidth()
    bound, bound_cpu = nbytes / bandwidth, nbytes / bandwidth_cpu
    log(f"roofline: {nbytes / 1e9:.3f} GB of weights read per push; one-thread read bandwidth {bandwidth / 1e9:.2f} "
        f"GB/s wall ({bandwidth_cpu / 1e9:.2f} GB/s per CPU second): at least {bound * 1000:.0f} ms per push "
        f"({bound_cpu * 1000:.0f} ms of CPU time)")
    out = {"weight_bytes": nbytes, "bandwidth": bandwidth, "bandwidth_cpu": bandwidth_cpu, "bound_s": bound,
           "bound_cpu_s": bound_cpu, "chunks": []}
    for row in rows:
        if row["chunk_ms"] == "random":
            continue
        pushes = seconds * 1000 / float(row["chunk_ms"])
        lowest, lowest_cpu = pushes * bound / row["offline_s"], pushes * bound_cpu / row["offline_cpu_s"]
        push_cpu = row["cpu_seconds"] / row["pushes"]
        out["chunks"].append({"chunk_ms": row["chunk_ms"], "lowest_ratio": lowest, "lowest_cpu_ratio": lowest_cpu,
                              "p50_over_bound": row["p50_ms"] / 1000 / bound, "cpu_per_push_over_bound": push_cpu / bound_cpu})
        log(f"roofline at {row['chunk_ms']!s:>6} ms chunks: lowest cost ratio {lowest:.2f}x wall, {lowest_cpu:.2f}x CPU "
            f"(measured {row['cost_ratio']:.2f}x, {row['cpu_ratio']:.2f}x); push p50 {row['p50_ms']:.0f} ms = "
            f"{row['p50_ms'] / 1000 / bound:.2f}x the bound, CPU per push {push_cpu * 1000:.0f} ms = "
            f"{push_cpu / bound_cpu:.2f}x the CPU bound")
    return out


def long_audio_memory(model, device: str, log) -> dict:
    """Peak extra memory of ``model.encode`` on 1 min vs 10 min (CUDA: max_memory_allocated)."""
    out = {}
    for minutes in (1, 10):
        wave = np.tile(speech(30.0), 2 * minutes)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            model.encode(wave, sampling_rate=SR)
            torch.cuda.synchronize()
            out[minutes] = torch.cuda.max_memory_allocated() - before
        else:
            import resource

            model.encode(wave, sampling_rate=SR)
            out[minutes] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    log(f"long audio peak memory: 1 min {out[1] / 2**20:.0f} MiB, 10 min {out[10] / 2**20:.0f} MiB "
        f"(ratio {out[10] / out[1]:.2f})")
    return {"peak_1min": out[1], "peak_10min": out[10], "ratio": out[10] / out[1]}


def check(device: str, out_path: str | None, seconds: float, sizes: tuple[str, ...] = ("tiny", "full")) -> dict:
    """The CUDA check: exact streaming in fp32 and bf16, tiny and full size; memory; a windowed HuBERT."""
    results: dict = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
                     "torch": torch.__version__}

    def log(text: str) -> None:
        print(text, flush=True)

    wave = speech(seconds)
    for size, (q, k) in (("tiny", (2, 16)), ("full", (8, 2048))):
        if size not in sizes:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            name = f"{size}_{str(dtype).split('.')[-1]}"
            try:
                model = build_model(size, q, k, device, dtype)
                chunkings = [10, 40, 160, 2000, "random"] if size == "tiny" else [40, 160, 640, 2000, "random"]
                with torch.no_grad():
                    results[name] = compare(model, wave, device, chunkings, 3, log, label=f"[{name}] ")
                    if dtype == torch.float32:
                        off_flops, stream_flops = flops(model, wave[: 5 * SR], 2560)
                        results[name + "_flops_ratio_160ms"] = stream_flops / off_flops
                        log(f"[{name}] FLOPs at 160 ms: stream / offline = {stream_flops / off_flops:.3f}")
                    if size == "full":
                        results[name + "_memory"] = long_audio_memory(model, device, lambda t, n=name: log(f"[{n}] {t}"))
                del model
            except Exception as err:  # keep going: one broken path must not hide the others
                import traceback

                traceback.print_exc()
                results[name] = f"error: {type(err).__name__}: {err}"[:800]
            if out_path:
                Path(out_path).write_text(json.dumps(results, indent=1, default=str))
    try:  # windowed streaming of a bidirectional encoder runs on the device too
        from gemma_rvq.testing import tiny_rvq_model

        hubert = tiny_rvq_model("hubert", encoder_layer=2, encoder_kwargs={"feat_extract_norm": "layer"}).to(device)
        ref = hubert.encode(wave[: 6 * SR], sampling_rate=SR).audio_codes[0]
        handle = hubert.stream(SR, lookahead_ms=500)
        got = torch.cat([handle.push(wave[i : i + 2560]) for i in range(0, 6 * SR, 2560)] + [handle.flush()], 1)
        results["hubert_windowed_agreement"] = float((got == ref).float().mean())
        log(f"[hubert windowed, lookahead 500 ms] agreement with offline {results['hubert_windowed_agreement']:.3f}")
    except Exception as err:
        results["hubert_windowed"] = f"error: {type(err).__name__}: {err}"[:800]
        log(results["hubert_windowed"])
    if out_path:
        Path(out_path).write_text(json.dumps(results, indent=1, default=str))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny", help="Gemma 4 encoder size")
    parser.add_argument("--family", default="gemma4_audio", choices=["gemma4_audio", "hubert", "wav2vec2", "whisper"],
                        help="tiny random encoder family (bidirectional ones need --lookahead-ms)")
    parser.add_argument("--model", default=None, help="a gemma-rvq checkpoint (folder or Hub id) instead")
    parser.add_argument("--lookahead-ms", type=float, default=None, help="windowed streaming (bidirectional)")
    parser.add_argument("--context-ms", type=float, default=None, help="windowed streaming: left context")
    parser.add_argument("--seconds", type=float, default=20.0, help="clip length")
    parser.add_argument("--chunk-ms", nargs="*", default=["10", "40", "160", "640", "2000", "random"])
    parser.add_argument("--num-quantizers", type=int, default=8)
    parser.add_argument("--codebook-size", type=int, default=None, help="default: 16 (tiny), 2048 (full)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (torch.set_num_threads); 1: a stream's small ops gain nothing from more, "
                        "and on a loaded machine OpenMP waits make them several times slower")
    parser.add_argument("--repeats", type=int, default=3, help="offline encodes; the best counts")
    parser.add_argument("--memory", action="store_true", help="also: peak memory of 1 min vs 10 min offline")
    parser.add_argument("--roofline", action="store_true",
                        help="also: memory bandwidth and the lowest possible per-push time (weights / bandwidth)")
    parser.add_argument("--batch", type=int, nargs="*", default=None,
                        help="also: StreamBatch of each number of streams (e.g. 1 4 8) at the first --chunk-ms")
    parser.add_argument("--check", action="store_true", help="the CUDA check (see above)")
    parser.add_argument("--check-sizes", nargs="*", default=["tiny", "full"], help="--check: encoder sizes")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        check(args.device, args.out, min(args.seconds, 20.0), tuple(args.check_sizes))
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    what = args.model or (f"{args.size} Gemma 4" if args.family == "gemma4_audio" else f"tiny {args.family}")
    print(f"# {what}, {args.seconds:g} s clip, {args.device} {args.dtype}, {args.threads} threads, "
          f"torch {torch.__version__}, load average {load:.1f}", flush=True)
    codebook_size = args.codebook_size or (16 if args.size == "tiny" else 2048)
    model = build_model(args.size, args.num_quantizers, codebook_size, args.device, getattr(torch, args.dtype),
                        args.family, args.model)
    chunkings = [c if c == "random" else float(c) for c in args.chunk_ms]
    windowed = {k: v for k, v in (("lookahead_ms", args.lookahead_ms), ("context_ms", args.context_ms)) if v is not None}
    with torch.no_grad():
        rows = compare(model, speech(args.seconds), args.device, chunkings, args.repeats, print, **windowed)
        off_flops = stream_flops = float("nan")
        if not windowed:
            off_flops, stream_flops = flops(model, speech(5.0), 2560)
            print(f"FLOPs (5 s, 160 ms chunks): stream / offline = {stream_flops / off_flops:.3f}")
        memory = long_audio_memory(model, args.device, print) if args.memory else None
        batches = None
        if args.batch:
            first = next((c for c in chunkings if c != "random"), 160.0)
            batches = batch_compare(model, args.seconds, args.batch, float(first), args.repeats, print)
        bound = roofline(model, rows, args.seconds, print) if args.roofline and args.device == "cpu" else None
    print(f"load average after: {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "flops_ratio": stream_flops / off_flops,
                                              "memory": memory, "roofline": bound, "batches": batches}, indent=1,
                                             default=str))


if __name__ == "__main__":
    main()
