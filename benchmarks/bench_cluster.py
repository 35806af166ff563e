"""What the datatrove front end costs: the local executor against ``dataset.map(num_proc=...)``.

Both run the same transform (``SpeechTokenizer`` on a saved model folder, so each worker process loads
its own copy, as on a cluster) over the same clips: the committed espeak-ng corpus (22.05 kHz FLAC bytes
in an ``Audio(decode=False)`` column of a dataset saved to disk), repeated ``--repeat`` times.

(a) ``ds.map(SpeechTokenizer(model_dir), batched=True, num_proc=W)``: forked workers, Arrow cache files.
(b) ``gemma-rvq``'s datatrove pipeline on the local executor, ``tasks=W, workers=W``:
    ``AudioDatasetReader`` -> ``SpeechTokenizerStep`` -> ``TokenizedParquetWriter``, forked workers,
    completion markers, stats and Parquet shards; the Parquet output is loaded back with
    ``datasets.load_dataset`` and compared with (a), row for row.

Rounds alternate (a, b, a, b, ...); the best round of each is reported, with the load average: only the
ratio of the two, measured in one run, means anything on shared machines. The model is a random tiny
Gemma 4 audio encoder (hidden 64, 2 layers) with an 8 x 2048 RVQ, as in bench_tokenize.py; the script
also prints the output size per audio hour (Parquet, token strings + codes + frame counts).

    python benchmarks/bench_cluster.py                     # the corpus once, 2 workers, 3 rounds
    python benchmarks/bench_cluster.py --repeat 4 --workers 2 --rounds 2

On a GPU, ``--gpu`` uses the full-size random Gemma 4 audio encoder (hidden 1024, 12 layers) with the
8 x 2048 RVQ in bfloat16, on ``--minutes`` of 2-20 s clips cut from the corpus (16 kHz FLAC bytes), and
runs the executor with 1, 2, 4... workers sharing the one GPU (each task process holds its own model and
does its own decoding and feature extraction), against ``map`` with ``num_proc`` alike:

    python benchmarks/bench_cluster.py --gpu --minutes 40 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import datasets
from datasets import Audio, Dataset

from gemma_rvq.cluster import AudioDatasetReader, build_pipeline, make_executor
from gemma_rvq.testing import tiny_rvq_model
from gemma_rvq.transforms import SpeechTokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"


def corpus_dataset(folder: Path, repeat: int) -> tuple[str, float]:
    """The corpus's FLAC files as they are (22.05 kHz), ``repeat`` times."""
    rows = [json.loads(line) for line in (CORPUS / "metadata.jsonl").read_text().splitlines() if line]
    rows = [
        {"id": f"{r['id']}_{k}", "text": r["text"], "duration": r["duration"],
         "audio": {"bytes": (CORPUS / r["file"]).read_bytes(), "path": r["file"]}}
        for k in range(repeat) for r in rows
    ]  # fmt: skip
    Dataset.from_list(rows).cast_column("audio", Audio(decode=False)).save_to_disk(str(folder))
    return str(folder), sum(r["duration"] for r in rows)


def cut_clips_dataset(folder: Path, minutes: float, seed: int = 0) -> tuple[str, float]:
    """2-20 s clips cut from the concatenated corpus, resampled to 16 kHz, as FLAC bytes."""
    import io

    import numpy as np
    import soundfile
    import soxr

    rows = [json.loads(line) for line in (CORPUS / "metadata.jsonl").read_text().splitlines() if line]
    waves = []
    for row in rows:
        wave, rate = soundfile.read(CORPUS / row["file"], dtype="float32")
        waves.append(soxr.resample(wave, rate, 16000))
    stream = np.concatenate(waves)
    rng = np.random.default_rng(seed)
    clips, total = [], 0.0
    while total < minutes * 60:
        n = int(rng.uniform(2.0, 20.0) * 16000)
        start = int(rng.integers(0, max(1, len(stream) - n)))
        buffer = io.BytesIO()
        soundfile.write(buffer, stream[start:start + n], 16000, format="FLAC")
        clips.append({"id": f"clip_{len(clips):05d}", "audio": {"bytes": buffer.getvalue(), "path": None}})
        total += n / 16000
    Dataset.from_list(clips).cast_column("audio", Audio(decode=False)).save_to_disk(str(folder))
    return str(folder), total


def run_map(dataset: str, model: str, workers: int, dtype: str | None) -> tuple[float, Dataset]:
    start = time.perf_counter()
    ds = datasets.load_from_disk(dataset)
    tok = SpeechTokenizer(model, return_codes=True, return_num_frames=True, dtype=dtype)
    out = ds.map(tok, batched=True, num_proc=workers if workers > 1 else None, with_rank=True,
                 load_from_cache_file=False, remove_columns=["audio"])
    return time.perf_counter() - start, out


def run_datatrove(dataset: str, model: str, workers: int, output: Path, dtype: str | None) -> tuple[float, Dataset]:
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    tokenizer = SpeechTokenizer(model, return_codes=True, return_num_frames=True, dtype=dtype)
    pipeline = build_pipeline(AudioDatasetReader(dataset, load_from_disk=True), tokenizer, str(output))
    make_executor("local", pipeline, tasks=workers, workers=workers, logging_dir=str(output / "logs")).run()
    elapsed = time.perf_counter() - start
    return elapsed, datasets.load_dataset(str(output), split="train")


def agreement(a: Dataset, b: Dataset) -> float:
    """Share of rows whose token strings are identical (row order is the dataset's in both)."""
    assert a["id"] == b["id"], "row order differs"
    return sum(x == y for x, y in zip(a["semantic_tokens"], b["semantic_tokens"])) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="corpus copies (35 clips, 77 s of audio each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="map num_proc = executor workers = tasks")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="full-size Gemma 4 encoder in bf16 on the GPU")
    parser.add_argument("--minutes", type=float, default=40.0, help="with --gpu: minutes of clips")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.gpu:  # CUDA in forked map workers is unsafe (the executor picks forkserver by itself)
        import multiprocess

        multiprocess.set_start_method("spawn", force=True)
    datasets.disable_progress_bars()
    from loguru import logger

    logger.remove()  # datatrove's per-task logs still go to the logging folder
    work = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    try:
        model = str(work / "model")
        dtype = "bfloat16" if args.gpu else None
        size = {"encoder_kwargs": {"hidden_size": 1024, "num_hidden_layers": 12}} if args.gpu else {}
        tiny_rvq_model(num_quantizers=8, codebook_size=2048, seed=0, **size).save_pretrained(model)
        if args.gpu:
            dataset, seconds = cut_clips_dataset(work / "clips", args.minutes)
        else:
            dataset, seconds = corpus_dataset(work / "corpus", args.repeat)
        print(f"{seconds:.1f} s of audio, load average {os.getloadavg()[0]:.1f}", flush=True)
        # Runs with one worker go last: they run in this process (datasets' map with num_proc=1 and
        # datatrove's executor with workers=1 alike) and would initialise CUDA here.
        order = [(kind, w) for w in sorted(args.workers, reverse=True) for kind in ("datatrove", "map")]
        times: dict[tuple[str, int], list[float]] = {}
        outputs: dict[tuple[str, int], Dataset] = {}
        for r in range(args.rounds):
            for kind, w in order:
                if kind == "map":
                    t, out = run_map(dataset, model, w, dtype)
                else:
                    t, out = run_datatrove(dataset, model, w, work / f"out{w}", dtype)
                times.setdefault((kind, w), []).append(t)
                outputs[(kind, w)] = out
                print(f"round {r}: {kind} with {w} worker(s): {t:.2f} s = {seconds / t:.1f}x real time; "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        for w in args.workers:
            t_map, t_dt = min(times[("map", w)]), min(times[("datatrove", w)])
            same = agreement(outputs[("map", w)], outputs[("datatrove", w)])
            print(f"best, {w} worker(s): map {t_map:.2f} s ({seconds / t_map:.1f}x), datatrove {t_dt:.2f} s "
                  f"({seconds / t_dt:.1f}x); datatrove / map wall time = {t_dt / t_map:.2f}; identical token "
                  f"strings: {same:.1%} of rows", flush=True)
            if not args.gpu:
                assert same == 1.0 and outputs[("map", w)]["audio_codes"] == outputs[("datatrove", w)]["audio_codes"]
        size_bytes = sum(p.stat().st_size for p in (work / f"out{args.workers[0]}" / "data").iterdir())
        print(f"output: {size_bytes / seconds * 3600 / 2**20:.1f} MiB of Parquet per audio hour "
              f"(token strings + codes, 8 x 2048, gemma_rvq format)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
