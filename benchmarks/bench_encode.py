"""Encoding speed of gemma-rvq's ResidualQuantizer against vector-quantize-pytorch and the GEMM bound.

Everything runs in ONE process on the same codebooks and data:

(a) ``ResidualQuantizer.encode`` (gemma-rvq), at its default ``search_chunk_size`` (and a sweep);
(b) vector-quantize-pytorch ``ResidualVQ`` in eval mode with the same codebooks copied in, fed in chunks
    (the best of a few chunk sizes);
(c) the GEMM bound: the measured rate of the bare score GEMMs at this shape (``torch.addmm`` and, on
    CPU, the oneDNN linear, multi-threaded or as one single-threaded stream per thread; the best chunk
    size and kernel), converted to frames/s for ``Q`` stages.

Also reported: agreement with a float64 exhaustive search (teacher-forced, so one near-tie cannot cascade)
and the peak extra memory of each method: on CPU the peak resident set size (``VmHWM`` after resetting
it through ``/proc/self/clear_refs``) minus the resident size before the call; on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the call.

Example::

    python benchmarks/bench_encode.py                      # Q=8, K=2048, D=1024, N=20000, 2 threads
    python benchmarks/bench_encode.py --device cuda --num-frames 200000 --chunk-size 16384
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import platform
import re
import statistics
import time
from collections.abc import Callable

import torch

from gemma_rvq import search
from gemma_rvq.quantization import ResidualQuantizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of one call."""
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _peak_extra_memory(fn: Callable[[], object], device: torch.device) -> tuple[float | None, str]:
    """Peak extra memory of one call of ``fn`` in bytes, and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated delta"
    # Give freed heap pages back first: otherwise allocations reuse pages that are already resident
    # (left by earlier runs) and the RSS peak misses them.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    except OSError:
        return None, "unavailable (/proc/self/clear_refs not writable)"
    before = _proc_status("VmRSS")
    fn()
    peak = _proc_status("VmHWM")
    if before is None or peak is None:
        return None, "unavailable (/proc/self/status)"
    return peak - before, "peak RSS delta: malloc_trim, reset VmHWM via clear_refs, run once"


def _make_data(args, device: torch.device) -> tuple[ResidualQuantizer, torch.Tensor]:
    """Correlated Gaussian frames and data-seeded codebooks (level l = random residuals at level l)."""
    gen = torch.Generator().manual_seed(args.seed)
    d = args.dim
    spectrum = torch.arange(1, d + 1, dtype=torch.float32).rsqrt()  # decaying, like real embeddings
    mix = torch.linalg.qr(torch.randn(d, d, generator=gen))[0] * spectrum
    x = torch.randn(args.num_frames, d, generator=gen) @ mix.t()
    sample = torch.randn(max(2 * args.codebook_size, 4096), d, generator=gen) @ mix.t()
    rq = ResidualQuantizer(d, args.num_quantizers, args.codebook_size, search_chunk_size=args.chunk_size)
    rq.cluster_size.zero_()  # every code "dead": restart seeds them level by level from residuals
    rq.restart_dead_codes(sample, generator=gen)
    rq.eval()
    return rq.to(device), x.to(device)


def _vqtorch_rvq(rq: ResidualQuantizer, device: torch.device):
    from vector_quantize_pytorch import ResidualVQ

    vq = ResidualVQ(dim=rq.dim, num_quantizers=rq.num_quantizers, codebook_size=rq.codebook_size)
    with torch.no_grad():
        for level, layer in enumerate(vq.layers):
            layer._codebook.embed.copy_(rq.codebooks[level].float().unsqueeze(0))
            layer._codebook.initted.fill_(True)
    return vq.to(device).eval()


def _vqtorch_encode(vq, x: torch.Tensor, chunk: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            _, idx, _ = vq(x[start:start + chunk].unsqueeze(0))
            out.append(idx[0])
    return torch.cat(out)


def _gemm_pass(kind: str, x: torch.Tensor, weights, biases, chunk: int) -> None:
    """The Q score GEMMs of an encode (no argmax, no residual update): the kernel-bound part.

    ``addmm`` / ``onednn``: one multi-threaded GEMM after the other. ``onednn-streams``: chunks spread
    over one single-threaded stream per torch thread (the quantizer's own pool), i.e. the GEMM-only
    version of how ``encode`` runs on CPU.
    """
    if kind == "onednn-streams":
        pool = search._search_pool(torch.get_num_threads())

        def task(start: int) -> None:
            with torch.no_grad():
                _gemm_pass("onednn", x[start:start + chunk], weights, biases, chunk)

        list(pool.map(task, range(0, x.shape[0], chunk)))
        return
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            xc = x[start:start + chunk]
            for w, b in zip(weights, biases):
                if kind == "onednn":
                    torch.ops.mkldnn._linear_pointwise(xc, w, b, "none", [], "")
                else:
                    torch.addmm(b, xc, w)


def _agreement(rq: ResidualQuantizer, x: torch.Tensor, codes: torch.Tensor, rel: float = 1e-5) -> dict:
    """Compare ``codes`` with a float64 exhaustive search, teacher-forced on ``codes``."""
    r = x.double().cpu()
    codes = codes.cpu()
    cb = rq.codebooks.double().cpu()
    mismatches, near_ties, max_gap = 0, 0, 0.0
    for level in range(codes.shape[1]):
        c = cb[level]
        best = torch.empty(r.shape[0], dtype=torch.long)
        gap = torch.empty(r.shape[0], dtype=torch.float64)
        scale = torch.empty(r.shape[0], dtype=torch.float64)
        for s in range(0, r.shape[0], 1024):
            rc = r[s:s + 1024]
            d = (rc.square().sum(1, keepdim=True) - 2 * rc @ c.t() + c.square().sum(1)).clamp_min(0)
            best[s:s + 1024] = d.argmin(1)
            chosen = codes[s:s + 1024, level]
            gap[s:s + 1024] = d.gather(1, chosen[:, None])[:, 0] - d.min(1).values
            scale[s:s + 1024] = rc.square().sum(1) + c.square().sum(1).max()
        bad = best != codes[:, level]
        mismatches += int(bad.sum())
        near_ties += int((gap[bad] <= rel * scale[bad]).sum())
        if bad.any():
            max_gap = max(max_gap, float((gap[bad] / scale[bad]).max()))
        r = r - c[codes[:, level]]
    total = codes.numel()
    return {"identical": 1 - mismatches / total, "mismatches": mismatches, "near_ties": near_ties,
            "max_rel_gap": max_gap, "total": total}


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = match.group(1) if match else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-quantizers", "-Q", type=int, default=8)
    p.add_argument("--codebook-size", "-K", type=int, default=2048)
    p.add_argument("--dim", "-D", type=int, default=1024)
    p.add_argument("--num-frames", "-N", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="gemma-rvq search_chunk_size (default: the library default, 1024)")
    p.add_argument("--sweep", type=int, nargs="*", default=[256, 512, 1024, 2048],
                   help="chunk sizes for the gemma-rvq sweep and the GEMM bound")
    p.add_argument("--vq-chunks", type=int, nargs="*", default=[512, 1024, 2048, 4096],
                   help="chunk sizes tried for vector-quantize-pytorch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slice-size", type=int, default=4096,
                   help="the timed rounds alternate the methods on slices of this many frames")
    p.add_argument("--check-frames", type=int, default=4096, help="frames compared with exhaustive search")
    p.add_argument("--skip-vqtorch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.chunk_size is None:
        args.chunk_size = 1024
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 everywhere, as the quantizer does

    rq, x = _make_data(args, device)
    q, k, d, n = args.num_quantizers, args.codebook_size, args.dim, args.num_frames
    flop_per_frame = 2 * d * k * q
    print(f"machine: {_machine(device)}; torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"device={device}")
    print(f"shape: Q={q} K={k} D={d} N={n}; one frame = {flop_per_frame / 1e6:.1f} MFLOP of score GEMMs")
    backend_used = rq._search_tables().backend
    print(f"gemma-rvq search kernel: {backend_used}, search_chunk_size={rq.search_chunk_size}")

    # -------- candidates, warmed up once each
    def ours():
        return rq.encode(x)

    vq, vq_chunk = None, None
    if not args.skip_vqtorch:
        vq = _vqtorch_rvq(rq, device)
        probe = x[: min(n, 4096)]
        _vqtorch_encode(vq, probe, args.vq_chunks[0])
        chunk_times = {c: min(_time(lambda c=c: _vqtorch_encode(vq, probe, c), device)[0] for _ in range(2))
                       for c in args.vq_chunks}
        vq_chunk = min(chunk_times, key=chunk_times.get)
        print("vector-quantize-pytorch chunk sweep (frames/s on 4096 frames): "
              + ", ".join(f"{c}: {probe.shape[0] / t:,.0f}" for c, t in chunk_times.items())
              + f" -> using {vq_chunk}")

    weights = [w.t() for w in rq._search_tables().weight]
    biases = list(rq._search_tables().bias)
    gemm_kinds = {"addmm": (weights, biases)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        gemm_kinds["onednn"] = (list(rq._search_tables().weight), biases)
        if torch.get_num_threads() > 1 and search._openmp_threads():
            gemm_kinds["onednn-streams"] = gemm_kinds["onednn"]
    # GEMM kernel/chunk sweep on a slice, then the best one on the full input
    probe = x[: min(n, 4096)]
    gemm_probe = {}
    for kind, (ws, bs) in gemm_kinds.items():
        for c in args.sweep:
            _gemm_pass(kind, probe, ws, bs, c)
            gemm_probe[kind, c] = min(_time(lambda kind=kind, ws=ws, bs=bs, c=c: _gemm_pass(kind, probe, ws, bs, c),
                                            device)[0] for _ in range(2))
    print("GEMM sweep (GFLOP/s): " + ", ".join(
        f"{kind}@{c}: {probe.shape[0] * flop_per_frame / t / 1e9:.0f}" for (kind, c), t in gemm_probe.items()))
    gemm_kind, gemm_chunk = min(gemm_probe, key=gemm_probe.get)

    def gemm(xs):
        ws, bs = gemm_kinds[gemm_kind]
        _gemm_pass(gemm_kind, xs, ws, bs, gemm_chunk)

    ours()
    # -------- timed rounds, interleaved slice by slice: the load of a shared machine drifts, so every
    # method sees the same conditions. Wall-clock and process CPU time (/ threads) are both recorded.
    methods = {"gemma-rvq": lambda xs: rq.encode(xs), "gemm": gemm}
    if vq is not None:
        methods["vqtorch"] = lambda xs: _vqtorch_encode(vq, xs, vq_chunk)
    wall = {name: [0.0] * args.repeats for name in methods}
    cpu = {name: [0.0] * args.repeats for name in methods}
    slice_size = max(args.slice_size, rq.search_chunk_size)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for rnd in range(args.repeats):
        order = list(methods)
        for i, start in enumerate(range(0, n, slice_size)):
            xs = x[start:start + slice_size]
            for name in order[i % len(order):] + order[:i % len(order)]:  # rotate who goes first
                w, c = _time(lambda name=name, xs=xs: methods[name](xs), device)
                wall[name][rnd] += w
                cpu[name][rnd] += c
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    fps = {name: n / min(ts) for name, ts in wall.items()}
    fps_median = {name: n / statistics.median(ts) for name, ts in wall.items()}
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    fps_cpu = {name: n / (min(ts) / threads) for name, ts in cpu.items()}
    ratio_rounds = {name: [b / a for a, b in zip(wall["gemma-rvq"], wall[name])] for name in wall}

    # -------- chunk sweep of gemma-rvq itself
    sweep = {}
    default_chunk = rq.search_chunk_size
    for c in args.sweep:
        rq.search_chunk_size = c
        rq.encode(probe)
        sweep[c] = min(_time(lambda: rq.encode(probe), device)[0] for _ in range(2))
    rq.search_chunk_size = default_chunk
    print("gemma-rvq chunk sweep (frames/s on 4096 frames): "
          + ", ".join(f"{c}: {probe.shape[0] / t:,.0f}" for c, t in sweep.items()))

    # -------- correctness and memory
    codes = ours()
    check = min(n, args.check_frames)
    agree = _agreement(rq, x[:check], codes[:check])
    mem = {"gemma-rvq": _peak_extra_memory(ours, device)}
    if vq is not None:
        vq_codes = _vqtorch_encode(vq, x, vq_chunk)
        same_as_vq = float((vq_codes.to(codes.device) == codes).float().mean())
        mem["vqtorch"] = _peak_extra_memory(lambda: _vqtorch_encode(vq, x, vq_chunk), device)

    bound = fps["gemm"]
    print()
    if load_before is not None:
        print(f"load average (1 min) before/after the timed rounds: {load_before[0]:.1f} / {load_after[0]:.1f}")
    print(f"GEMM bound ({gemm_kind}, chunk {gemm_chunk}): {bound * flop_per_frame / 1e9:.0f} GFLOP/s "
          f"-> {bound:,.0f} frames/s for {q} stages")
    print(f"gemma-rvq encode:        {fps['gemma-rvq']:>10,.0f} frames/s (best of {args.repeats}; "
          f"median {fps_median['gemma-rvq']:,.0f})")
    if vq is not None:
        print(f"vector-quantize-pytorch: {fps['vqtorch']:>10,.0f} frames/s (chunk {vq_chunk}; "
              f"median {fps_median['vqtorch']:,.0f})")
        print(f"ratio gemma-rvq / vqtorch:   {fps['gemma-rvq'] / fps['vqtorch']:.2f}x (per round: "
              + ", ".join(f"{r:.2f}" for r in ratio_rounds["vqtorch"]) + "; target >= 3x)")
    print(f"ratio gemma-rvq / GEMM bound: {fps['gemma-rvq'] / bound:.1%} (per round: "
          + ", ".join(f"{r:.0%}" for r in ratio_rounds["gemm"]) + "; target >= 90%)")
    if device.type == "cpu":
        print("CPU-time based (frames per CPU-second x threads; less sensitive to other load): "
              + ", ".join(f"{name} {v:,.0f}" for name, v in fps_cpu.items())
              + f"; gemma-rvq / GEMM {fps_cpu['gemma-rvq'] / fps_cpu['gemm']:.1%}"
              + (f", gemma-rvq / vqtorch {fps_cpu['gemma-rvq'] / fps_cpu['vqtorch']:.2f}x" if vq is not None else ""))
    print(f"exhaustive search agreement on {check} frames x {q} levels: {agree['identical']:.4%} identical; "
          f"{agree['mismatches']} mismatches, {agree['near_ties']} of them near-ties "
          f"(max relative distance gap {agree['max_rel_gap']:.1e})")
    if vq is not None:
        print(f"codes identical to vector-quantize-pytorch: {same_as_vq:.4%}")
    for name, (nbytes, how) in mem.items():
        shown = f"{nbytes / 2**20:,.0f} MiB" if nbytes is not None else "n/a"
        print(f"peak extra memory {name}: {shown} ({how})")


if __name__ == "__main__":
    main()
