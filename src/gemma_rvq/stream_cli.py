"""``gemma-rvq stream``: semantic tokens of an audio file (or the microphone) as they become final.

    gemma-rvq stream speech.wav --model ./my-rvq --chunk-ms 160 --realtime
    gemma-rvq stream --mic --model ./my-rvq --format ichigo      # needs: pip install "gemma-rvq[mic]"

Every chunk that finalised text prints one tab-separated line: the audio position, the compute time of that
chunk (its latency on top of the encoder's algorithmic lookahead), the frame range and the new token text.
A summary (real-time factor, latency percentiles) goes to stderr at the end.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from typing import Any

import numpy as np


def make_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    """The ``stream`` parser: a subcommand of ``gemma-rvq`` when ``subparsers`` is given, else standalone."""
    kwargs = dict(
        description="Stream an audio file (or the microphone) through a gemma-rvq model and print the semantic "
        "tokens as they become final, with the latency of every chunk.",
    )
    if subparsers is None:
        parser = argparse.ArgumentParser(prog="gemma-rvq stream", **kwargs)
    else:
        parser = subparsers.add_parser(
            "stream", help="print tokens of an audio file or the microphone as they become final", **kwargs
        )
    parser.add_argument("file", nargs="?", help="audio file (any rate, downmixed to mono); omit with --mic")
    parser.add_argument(
        "--model", "-m", required=True, help="gemma-rvq checkpoint: a local folder or Hub id"
    )
    parser.add_argument("--chunk-ms", type=float, default=160.0, help="audio per push in ms (default: 160)")
    parser.add_argument(
        "--realtime", action="store_true",
        help="pace the file at real-time speed (a chunk is pushed when its last sample would have been recorded)",
    )
    parser.add_argument("--mic", action="store_true", help="record from the default microphone (Ctrl-C ends)")
    parser.add_argument("--format", default="gemma_rvq", help="token format preset: gemma_rvq, ichigo, spire")
    parser.add_argument("--num-quantizers", type=int, default=None, help="emit only the first k levels")
    parser.add_argument(
        "--lookahead-ms", type=float, default=None,
        help="HuBERT / wav2vec2 / Whisper only: audio each frame waits for (windowed, approximate streaming)",
    )
    parser.add_argument("--context-ms", type=float, default=None, help="windowed streaming: left context")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.set_defaults(func=run)
    return parser


def _file_chunks(path: str, chunk_ms: float, realtime: bool):
    """``(sampling_rate, iterator of mono float32 chunks)`` of an audio file."""
    from .audio import decode_audio, to_float_mono

    wave, rate = decode_audio(path)
    wave = to_float_mono(wave, channels_first=False) if wave.ndim == 2 else to_float_mono(wave)
    size = max(1, round(chunk_ms * rate / 1000))

    def chunks():
        start = time.perf_counter()
        for i in range(0, len(wave), size):
            piece = wave[i : i + size]
            if realtime:  # the chunk is complete when its last sample has been recorded
                delay = start + (i + len(piece)) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            yield piece

    return rate, chunks()


def _mic_chunks(chunk_ms: float, rate: int = 16000):
    """``(sampling_rate, iterator of chunks)`` from the default input device (``sounddevice``)."""
    try:
        import sounddevice
    except ImportError as err:
        raise ImportError('the microphone source needs sounddevice: pip install "gemma-rvq[mic]"') from err
    blocks: queue.Queue = queue.Queue()
    size = max(1, round(chunk_ms * rate / 1000))

    def callback(indata, frames, time_info, status):  # runs on the audio thread
        blocks.put(np.asarray(indata, dtype=np.float32).mean(axis=1).copy())

    def chunks():
        with sounddevice.InputStream(samplerate=rate, channels=1, dtype="float32", blocksize=size, callback=callback):
            print("recording... Ctrl-C ends the utterance", file=sys.stderr)
            try:
                while True:
                    yield blocks.get()
            except KeyboardInterrupt:
                return

    return rate, chunks()


def run(args: argparse.Namespace) -> int:
    """Stream ``args.file`` (or the microphone) and print the tokens; returns the exit status."""
    from .cli import _load_model

    if args.mic == bool(args.file):
        raise ValueError("give an audio file, or --mic (not both)")
    if not args.chunk_ms > 0:
        raise ValueError(f"--chunk-ms must be > 0, got {args.chunk_ms}")
    model = _load_model(args.model, args.device)
    rate, chunks = _mic_chunks(args.chunk_ms) if args.mic else _file_chunks(args.file, args.chunk_ms, args.realtime)
    stream = model.stream(
        rate, args.num_quantizers, token_format=args.format, lookahead_ms=args.lookahead_ms,
        context_ms=args.context_ms,
    )
    print(
        f"# {model.config.encoder_family}: {stream.frame_rate:g} frames/s, lookahead {stream.lookahead_ms:g} ms, "
        f"chunks of {args.chunk_ms:g} ms" + ("" if stream.codes.exact else " (windowed: approximate codes)"),
        file=sys.stderr,
    )
    latencies, received, frames = [], 0, 0
    for piece in chunks:
        received += len(piece)
        tic = time.perf_counter()
        text = stream.push(piece)
        latencies.append(time.perf_counter() - tic)
        _print_line(received / rate, latencies[-1], frames, stream.codes.frames_emitted, text)
        frames = stream.codes.frames_emitted
    tic = time.perf_counter()
    text = stream.flush()
    latencies.append(time.perf_counter() - tic)
    _print_line(received / rate, latencies[-1], frames, stream.codes.frames_emitted, text, last=True)
    audio_s = received / rate
    compute = sum(latencies)
    ms = np.array(latencies) * 1000
    print(
        f"# {stream.codes.frames_emitted} frames from {audio_s:.2f} s of audio; compute {compute:.3f} s "
        f"(real-time factor {compute / max(audio_s, 1e-9):.3f}); per-chunk latency p50 {np.percentile(ms, 50):.1f} ms, "
        f"p95 {np.percentile(ms, 95):.1f} ms, max {ms.max():.1f} ms",
        file=sys.stderr,
    )
    return 0


def _print_line(position: float, latency: float, first: int, stop: int, text: str, last: bool = False) -> None:
    """One tab-separated line: audio position, compute time of the chunk, frames, token text."""
    if not text and not last:
        return
    frames = f"frames {first}-{stop - 1}" if stop > first else "no frame"
    if last:
        frames += " (flush)"
    print(f"{position:8.3f} s\t+{latency * 1000:6.1f} ms\t{frames}\t{text}", flush=True)


__all__ = ["make_parser", "run"]
