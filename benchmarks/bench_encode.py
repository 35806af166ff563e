"""Encoding speed of gemma-rvq's ResidualQuantizer against vector-quantize-pytorch and the GEMM bounds.

Everything runs in ONE process on the same codebooks and data, the methods alternating slice by slice:

(a) ``ResidualQuantizer.encode`` (gemma-rvq) with ``search_precision="auto"`` (int8 scores where this
    device runs an exact int8 GEMM faster, then exact re-scoring) and (a') forced ``"fp32"``;
(b) vector-quantize-pytorch ``ResidualVQ`` in eval mode with the same codebooks copied in, fed in chunks
    (the best of a few chunk sizes);
(c) the fp32 GEMM bound: the bare score GEMMs of an fp32 search at this shape (``torch.addmm`` and, on
    CPU, the oneDNN linear, multi-threaded or as one single-threaded stream per thread; the best chunk
    size and kernel, and never below the best rate measured anywhere in the run), in frames/s for ``Q``
    stages; and (c') the same for the int8 kernel (a)'s int8 path uses: its own ceiling.

Also printed: the machine's GEMM rates at this shape (fp32, bf16, int8), the candidate-set sizes and
fallback rates of the bound-and-rescore search, agreement with a float64 exhaustive search, and the peak
extra memory of each method (CPU: peak resident set after resetting it through
``/proc/self/clear_refs``, minus the resident size before; CUDA: ``max_memory_allocated`` delta).

Data: ``--codebooks random`` (default): correlated Gaussian frames and seed-shaped codebooks (level l =
residuals of fresh frames after levels < l, so no code is a copy of another). ``--model DIR --frames
CACHE``: a trained gemma-rvq model's codebooks and real frames from an embedding cache. ``--kmeans TRAIN
--frames CACHE``: codebooks fitted by residual k-means on one cache (any ``-Q``/``-K``), frames of another.

Examples::

    python benchmarks/bench_encode.py                    # Q=8, K=2048, D=1024, N=20000, 2 threads
    python benchmarks/bench_encode.py --model runs/logmel/best --frames cache/dev -N 20000
    python benchmarks/bench_encode.py --kmeans cache/train --frames cache/dev -K 2048   # k-means codebooks
    python benchmarks/bench_encode.py --device cuda -N 1000000 --check-frames 8192   # the GPU benchmark
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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


# ---------------------------------------------------------------------------------------------- data
def _make_data(args, device: torch.device) -> tuple[ResidualQuantizer, torch.Tensor]:
    """Correlated Gaussian frames and seed-shaped codebooks: level l holds the residuals of K fresh frames
    after the levels before it (fresh, so that no code is a copy or a residual of another)."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    d = args.dim
    spectrum = torch.arange(1, d + 1, dtype=torch.float32, device=device).rsqrt()  # decaying, like embeddings
    mix = torch.linalg.qr(torch.randn(d, d, generator=gen, device=device))[0] * spectrum
    x = torch.empty(args.num_frames, d, device=device)
    for start in range(0, args.num_frames, 65536):  # bounded temporaries at N = 1M
        x[start:start + 65536] = torch.randn(min(65536, args.num_frames - start), d, generator=gen,
                                             device=device) @ mix.t()
    rq = ResidualQuantizer(d, args.num_quantizers, args.codebook_size, search_chunk_size=args.chunk_size,
                           search_precision=args.precision).to(device).eval()
    for level in range(args.num_quantizers):
        fresh = torch.randn(args.codebook_size, d, generator=gen, device=device) @ mix.t()
        if level:
            fresh -= rq.decode(rq.encode(fresh, num_quantizers=level))
        rq.codebooks.data[level] = fresh
        rq.invalidate_cache()
    return rq, x


def _load_data(args, device: torch.device) -> tuple[ResidualQuantizer, torch.Tensor]:
    """A trained model's quantizer (``--model``) or codebooks fitted by k-means (``--kmeans``) and real frames
    (projected as the model does) from an embedding cache."""
    from gemma_rvq import GemmaRVQModel
    from gemma_rvq.training.cache import EmbeddingCache

    if not args.frames:
        raise SystemExit("--model and --kmeans need --frames (an embedding cache folder)")
    if args.kmeans:
        train = EmbeddingCache(args.kmeans)
        rq = ResidualQuantizer(train.dim, args.num_quantizers, args.codebook_size, search_chunk_size=args.chunk_size,
                               search_precision=args.precision).eval()
        start = time.perf_counter()
        rq.kmeans_init(train.sample_frames(None, seed=args.seed).float(), num_iters=args.kmeans_iters,
                       seed=args.seed, init="random")
        print(f"k-means codebooks: {args.num_quantizers} x {args.codebook_size} on {train.num_frames} frames of "
              f"{args.kmeans} in {time.perf_counter() - start:.0f} s")
        frames = EmbeddingCache(args.frames).sample_frames(args.num_frames, seed=args.seed).float()
        args.dim = rq.dim
        args.num_frames = frames.shape[0]
        return rq.to(device), frames.to(device)
    model = GemmaRVQModel.from_pretrained(args.model).eval()
    frames = EmbeddingCache(args.frames).sample_frames(args.num_frames, seed=args.seed)
    with torch.no_grad():
        x = model.project_in(frames.to(model.dtype)).float()
    rq = model.quantizer.to(device)
    rq.search_chunk_size = args.chunk_size
    rq.search_precision = args.precision
    args.num_quantizers, args.codebook_size, args.dim = rq.num_quantizers, rq.codebook_size, rq.dim
    args.num_frames = x.shape[0]
    return rq, x.to(device)


# ---------------------------------------------------------------------------------------------- baselines
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


def _gemm_pass(kind: str, x: torch.Tensor, mats: list, biases: list, chunk: int) -> None:
    """The Q score GEMMs of an encode (no argmax, no residual update): the kernel-bound part.

    ``addmm`` / ``onednn`` / ``bf16``: one multi-threaded GEMM after the other. ``*-streams``: chunks
    spread over one single-threaded stream per torch thread (the quantizer's own pool), i.e. the
    GEMM-only version of how ``encode`` runs on CPU. ``int8``: the int8 kernel of the search, with the
    ``mats`` its per-level objects (``x`` pre-quantized rows).
    """
    if kind.endswith("-streams"):
        pool = search._search_pool(torch.get_num_threads())
        base = kind[: -len("-streams")]

        def task(start: int) -> None:
            with torch.no_grad():
                _gemm_pass(base, x[start:start + chunk], mats, biases, chunk)

        list(pool.map(task, range(0, x.shape[0], chunk)))
        return
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            xc = x[start:start + chunk]
            for m, b in zip(mats, biases):
                if kind == "onednn":
                    torch.ops.mkldnn._linear_pointwise(xc, m, b, "none", [], "")
                elif kind == "int8":
                    m.scores(xc)
                else:  # addmm, bf16
                    torch.addmm(b, xc, m)


def _gemm_kinds(rq: ResidualQuantizer, x: torch.Tensor, device: torch.device) -> dict[str, tuple]:
    """Score-GEMM variants: name -> (family, input rows, per-level matrices, per-level biases)."""
    tables = copy.copy(rq)
    tables.search_precision = "fp32"
    t32 = tables._search_tables()
    streams = device.type == "cpu" and torch.get_num_threads() > 1 and search._openmp_threads()
    kinds = {"addmm": ("fp32", x, [w.t() for w in t32.weight], list(t32.bias))}
    if device.type == "cpu" and search._onednn_usable(device):
        kinds["onednn"] = ("fp32", x, list(t32.weight), list(t32.bias))
        if streams:
            kinds["onednn-streams"] = kinds["onednn"]
    xb = x.bfloat16()
    kinds["bf16"] = ("bf16", xb, [w.t().bfloat16() for w in t32.weight], [b.bfloat16() for b in t32.bias])
    kernel = search._int8_kernel(device, rq.dim, rq.codebook_size)
    if kernel is not None:
        int8 = search._Int8Tables(t32.weight, t32.bias, kernel)
        y = x.clamp(-127, 127).round()
        xq = int8.levels[0].quantize(y)
        if int8.dim_pad:
            xq = torch.nn.functional.pad(xq, (0, int8.dim_pad))
        kinds["int8"] = ("int8", xq, int8.levels, [None] * len(int8.levels))
        if streams:
            kinds["int8-streams"] = kinds["int8"]
    return kinds


# ---------------------------------------------------------------------------------------------- checks
def _reference(rq: ResidualQuantizer, x: torch.Tensor) -> torch.Tensor:
    """float64 exhaustive search over the fp32 residual the quantizer keeps -> ``[N, Q]`` (first best)."""
    r = x.float()
    out = []
    for level in range(rq.num_quantizers):
        c = rq.codebooks[level].float()
        c64 = c.double()
        half = 0.5 * c64.square().sum(1)
        code = torch.cat([(rc.double() @ c64.t() - half).argmax(1) for rc in r.split(4096)])
        out.append(code)
        r = r - c[code]
    return torch.stack(out, 1)


def _agreement(rq: ResidualQuantizer, x: torch.Tensor, codes: torch.Tensor, rel: float = 1e-5) -> dict:
    """Compare ``codes`` with a float64 exhaustive search in float64 throughout, teacher-forced on ``codes``
    (so one near-tie cannot cascade); a disagreement is a near-tie if its distance gap is <= rel * scale."""
    r = x.double()
    cb = rq.codebooks.double()
    mismatches, near_ties, max_gap = 0, 0, 0.0
    for level in range(codes.shape[1]):
        c = cb[level]
        best = torch.empty(r.shape[0], dtype=torch.long, device=r.device)
        gap = torch.empty(r.shape[0], dtype=torch.float64, device=r.device)
        scale = torch.empty(r.shape[0], dtype=torch.float64, device=r.device)
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
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = ""
    if match := re.search(r"^model name\s*:\s*(.+)$", info, re.M):
        cpu = match.group(1)
    if match := re.search(r"^flags\s*:\s*(.+)$", info, re.M):
        have = set(match.group(1).split())
        flags = [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in have]
    return f"{cpu}, {os.cpu_count()} logical CPUs" + (f" [{' '.join(flags)}]" if flags else "")


# ---------------------------------------------------------------------------------------------- main
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-quantizers", "-Q", type=int, default=8)
    p.add_argument("--codebook-size", "-K", type=int, default=2048)
    p.add_argument("--dim", "-D", type=int, default=1024)
    p.add_argument("--num-frames", "-N", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=search.SEARCH_PRECISIONS,
                   help="search_precision of method (a); (a') is always fp32")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="gemma-rvq search_chunk_size (default: 1024 on CPU, 32768 on CUDA)")
    p.add_argument("--sweep", type=int, nargs="*", default=None,
                   help="chunk sizes for the GEMM bound (default: 256-2048 on CPU, 8192-65536 on CUDA)")
    p.add_argument("--vq-chunks", type=int, nargs="*", default=None,
                   help="chunk sizes tried for vector-quantize-pytorch (default: 512-4096 CPU, 16384-65536 CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slice-size", type=int, default=None,
                   help="the timed rounds alternate the methods on slices of this many frames "
                        "(default 4096 on CPU, 262144 on CUDA)")
    p.add_argument("--check-frames", type=int, default=4096, help="frames compared with exhaustive search")
    p.add_argument("--skip-vqtorch", action="store_true")
    p.add_argument("--model", default=None, help="a trained gemma-rvq model folder: use its codebooks")
    p.add_argument("--frames", default=None,
                   help="with --model or --kmeans: an embedding cache folder to take frames from")
    p.add_argument("--kmeans", default=None, metavar="CACHE",
                   help="codebooks trained by residual k-means (-Q levels of -K codes; gemma-rvq's training "
                        "initialisation: --kmeans-iters Lloyd iterations per level, random seeding) on all "
                        "frames of this embedding cache; encodes --frames")
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(encode) (default backend, inductor: the traceable search) "
                        "against eager encode")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.chunk_size = args.chunk_size or (32768 if cuda else 1024)
    sweep = args.sweep or ([8192, 32768, 65536] if cuda else [256, 512, 1024, 2048])
    vq_chunks = args.vq_chunks or ([16384, 65536] if cuda else [512, 1024, 2048, 4096])
    slice_size = args.slice_size or (262144 if cuda else 4096)
    torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 everywhere, as the quantizer does
    torch.manual_seed(args.seed)

    rq, x = _load_data(args, device) if args.model or args.kmeans else _make_data(args, device)
    rq32 = copy.copy(rq)  # shares the codebooks; its own search cache
    rq32.search_precision = "fp32"
    rq32._search_cache = None
    q, k, d, n = rq.num_quantizers, rq.codebook_size, rq.dim, x.shape[0]
    flop_per_frame = 2 * d * k * q
    tables = rq._search_tables()
    print(f"machine: {_machine(device)}; torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"device={device}")
    print(f"shape: Q={q} K={k} D={d} N={n}; one frame = {flop_per_frame / 1e6:.1f} MOP of score GEMMs; data: "
          + (f"model {args.model}, frames {args.frames}" if args.model
             else f"k-means codebooks on {args.kmeans}, frames {args.frames}" if args.kmeans
             else "random seed-shaped codebooks"))
    print(f"gemma-rvq search: precision={tables.precision} (requested {args.precision})"
          + (f", int8 kernel {tables.int8.kernel}" if tables.int8 is not None else "")
          + f", fp32 kernel {tables.backend}, search_chunk_size={rq.search_chunk_size}")

    # -------- the machine's GEMM rates at this shape (kernel x chunk sweep on a probe slice)
    probe = x[: min(n, 4096 if not cuda else 262144)]
    kinds = _gemm_kinds(rq, probe, device)
    rates: dict[tuple[str, int], float] = {}
    for kind, (_, xs, mats, biases) in kinds.items():
        for c in sweep:
            _gemm_pass(kind, xs, mats, biases, c)
            t = min(_time(lambda kind=kind, xs=xs, mats=mats, biases=biases, c=c: _gemm_pass(kind, xs, mats, biases, c),
                          device)[0] for _ in range(2))
            rates[kind, c] = xs.shape[0] * flop_per_frame / t
    best = {}
    for (kind, c), rate in rates.items():
        family = kinds[kind][0]
        if family not in best or rate > best[family][0]:
            best[family] = (rate, kind, c)
    print("machine GEMM rates at this shape (G(FL)OP/s, best kernel and chunk): "
          + ", ".join(f"{fam} {r / 1e9:.0f} ({kind}, {c})" for fam, (r, kind, c) in best.items()))
    print("  sweep: " + ", ".join(f"{kind}@{c}: {r / 1e9:.0f}" for (kind, c), r in rates.items()))

    def bound_pass(family: str) -> Callable[[torch.Tensor, slice], None]:
        _, kind, c = best[family]
        _, template, mats, biases = kinds[kind]
        rows = x if family == "fp32" else _int8_rows(template, x)  # converted once, outside the timing

        def run(xs: torch.Tensor, where: slice) -> None:
            _gemm_pass(kind, rows[where], mats, biases, c)
        return run

    # -------- candidates, warmed up once each
    vq, vq_chunk = None, None
    if not args.skip_vqtorch:
        vq = _vqtorch_rvq(rq, device)
        vprobe = x[: min(n, 4096 if not cuda else 65536)]
        _vqtorch_encode(vq, vprobe, vq_chunks[0])
        chunk_times = {c: min(_time(lambda c=c: _vqtorch_encode(vq, vprobe, c), device)[0] for _ in range(2))
                       for c in vq_chunks}
        vq_chunk = min(chunk_times, key=chunk_times.get)
        print("vector-quantize-pytorch chunk sweep (frames/s on the probe): "
              + ", ".join(f"{c}: {vprobe.shape[0] / t:,.0f}" for c, t in chunk_times.items()) + f" -> using {vq_chunk}")
    rq.encode(x[:slice_size])
    rq32.encode(x[:slice_size])

    methods: dict[str, Callable[[torch.Tensor, slice], object]] = {
        "gemma-rvq": lambda xs, w: rq.encode(xs), "gemma-rvq fp32": lambda xs, w: rq32.encode(xs),
        "fp32 GEMM": bound_pass("fp32")}
    fused = tables.precision == "int8" and search._fused_kernels(tables) is not None
    if fused:  # the same int8 search with the eager torch steps instead of the fused numba kernels
        rq8 = copy.copy(rq)
        rq8._search_cache = None

        def eager_encode(xs: torch.Tensor, where: slice) -> torch.Tensor:
            search.FUSED_KERNELS = False
            try:
                return rq8.encode(xs)
            finally:
                search.FUSED_KERNELS = True
        eager_encode(x[:slice_size], slice(0, slice_size))
        methods["gemma-rvq eager int8"] = eager_encode
    print("int8 search steps: " + ("fused numba kernels (search_kernels.py); also timed: the eager torch steps"
                                   if fused else "eager torch steps"))
    if "int8" in best and tables.precision == "int8":
        methods["int8 GEMM"] = bound_pass("int8")
    if vq is not None:
        methods["vqtorch"] = lambda xs, w: _vqtorch_encode(vq, xs, vq_chunk)
    compiled_codes_equal = None
    if args.compile:
        # rq32's module is compiled (its search path under tracing does not depend on the precision)
        compiled = torch.compile(rq32.encode)
        start = time.perf_counter()
        sizes = {min(slice_size, n)} | ({n % slice_size} if n % slice_size else set())  # the timed slices' sizes
        compiled_codes_equal = all(torch.equal(compiled(x[:m]), rq.encode(x[:m])) for m in sorted(sizes))
        print(f"torch.compile(encode) (inductor): compiled and warmed up in {time.perf_counter() - start:.0f} s; "
              f"codes identical to eager: {compiled_codes_equal}")
        methods["gemma-rvq compiled"] = lambda xs, w: compiled(xs)
    # -------- timed rounds, interleaved slice by slice: the load of a shared machine drifts, so every
    # method sees the same conditions. Wall-clock and process CPU time (/ threads) are both recorded.
    wall = {name: [0.0] * args.repeats for name in methods}
    cpu = {name: [0.0] * args.repeats for name in methods}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for rnd in range(args.repeats):
        order = list(methods)
        for i, start in enumerate(range(0, n, slice_size)):
            where = slice(start, start + slice_size)
            xs = x[where]
            for name in order[i % len(order):] + order[:i % len(order)]:  # rotate who goes first
                w, c = _time(lambda name=name, xs=xs, where=where: methods[name](xs, where), device)
                wall[name][rnd] += w
                cpu[name][rnd] += c
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    fps = {name: n / min(ts) for name, ts in wall.items()}
    fps_median = {name: n / statistics.median(ts) for name, ts in wall.items()}
    threads = torch.get_num_threads() if not cuda else 1
    fps_cpu = {name: n / (min(ts) / threads) for name, ts in cpu.items()}
    ratio_rounds = {name: [b / a for a, b in zip(wall["gemma-rvq"], wall[name])] for name in wall}
    # the bounds: never below a rate measured anywhere in this run
    bound32 = max(fps["fp32 GEMM"], best["fp32"][0] / flop_per_frame)
    bound8 = max(fps["int8 GEMM"], best["int8"][0] / flop_per_frame) if "int8 GEMM" in fps else None

    # -------- search statistics, correctness and memory
    stats = search.SearchStats()
    rq._search_tables().stats = stats
    codes = rq.encode(x)
    rq._search_tables().stats = None
    codes32 = rq32.encode(x)
    check = min(n, args.check_frames)
    reference = _reference(rq, x[:check])
    same_ref = float((codes[:check] == reference).float().mean())
    same_ref32 = float((codes32[:check] == reference).float().mean())
    agree = _agreement(rq, x[:check], codes[:check])
    mem = {"gemma-rvq": _peak_extra_memory(lambda: rq.encode(x), device),
           "gemma-rvq fp32": _peak_extra_memory(lambda: rq32.encode(x), device)}
    if "gemma-rvq eager int8" in methods:
        mem["gemma-rvq eager int8"] = _peak_extra_memory(lambda: methods["gemma-rvq eager int8"](x, slice(None)), device)
    same_as_vq = None
    if vq is not None:
        vq_codes = _vqtorch_encode(vq, x, vq_chunk)
        same_as_vq = float((vq_codes.to(codes.device) == codes).float().mean())
        mem["vqtorch"] = _peak_extra_memory(lambda: _vqtorch_encode(vq, x, vq_chunk), device)

    print()
    if load_before is not None:
        print(f"load average (1 min) before/after the timed rounds: {load_before[0]:.1f} / {load_after[0]:.1f}")
    gemm_rates = ", ".join(f"{fam} {r / 1e9:.0f} G(FL)OP/s" for fam, (r, _, _) in best.items())
    print(f"machine GEMM rates (this run): {gemm_rates}")
    print(f"fp32 GEMM bound ({best['fp32'][1]}, chunk {best['fp32'][2]}): {bound32 * flop_per_frame / 1e9:.0f} "
          f"GFLOP/s -> {bound32:,.0f} frames/s for {q} stages")
    if bound8 is not None:
        print(f"int8 GEMM bound ({best['int8'][1]}, chunk {best['int8'][2]}): {bound8 * flop_per_frame / 1e9:.0f} "
              f"GOP/s -> {bound8:,.0f} frames/s")
    for name in ("gemma-rvq", "gemma-rvq eager int8", "gemma-rvq fp32", "vqtorch", "gemma-rvq compiled"):
        if name in fps:
            print(f"{name + ':':24s}{fps[name]:>12,.0f} frames/s (best of {args.repeats}; median {fps_median[name]:,.0f})")
    print(f"ratio gemma-rvq / fp32 GEMM bound: {fps['gemma-rvq'] / bound32:.2f}x (per round vs the round's "
          "GEMM: " + ", ".join(f"{r:.2f}" for r in ratio_rounds["fp32 GEMM"]) + "; target >= 1.8x)  "
          f"[fp32 GEMM {best['fp32'][0] / 1e9:.0f} GFLOP/s]")
    if bound8 is not None:
        print(f"ratio gemma-rvq / int8 GEMM bound: {fps['gemma-rvq'] / bound8:.1%} (per round: "
              + ", ".join(f"{r:.0%}" for r in ratio_rounds["int8 GEMM"]) + f")  [int8 GEMM {best['int8'][0] / 1e9:.0f} "
              "GOP/s]")
    if "gemma-rvq eager int8" in fps:
        print(f"ratio gemma-rvq (fused kernels) / eager int8 steps: {fps['gemma-rvq'] / fps['gemma-rvq eager int8']:.2f}x "
              "(per round: " + ", ".join(f"{r:.2f}" for r in ratio_rounds["gemma-rvq eager int8"]) + "); eager / fp32 "
              f"GEMM bound: {fps['gemma-rvq eager int8'] / bound32:.2f}x")
    print(f"ratio gemma-rvq fp32 / fp32 GEMM bound: {fps['gemma-rvq fp32'] / bound32:.1%} (per round: "
          + ", ".join(f"{a / b:.0%}" for a, b in zip(ratio_rounds["fp32 GEMM"], ratio_rounds["gemma-rvq fp32"]))
          + ")")
    if vq is not None:
        print(f"ratio gemma-rvq / vqtorch: {fps['gemma-rvq'] / fps['vqtorch']:.2f}x (per round: "
              + ", ".join(f"{r:.2f}" for r in ratio_rounds["vqtorch"]) + "; target >= 3x CPU, >= 10x GPU)  "
              f"[{gemm_rates}]")
        print(f"ratio gemma-rvq fp32 / vqtorch: {fps['gemma-rvq fp32'] / fps['vqtorch']:.2f}x")
    if "gemma-rvq compiled" in fps:
        print(f"ratio torch.compile(encode) / eager encode: {fps['gemma-rvq compiled'] / fps['gemma-rvq']:.2f}x "
              f"(eager {tables.precision}); / eager fp32: {fps['gemma-rvq compiled'] / fps['gemma-rvq fp32']:.2f}x "
              "(per round: " + ", ".join(f"{a / b:.2f}" for a, b in zip(ratio_rounds["gemma-rvq fp32"],
                                                                       ratio_rounds["gemma-rvq compiled"])) + ")")
    if not cuda:
        print("CPU-time based (frames per CPU-second x threads; less sensitive to other load): "
              + ", ".join(f"{name} {v:,.0f}" for name, v in fps_cpu.items())
              + f"; gemma-rvq / fp32 GEMM {fps_cpu['gemma-rvq'] / fps_cpu['fp32 GEMM']:.2f}x"
              + (f", gemma-rvq / vqtorch {fps_cpu['gemma-rvq'] / fps_cpu['vqtorch']:.2f}x" if vq is not None else ""))
    s = stats.summary()
    print(f"search ({tables.precision}): candidates per frame and level mean {s['mean_candidates']:.2f}, max "
          f"{s['max_candidates']}; re-scored {s['rescored_rate']:.1%} of rows, decided in float64 "
          f"{s['exact_rate']:.3%}, int8 fallback to fp32 scores {s['fallback_rate']:.3%}, float64 over all codes "
          f"{s['exhaustive_rate']:.3%}")
    print(f"codes identical to float64 exhaustive search on {check} frames x {q} levels: gemma-rvq {same_ref:.4%}, "
          f"gemma-rvq fp32 {same_ref32:.4%}; float64 residuals, teacher-forced: {agree['identical']:.4%} "
          f"({agree['mismatches']} mismatches, {agree['near_ties']} near-ties, max relative gap "
          f"{agree['max_rel_gap']:.1e})")
    print(f"codes identical between gemma-rvq and gemma-rvq fp32 (all {n} frames): "
          f"{float((codes == codes32).float().mean()):.4%}")
    if same_as_vq is not None:
        print(f"codes identical to vector-quantize-pytorch: {same_as_vq:.4%}")
    for name, (nbytes, how) in mem.items():
        shown = f"{nbytes / 2**20:,.0f} MiB" if nbytes is not None else "n/a"
        print(f"peak extra memory {name}: {shown} ({how})")
    return {"fps": fps, "bound_fp32": bound32, "bound_int8": bound8, "stats": s, "identical": same_ref,
            "identical_fp32": same_ref32, "same_as_vqtorch": same_as_vq,
            "compiled_codes_equal": compiled_codes_equal, "rates": {f: r for f, (r, _, _) in best.items()}}


def _int8_rows(template: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Int8 rows shaped like ``template`` for the int8 GEMM bound (values do not matter for speed)."""
    y = xs.clamp(-127, 127).round().to(torch.int8)
    if template.dtype == torch.uint8:
        y = y.view(torch.uint8)
    if y.shape[1] != template.shape[1]:
        y = torch.nn.functional.pad(y, (0, template.shape[1] - y.shape[1]))
    return y


if __name__ == "__main__":
    main()
