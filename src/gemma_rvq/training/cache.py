"""The embedding cache: frozen-encoder frame embeddings on disk, written once, streamed many times.

Layout of a cache folder (one per split, e.g. ``<cache_dir>/train`` and ``<cache_dir>/dev``)::

    meta.json                         identity: format version, dim, dtype, encoder spec, source size
    shard-<rank>-<n>.npy              float16 [frames, dim] (np.load(mmap_mode="r") friendly)
    shard-<rank>-<n>.json             sidecar: rows covered, per-utterance (id, row, offset, frames, seconds)
    index.json                        written by :func:`finalize_cache` once every rank is done

Crash safety: a shard's ``.npy`` and then its ``.json`` sidecar are written to temporary names and
renamed; a shard counts as complete only when its sidecar exists. On restart every completed shard is
kept and skipped; a ``.npy`` without sidecar (killed mid-shard) is deleted and redone.

Integrity: each sidecar (and so ``index.json``) records the shard's size and checksum (xxh3-128 of the
file). Opening a cache (:class:`EmbeddingCache`) checks every shard and refuses a missing, truncated or
overwritten one, naming it; resuming a build (:func:`build_embedding_cache`, which every training run
calls first) re-encodes a damaged shard and the shards after it. Shards written before checksums existed
are checked by size and shape only.

Streaming (:class:`FrameStream`): the shard order is shuffled per epoch and the frames of a window of
``shuffle_shards`` shards are permuted together, then cut into batches. Peak RAM is one window
(``shuffle_shards x shard_frames x dim x 2`` bytes), whatever the corpus size. The stream is a pure
function of ``(seed, epoch, batch index)``: resuming at a batch index gives exactly the same batches.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CACHE_FORMAT = "gemma-rvq-embedding-cache"
CACHE_VERSION = 1
_SHARD_RE = re.compile(r"^shard-(\d{3})-(\d{5})\.json$")


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_checksum(path: str, algo: str | None = None) -> str:
    """``"<algo>:<hex>"`` of a file's bytes: xxh3-128 (several GB/s) when xxhash is installed, else blake2b."""
    if algo is None:
        try:
            import xxhash

            algo = "xxh3_128"
        except ImportError:  # pragma: no cover - xxhash is a datasets dependency
            algo = "blake2b_128"
    if algo == "xxh3_128":
        import xxhash

        h = xxhash.xxh3_128()
    elif algo == "blake2b_128":
        import hashlib

        h = hashlib.blake2b(digest_size=16)
    else:
        raise ValueError(f"unknown checksum algorithm {algo!r}")
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return f"{algo}:{h.hexdigest()}"


def shard_problem(folder: str, shard: dict[str, Any], dim: int | None = None) -> str | None:
    """What is wrong with one shard file against its record (missing, wrong size, checksum, shape), or None."""
    path = os.path.join(folder, shard["file"])
    if not os.path.isfile(path):
        return "the file is missing"
    size = os.path.getsize(path)
    if shard.get("bytes") is not None and size != shard["bytes"]:
        return f"{size} bytes, the index says {shard['bytes']} (truncated or replaced)"
    if shard.get("checksum") is not None:
        if _file_checksum(path, shard["checksum"].split(":", 1)[0]) != shard["checksum"]:
            return "its checksum does not match the index (the file was overwritten)"
        return None
    try:  # a shard from before checksums: its header at least
        arr = np.load(path, mmap_mode="r")
    except Exception as err:
        return f"unreadable ({err})"
    expected = (shard["num_frames"], dim if dim is not None else arr.shape[-1])
    if arr.shape != expected:
        return f"shape {arr.shape}, the index says {expected}"
    return None


# ---------------------------------------------------------------------------------------------- writing


class EmbeddingCacheWriter:
    """Appends utterance embeddings ``[T, D]`` to fp16 shards of about ``shard_frames`` frames.

    One writer per process (``rank``); rows are the positions in that process's slice of the source.
    Utterances are never split across shards. Call :meth:`flush` / :meth:`close` at the end.

    Args:
        path: cache folder (created).
        dim: embedding size D.
        shard_frames: a shard is written once it holds at least this many frames.
        metadata: identity of the encoder and source (JSON-serialisable); must match on resume.
        rank: process index (shard names carry it, so processes never collide).
        dtype: storage type of the frames, ``"float16"`` (default) or ``"float32"`` (exact: e.g. a dev split
            whose scores should equal re-encoding its audio).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dim: int,
        *,
        shard_frames: int = 65536,
        metadata: dict[str, Any] | None = None,
        rank: int = 0,
        dtype: str = "float16",
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        self.dtype = np.dtype(dtype)
        if shard_frames < 1:
            raise ValueError(f"shard_frames must be >= 1, got {shard_frames}")
        self.path = os.fspath(path)
        self.dim = int(dim)
        self.shard_frames = int(shard_frames)
        self.rank = int(rank)
        os.makedirs(self.path, exist_ok=True)
        meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "dim": self.dim, "dtype": dtype,
                "source": metadata or {}}
        meta_path = os.path.join(self.path, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                old = json.load(f)
            if old != json.loads(json.dumps(meta)):
                raise ValueError(
                    f"the embedding cache at {self.path} was built from a different encoder or source "
                    f"or dtype (stored {old['source']!r}, dim {old.get('dim')}, {old.get('dtype')}; now "
                    f"{meta['source']!r}, dim {self.dim}, {dtype}). "
                    "Use another cache_dir or delete this one."
                )
        else:
            _atomic_write_json(meta_path, meta)
        self._completed = self._scan_completed()
        self._remove_partial()
        self.next_row = max((s["end_row"] for s in self._completed), default=0)
        self._shard_index = len(self._completed)
        self._buffer: list[np.ndarray] = []
        self._utts: list[dict[str, Any]] = []
        self._buffer_frames = 0
        self._start_row = self.next_row

    def _scan_completed(self) -> list[dict[str, Any]]:
        done = []
        for name in sorted(os.listdir(self.path)):
            m = _SHARD_RE.match(name)
            if m and int(m.group(1)) == self.rank:
                with open(os.path.join(self.path, name), encoding="utf-8") as f:
                    done.append(json.load(f))
        # shards are written in order; a gap means a foreign file: refuse rather than guess
        for i, s in enumerate(done):
            if s["shard"] != i:
                raise ValueError(f"embedding cache {self.path}: shard {i} of rank {self.rank} is missing")
        for i, s in enumerate(done):
            problem = shard_problem(self.path, s, self.dim)
            if problem is not None:
                self._drop_from(done[i:], f"{s['file']}: {problem}")
                return done[:i]
        return done

    def _drop_from(self, shards: list[dict[str, Any]], reason: str) -> None:
        """Delete a damaged shard and every later one of this rank (and the finished marks): they are
        re-encoded from the damaged shard's first row on."""
        logger.warning("embedding cache %s: %s; re-encoding rows %d.. of rank %d (%d shard(s))",
                       self.path, reason, shards[0]["start_row"], self.rank, len(shards))
        for s in shards:
            for name in (s["file"], s["file"][: -len(".npy")] + ".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.path, name))
        for name in (f"rank-{self.rank:03d}.done", "index.json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.path, name))

    def _remove_partial(self) -> None:
        keep = {s["file"] for s in self._completed}
        for name in os.listdir(self.path):
            full = os.path.join(self.path, name)
            is_ours = name.startswith(f"shard-{self.rank:03d}-")
            if is_ours and (".tmp-" in name or (name.endswith(".npy") and name not in keep)):
                logger.info("removing partially written %s", full)
                os.remove(full)

    @property
    def completed_shards(self) -> list[dict[str, Any]]:
        return list(self._completed)

    def add(self, utterance_id: str, row: int, embeddings: np.ndarray | torch.Tensor, seconds: float = 0.0,
            extra: dict[str, Any] | None = None) -> None:
        """Append one utterance's valid frames ``[T, D]`` (T may be 0: recorded, no frames)."""
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().float().cpu().numpy()
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"utterance {utterance_id!r}: expected embeddings [T, {self.dim}], got {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError(f"utterance {utterance_id!r} (row {row}): embeddings contain NaN or inf")
        utt = {"id": str(utterance_id), "row": int(row), "offset": self._buffer_frames, "frames": int(emb.shape[0]),
               "seconds": float(seconds)}
        if extra:
            utt.update(extra)
        self._utts.append(utt)
        self._buffer.append(emb.astype(self.dtype))
        self._buffer_frames += emb.shape[0]
        self.next_row = int(row) + 1
        if self._buffer_frames >= self.shard_frames:
            self.flush()

    def flush(self) -> None:
        """Write the buffered utterances as one complete shard (no-op when empty)."""
        if not self._utts:
            return
        name = f"shard-{self.rank:03d}-{self._shard_index:05d}"
        data = np.concatenate(self._buffer, axis=0) if self._buffer_frames else np.zeros((0, self.dim), self.dtype)
        npy = os.path.join(self.path, name + ".npy")
        _atomic_write_npy(npy, data)
        info = {"file": name + ".npy", "rank": self.rank, "shard": self._shard_index, "num_frames": int(data.shape[0]),
                "bytes": os.path.getsize(npy), "checksum": _file_checksum(npy),
                "start_row": self._start_row, "end_row": self.next_row, "utterances": self._utts}
        _atomic_write_json(os.path.join(self.path, name + ".json"), info)
        self._completed.append(info)
        self._shard_index += 1
        self._buffer, self._utts, self._buffer_frames = [], [], 0
        self._start_row = self.next_row

    def close(self, num_rows: int | None = None) -> None:
        """Flush and mark this rank done (``num_rows`` = the size of this rank's slice, checked)."""
        self.flush()
        if num_rows is not None and self.next_row < num_rows:
            raise ValueError(f"rank {self.rank} closed after {self.next_row} of {num_rows} rows")
        _atomic_write_json(os.path.join(self.path, f"rank-{self.rank:03d}.done"), {"rows": self.next_row})


def finalize_cache(path: str | os.PathLike, world_size: int = 1) -> EmbeddingCache:
    """Merge every rank's shard sidecars into ``index.json`` (call once, after all ranks closed)."""
    path = os.fspath(path)
    for r in range(world_size):
        if not os.path.exists(os.path.join(path, f"rank-{r:03d}.done")):
            raise ValueError(f"embedding cache {path}: rank {r} has not finished writing")
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    shards = []
    for name in sorted(os.listdir(path)):
        m = _SHARD_RE.match(name)
        if m and int(m.group(1)) < world_size:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                shards.append(json.load(f))
    shards.sort(key=lambda s: (s["rank"], s["shard"]))
    index = dict(meta)
    index.update(
        world_size=world_size,
        num_frames=sum(s["num_frames"] for s in shards),
        num_utterances=sum(len(s["utterances"]) for s in shards),
        seconds=sum(u["seconds"] for s in shards for u in s["utterances"]),
        shards=shards,
    )
    langs: dict[str, int] = {}
    for s in shards:
        for u in s["utterances"]:
            if u.get("language"):
                langs[u["language"]] = langs.get(u["language"], 0) + 1
    index["languages"] = dict(sorted(langs.items()))
    _atomic_write_json(os.path.join(path, "index.json"), index)
    return EmbeddingCache(path)


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardInfo:
    file: str
    num_frames: int
    start: int  # global frame offset of the shard


class EmbeddingCache:
    """Read access to a finalized cache folder (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, "index.json")
        if not os.path.exists(index_path):
            raise ValueError(f"{self.path} is not a finished embedding cache (no index.json)")
        with open(index_path, encoding="utf-8") as f:
            self.index = json.load(f)
        if self.index.get("format") != CACHE_FORMAT:
            raise ValueError(f"{self.path}: not a {CACHE_FORMAT} folder")
        if self.index.get("version") != CACHE_VERSION:
            raise ValueError(f"{self.path}: cache version {self.index.get('version')}, expected {CACHE_VERSION}")
        self.dim: int = self.index["dim"]
        starts = np.cumsum([0] + [s["num_frames"] for s in self.index["shards"]])
        self.shards = [
            ShardInfo(s["file"], s["num_frames"], int(st)) for s, st in zip(self.index["shards"], starts[:-1])
        ]
        self.num_frames: int = int(starts[-1])
        self.num_utterances: int = self.index["num_utterances"]
        self.seconds: float = self.index["seconds"]
        self.languages: dict[str, int] = self.index.get("languages", {})
        if verify:
            self.verify()

    def verify(self) -> None:
        """Check every shard against the index (present, size, checksum); ``ValueError`` naming the damaged
        ones and how to rebuild them. Reads every shard once (the checksum)."""
        damaged = [f"{s['file']}: {problem}" for s in self.index["shards"]
                   if (problem := shard_problem(self.path, s, self.dim)) is not None]
        if damaged:
            raise ValueError(
                f"embedding cache {self.path} is damaged: " + "; ".join(damaged) + ". Rebuild it: run the same "
                "training again with this cache_dir (build_embedding_cache re-encodes damaged shards and the "
                f"ones after them), or delete {self.path} to encode everything afresh"
            )

    def __repr__(self) -> str:
        return (f"EmbeddingCache({self.path!r}, utterances={self.num_utterances}, frames={self.num_frames}, "
                f"dim={self.dim}, shards={len(self.shards)}, hours={self.seconds / 3600:.2f})")

    def load_shard(self, i: int, mmap: bool = False) -> np.ndarray:
        """Shard ``i`` as float16 ``[frames, D]`` (read into RAM unless ``mmap``)."""
        arr = np.load(os.path.join(self.path, self.shards[i].file), mmap_mode="r" if mmap else None)
        if arr.shape != (self.shards[i].num_frames, self.dim):
            raise ValueError(f"{self.shards[i].file}: shape {arr.shape}, index says "
                             f"{(self.shards[i].num_frames, self.dim)} (corrupt cache?)")
        return arr

    def utterances(self) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        """Yield ``(record, embeddings [T, D] float16)`` for every utterance, in source order per rank."""
        for i, s in enumerate(self.index["shards"]):
            arr = self.load_shard(i, mmap=True)
            for u in s["utterances"]:
                yield u, np.asarray(arr[u["offset"]: u["offset"] + u["frames"]])

    def sample_frames(self, n: int | None, seed: int = 0) -> torch.Tensor:
        """``n`` distinct frames drawn uniformly (all frames in order if ``n`` is None or >= size): float32 ``[n, D]``.

        Reads only the chosen rows (memory-mapped), so RAM is ``n x D`` whatever the cache size.
        """
        if n is None or n >= self.num_frames:
            idx = np.arange(self.num_frames)
        else:
            idx = np.sort(np.random.default_rng(seed).choice(self.num_frames, size=n, replace=False))
        out = np.empty((len(idx), self.dim), np.float32)
        bounds = np.array([s.start for s in self.shards] + [self.num_frames])
        for i, s in enumerate(self.shards):
            lo, hi = np.searchsorted(idx, [bounds[i], bounds[i + 1]])
            if hi > lo:
                arr = self.load_shard(i, mmap=True)
                out[lo:hi] = arr[idx[lo:hi] - s.start]
                del arr
        return torch.from_numpy(out)

    def stream(self, batch_size: int, **kwargs: Any) -> FrameStream:
        return FrameStream(self, batch_size, **kwargs)


class FrameStream:
    """Resumable shuffled batches of frames ``[batch_size, D]`` (float32) from an :class:`EmbeddingCache`.

    Epoch ``e``: shards in a permutation seeded by ``(seed, e)``; consecutive groups of ``shuffle_shards``
    shards form windows whose frames are permuted (seed ``(seed, e, window)``) and cut into full batches
    (the < ``batch_size`` remainder of a window is dropped; a different remainder each epoch). Global batch
    ``i`` of an epoch goes to process ``i % world_size``; every process gets the same number of batches.
    Position = ``(epoch, batch)`` of this process; :meth:`state_dict` / :meth:`load_state_dict` save it.
    """

    def __init__(self, cache: EmbeddingCache, batch_size: int, *, seed: int = 0, shuffle_shards: int = 2,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or shuffle_shards < 1:
            raise ValueError("batch_size and shuffle_shards must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cache, self.batch_size, self.seed = cache, int(batch_size), int(seed)
        self.shuffle_shards, self.rank, self.world_size = int(shuffle_shards), int(rank), int(world_size)
        self.epoch, self.batch = 0, 0
        if self.batches_per_epoch() == 0:
            raise ValueError(
                f"{cache.path}: {cache.num_frames} frames give no full batch of {batch_size} frames per process "
                f"(windows of {shuffle_shards} shards, {world_size} processes): lower batch_size"
            )

    def _windows(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.cache.shards))
        return [order[i: i + self.shuffle_shards].tolist() for i in range(0, len(order), self.shuffle_shards)]

    def _window_batches(self, epoch: int) -> list[int]:
        return [sum(self.cache.shards[i].num_frames for i in w) // self.batch_size for w in self._windows(epoch)]

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Batches this process receives in ``epoch`` (the same on every process)."""
        return sum(self._window_batches(epoch)) // self.world_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle_shards": self.shuffle_shards}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "batch_size", "world_size", "shuffle_shards"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the frame stream: {key} was {state[key]}, now {getattr(self, key)}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """This process's batches of ``epoch`` from its ``start_batch``-th on (skipped windows are not read)."""
        per_rank = self.batches_per_epoch(epoch)
        total = per_rank * self.world_size  # global batches actually used this epoch
        first_global = start_batch * self.world_size  # global index of this rank's next batch's round
        g0 = 0  # global index of the first batch of the current window
        for window, nb in zip(self._windows(epoch), self._window_batches(epoch)):
            if g0 >= total:
                break
            if g0 + nb <= first_global:
                g0 += nb
                continue
            mine = [g for g in range(g0, min(g0 + nb, total)) if g % self.world_size == self.rank and g >= first_global]
            if mine:
                data = np.concatenate([self.cache.load_shard(i) for i in window], axis=0)
                perm = np.random.default_rng([self.seed, epoch, window[0], len(data)]).permutation(len(data))
                for g in mine:
                    j = g - g0
                    rows = perm[j * self.batch_size: (j + 1) * self.batch_size]
                    yield torch.from_numpy(data[rows].astype(np.float32))
                del data, perm
            g0 += nb

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Endless: continues from the saved position, advancing it as batches are consumed."""
        while True:
            for batch in self.iter_epoch(self.epoch, self.batch):
                self.batch += 1
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0


# ---------------------------------------------------------------------------------------------- building


def example_waveform(value: Any, row: int, target_sampling_rate: int, *, sampling_rate: int | None = None,
                     audio_column: str = "audio", min_samples: int = 1,
                     pcm_dtype: str | None = None) -> tuple[np.ndarray, float]:
    """One dataset cell (any form :func:`gemma_rvq.audio.read_audio` accepts) -> (float32 mono waveform at
    the target rate, seconds), through :func:`gemma_rvq.audio.load_waveform`; errors name the row."""
    from ..audio import load_waveform, source_name

    name = f"row {row} ({audio_column!r})"
    source = source_name(value, "")
    wave = load_waveform(value, target_sampling_rate, sampling_rate=sampling_rate, pcm_dtype=pcm_dtype,
                         min_samples=min_samples, name=f"{name}, {source}" if source else name)
    return wave, len(wave) / target_sampling_rate


def _model_identity(model: Any) -> dict[str, Any]:
    cfg = model.config
    ident = {k: getattr(cfg, k, None) for k in ("encoder_family", "encoder_name_or_path", "encoder_layer", "dim")}
    encoder_config = getattr(cfg, "encoder_config", None)
    if encoder_config is not None:
        # a bundled (e.g. tiny random) encoder: identify it by its weights
        enc = getattr(model, "encoder", None)
        ident["encoder_weights_sum"] = (
            round(float(sum(p.double().sum() for p in enc.parameters())), 6) if enc is not None else None
        )
    return ident


@torch.no_grad()
def build_embedding_cache(
    model: Any,
    source: Any,
    path: str | os.PathLike,
    *,
    audio_column: str = "audio",
    id_column: str | None = None,
    sampling_rate_column: str | None = None,
    extra_columns: Sequence[str] = ("language", "voice"),
    batch_size: int = 8,
    shard_frames: int = 65536,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    finalize: bool = True,
    pcm_dtype: str | None = None,
    dtype: str = "float16",
) -> EmbeddingCache | None:
    """Run the frozen encoder (``model.embed``) over ``source`` once and write the frames to ``path``.

    Args:
        model: a ``GemmaRVQModel`` (its encoder is used; nothing is trained).
        source: a ``datasets.Dataset`` with an audio column, or a list of audio file paths.
        path: cache folder for this split. Completed shards found there are kept (resume).
        extra_columns: dataset columns copied into the per-utterance records when present (for data
            summaries: languages, voices).
        batch_size: utterances per encoder call; measure per device (batching does not help on CPU).
        rank, world_size: this process's contiguous slice of the rows (multi-GPU caching).
        pcm_dtype: width of integer PCM samples (``"int16"``...): needed for int64 / Python-int samples
            (see :mod:`gemma_rvq.audio`).
        finalize: with ``world_size == 1``, write ``index.json`` and return the :class:`EmbeddingCache`.
            With several processes, call :func:`finalize_cache` on one process after all finished.
        dtype: storage type of the frames (``"float16"`` or ``"float32"``, see :class:`EmbeddingCacheWriter`).

    Returns:
        the cache, or None when another process has to finalize.
    """
    from tqdm.auto import tqdm

    is_list = isinstance(source, (list, tuple))
    num_rows = len(source)
    lo, hi = (num_rows * rank) // world_size, (num_rows * (rank + 1)) // world_size
    sr_target = int(model.config.sampling_rate)
    meta = {"num_rows": num_rows, "world_size": world_size, "model": _model_identity(model)}
    if not is_list and getattr(source, "_fingerprint", None):
        meta["fingerprint"] = source._fingerprint
    writer = EmbeddingCacheWriter(path, int(model.config.dim), shard_frames=shard_frames, metadata=meta, rank=rank,
                                  dtype=dtype)
    if not is_list:
        columns = set(source.column_names)
        if audio_column not in columns:
            raise ValueError(f"dataset has no audio column {audio_column!r} (columns: {sorted(columns)})")
        extra = [c for c in extra_columns if c in columns]
        from ..audio import undecoded

        source = undecoded(source, audio_column)  # datasets decodes only through torchcodec: we decode
    else:
        extra = []
    was_training = model.training
    model.eval()
    start = lo + writer.next_row
    bar = tqdm(total=hi - lo, initial=writer.next_row, desc=f"caching {os.path.basename(os.fspath(path))}",
               disable=not progress, unit="utt")
    try:
        for b0 in range(start, hi, batch_size):
            rows = list(range(b0, min(b0 + batch_size, hi)))
            if is_list:
                cells = [{"audio": source[r], "id": os.path.basename(os.fspath(source[r]))} for r in rows]
            else:
                batch = source[b0: rows[-1] + 1]
                cells = [{k: batch[k][j] for k in batch} for j in range(len(rows))]
            waves, secs = [], []
            for r, cell in zip(rows, cells):
                sr = cell.get(sampling_rate_column) if sampling_rate_column else None
                wave, sec = example_waveform(cell["audio"] if is_list else cell[audio_column], r, sr_target,
                                             sampling_rate=sr, audio_column=audio_column,
                                             min_samples=int(model.config.min_samples), pcm_dtype=pcm_dtype)
                waves.append(wave)
                secs.append(sec)
            emb, mask = model.embed(waves, sampling_rate=sr_target)
            emb = emb.float().cpu()
            mask = mask.cpu()
            for j, r in enumerate(rows):
                cell = cells[j]
                uid = str(cell[id_column]) if id_column else (cell.get("id") if is_list else str(r))
                info = {k: cell[k] for k in extra if cell.get(k) is not None}
                writer.add(uid, r - lo, emb[j][mask[j]].numpy(), seconds=secs[j], extra=info)
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    writer.close(num_rows=hi - lo)
    if world_size == 1 and finalize:
        return finalize_cache(path, world_size=1)
    return None


def list_audio_files(patterns: str | Iterable[str]) -> list[str]:
    """Expand glob pattern(s) into a sorted list of files (ValueError when nothing matches)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files = sorted({f for p in patterns for f in glob.glob(os.path.expanduser(p), recursive=True)})
    if not files:
        raise ValueError(f"no audio files match {list(patterns)}")
    return files
