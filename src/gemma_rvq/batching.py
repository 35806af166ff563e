"""How a transform feeds clips to the encoder: length-sorted minibatches, and on a CPU the batch plan.

:class:`BatchPlanner` decides, before each encoder call, how many clips go in one call, how many padded
seconds that call may hold, and on a CPU how many calls run at once (``cpu_streams``). ``"auto"`` on a
CPU means one clip per call (padded batches were measured 2-3x slower per audio second there) and 1 or
2 concurrent calls, whichever is faster per audio second over the first clips (each setting timed twice
on >= 5 s of audio). :func:`encode_sorted` runs the plan: clips sorted longest first, cut into
minibatches that stay within the plan and the padding budget, results written back in input order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .model_registry import is_warm, mark_warm

logger = logging.getLogger(__name__)

STAT_KEYS = ("examples", "errors", "audio_seconds", "padded_seconds", "encode_calls", "encode_seconds")
"""Running totals a transform keeps (``SpeechTokenizer.stats``)."""


@dataclass
class _Trial:
    count: int
    streams: int
    seconds: float = 0.0
    audio: float = 0.0


@dataclass
class BatchPlanner:
    """The batch plan of one transform in one process (see the module docstring).

    Args:
        batch_size: most clips per encoder call, or ``"auto"``: 64 on a GPU, 1 on a CPU.
        batch_seconds: most padded audio seconds per encoder call.
        max_padding: a minibatch takes another clip only while padding stays within this share of it.
        cpu_streams: concurrent encoder calls on a CPU, or ``"auto"`` (1 or 2, timed).
    """

    batch_size: int | str = "auto"
    batch_seconds: float = 60.0
    max_padding: float = 0.1
    cpu_streams: int | str = "auto"
    _trials: list[_Trial] | None = field(default=None, repr=False)
    _next: int = field(default=0, repr=False)
    _chosen: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def choice(self) -> dict | None:
        """What ``"auto"`` chose on a CPU (``{"count", "streams"}``), once the timing is done; else None."""
        return {"count": self._chosen[0], "streams": self._chosen[1]} if self._chosen is not None else None

    def plan(self, model: torch.nn.Module) -> tuple[int, float, int, _Trial | None]:
        """(max clips, max padded seconds, concurrent minibatches, timing slot or None) for the next step."""
        on_cpu = next(model.parameters()).device.type == "cpu"
        fixed_streams = None if self.cpu_streams == "auto" else int(self.cpu_streams)
        if not on_cpu:
            count = 64 if self.batch_size == "auto" else int(self.batch_size)
            seconds = max(self.batch_seconds, 240.0) if self.batch_size == "auto" else self.batch_seconds
            return count, seconds, 1, None
        if self.batch_size != "auto" and fixed_streams is not None:
            return int(self.batch_size), self.batch_seconds, fixed_streams, None
        if self._chosen is not None:
            return self._chosen[0], self.batch_seconds, self._chosen[1], None
        if self._trials is None:
            # CPU: one clip per call. Measured on the tiny and small Gemma 4 encoders, padded batches of 4
            # or 16 ran 2-3x slower per audio second (large conv maps and copies); see docs/benchmarks.md.
            counts = [1] if self.batch_size == "auto" else [int(self.batch_size)]
            if fixed_streams is not None:
                streams = [fixed_streams]
            else:
                streams = [1, 2] if torch.get_num_threads() >= 2 else [1]
            self._trials = [_Trial(c, k) for k in streams for c in counts]
        trials = self._trials
        # Time each setting on >= 5 s of audio, two rounds each, then keep the fastest per audio second.
        if len(trials) == 1 or (all(t.audio >= 5.0 for t in trials) and self._next >= 2 * len(trials)):
            best = min(trials, key=lambda t: t.seconds / max(t.audio, 1e-9))
            self._chosen = (best.count, best.streams)
            logger.info(
                "gemma-rvq: auto batching on CPU chose %d clips per call, %d concurrent calls",
                best.count,
                best.streams,
            )
            return best.count, self.batch_seconds, best.streams, None
        trial = trials[self._next % len(trials)]
        self._next += 1
        return trial.count, self.batch_seconds, trial.streams, trial

    def next_group(self, todo: Sequence[int], pos: int, lengths: Sequence[int], max_count: int,
                   max_samples: float) -> list[int]:
        """The next minibatch from ``todo[pos:]`` (indices sorted longest first): it grows while it stays
        within the clip count, the padded-samples budget and the padding budget."""
        group = [todo[pos]]
        longest = real = lengths[todo[pos]]
        while pos + len(group) < len(todo) and len(group) < max_count:
            nxt = lengths[todo[pos + len(group)]]
            padded = (len(group) + 1) * longest
            if padded > max_samples or padded - real - nxt > self.max_padding * padded:
                break
            group.append(todo[pos + len(group)])
            real += nxt
        return group


def _run_concurrently(model, groups: list[list[int]], encode_group: Callable) -> None:
    """Encode minibatches at once in threads, splitting the torch threads between them: the numpy
    feature extractor and the small kernels of a small encoder then keep every core busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // len(groups)))
    try:
        with ThreadPoolExecutor(len(groups)) as pool:
            for future in [pool.submit(encode_group, model, g) for g in groups]:
                future.result()
    finally:
        torch.set_num_threads(threads)


def encode_sorted(
    model: torch.nn.Module,
    waves: Sequence[np.ndarray | None],
    sampling_rate: int,
    planner: BatchPlanner,
    encode_group: Callable[[torch.nn.Module, list[int]], None],
    stats: dict,
) -> None:
    """Run ``encode_group(model, indices)`` over every non-None waveform, longest first, in planned
    minibatches; ``stats`` (:data:`STAT_KEYS`) gets the audio, padding, call and time totals."""
    todo = [i for i, w in enumerate(waves) if w is not None]
    todo.sort(key=lambda i: -len(waves[i]))
    lengths = [len(w) if w is not None else 0 for w in waves]
    pos = 0
    while pos < len(todo):
        max_count, max_seconds, streams, trial = planner.plan(model)
        if not is_warm(model):  # the first call builds lazy state (encoder adapter, search tables)
            streams = 1
        groups: list[list[int]] = []
        while len(groups) < streams and pos < len(todo):
            groups.append(planner.next_group(todo, pos, lengths, max_count, max_seconds * sampling_rate))
            pos += len(groups[-1])
        start = time.perf_counter()
        if len(groups) == 1:
            encode_group(model, groups[0])
        else:
            _run_concurrently(model, groups, encode_group)
        mark_warm(model)
        elapsed = time.perf_counter() - start
        audio = 0.0
        for group in groups:
            seconds = sum(lengths[i] for i in group) / sampling_rate
            audio += seconds
            stats["audio_seconds"] += seconds
            stats["padded_seconds"] += len(group) * lengths[group[0]] / sampling_rate
            stats["encode_calls"] += 1
            stats["encode_seconds"] += elapsed / len(groups)
        if trial is not None:
            trial.seconds += elapsed
            trial.audio += audio


__all__ = ["STAT_KEYS", "BatchPlanner", "encode_sorted"]
