"""The ``datasets.map`` transform: a speech column in, semantic token strings out.

    from gemma_rvq import tokenize_speech, SpeechTokenizer

    ds = ds.map(tokenize_speech, batched=True)          # default model, "gemma_rvq" format

    tok = SpeechTokenizer("path/or/hub-id", format="ichigo", return_codes=True, return_num_frames=True)
    ds = ds.map(tok, batched=True, with_indices=True, num_proc=4, with_rank=True)

Inside one map batch the clips are sorted by length and cut into minibatches (by clip count and padded
audio seconds), encoded with masks, and put back in dataset order, so little compute goes to padding.

Caching: ``datasets`` fingerprints a transform by pickling it. A :class:`SpeechTokenizer` pickles to a
small, stable identity (model id + revision, or a weights digest computed once; the token format;
gemma-rvq's version; the options that change the output), never to the model's weights. The model is
loaded lazily on first call, in whichever process runs the transform.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .audio import check_pcm_dtype, check_sampling_rate, load_waveform, source_name

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ik/speechless-twi-stage1-rvq-gemma4"
"""The model :data:`tokenize_speech` loads when ``$GEMMA_RVQ_MODEL`` is not set."""

MODEL_ENV_VAR = "GEMMA_RVQ_MODEL"

_ON_ERROR = ("raise", "skip")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".joblib", ".pkl", ".npy", ".npz")

# In-memory models by weights digest. A pickled SpeechTokenizer carries only the digest; a worker forked
# from this process (datasets' num_proc on Linux) finds the model here without any copy or reload.
_MEMORY_MODELS: weakref.WeakValueDictionary[str, torch.nn.Module] = weakref.WeakValueDictionary()
# Models loaded from a path / Hub id, one per (reference, device, dtype) and process.
_LOADED_MODELS: dict[tuple, torch.nn.Module] = {}
_LOAD_LOCK = threading.Lock()
# Models that finished one encode call in this process (their lazy state exists; concurrent calls are safe).
_WARM_MODELS: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_THREADS_SET_IN: int | None = None


def _package_version() -> str:
    from . import __version__

    return __version__


def _in_subprocess() -> bool:
    """True inside a multiprocessing / multiprocess worker (datasets' ``num_proc`` pool)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        return True
    try:
        import multiprocess

        return multiprocess.parent_process() is not None
    except ImportError:  # pragma: no cover - multiprocess is a datasets dependency
        return False


def _hasher():
    try:
        import xxhash

        return xxhash.xxh3_128()
    except ImportError:  # pragma: no cover
        import hashlib

        return hashlib.blake2b(digest_size=16)


def state_dict_digest(model: torch.nn.Module) -> str:
    """Digest of a module's class, config and every state-dict tensor (names, dtypes, shapes, bytes).

    About 1-3 GB/s on one CPU core; :class:`SpeechTokenizer` computes it once per instance.
    """
    h = _hasher()
    h.update(type(model).__qualname__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_PATH_DIGESTS: dict[tuple, str] = {}


def path_digest(path: str | os.PathLike) -> str:
    """Digest of the weight and config files under ``path`` (a file or a checkpoint folder).

    Cached per process on (path, file names, sizes, modification times), so it is read once.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if name.endswith(_WEIGHT_SUFFIXES) and "/.cache/" not in os.path.join(root, name)
        )
    else:
        files = [path]
    stat_key = (path, tuple((f, os.path.getsize(f), os.path.getmtime(f)) for f in files))
    if stat_key in _PATH_DIGESTS:
        return _PATH_DIGESTS[stat_key]
    h = _hasher()
    for f in files:
        h.update(os.path.relpath(f, path).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    _PATH_DIGESTS[stat_key] = digest = h.hexdigest()
    return digest


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub revision points to in the local cache, if it is there (no network)."""
    if revision and _HEX40.match(revision):
        return revision
    try:
        from huggingface_hub import constants

        ref = os.path.join(
            constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"), "refs", revision or "main"
        )
        with open(ref) as fh:
            return fh.read().strip() or None
    except (OSError, ImportError):
        return None


class SpeechTokenizer:
    """Turns an audio column into semantic token strings; use with ``Dataset.map(..., batched=True)``.

    Args:
        model: a ``GemmaRVQModel`` (or anything with the same ``encode``), a local path or a Hub id
            (loaded with ``gemma_rvq.convert.load_any``). ``None``: ``$GEMMA_RVQ_MODEL`` or
            :data:`DEFAULT_MODEL`, read when the transform is first pickled or called.
        format: a token format preset name (``"gemma_rvq"``, ``"ichigo"``, ``"spire"``) or a
            ``SemanticTokenFormat``.
        audio_column: column holding the audio. Each value may be a decoded example (an
            ``AudioDecoder``-like object with ``get_all_samples()``, or a dict with ``array`` and
            ``sampling_rate``), an undecoded one (``Audio(decode=False)``: a dict with ``bytes`` and/or
            ``path``, decoded with soundfile), a file path, or a raw 1-D/2-D array.
        sampling_rate_column: column with the sampling rate of raw arrays.
        sampling_rate: sampling rate of raw arrays when there is no such column.
        pcm_dtype: width of integer PCM samples (``"int16"``, ``"int32"``): datasets hands integer
            columns to map functions as int64, so without it int64 / Python-int samples are refused
            rather than scaled to near silence. Float samples need nothing.
        output_column: column for the token strings.
        return_codes: also write the codes, ``[Q][T]`` ints per row, to ``codes_column``.
        return_num_frames: also write the frame count per row to ``num_frames_column``.
        batch_size: most clips per encoder call, or ``"auto"``: 64 on a GPU, 1 on a CPU (padded batches
            were measured 2-3x slower per audio second there).
        batch_seconds: most padded audio seconds per encoder call (clips are sorted by length first).
        max_padding: a minibatch only takes another clip while padding stays within this share of its
            padded length, so the padding fraction stays below it.
        cpu_streams: on a CPU, encode this many minibatches at once in threads, splitting the torch
            threads between them (the numpy feature extractor is single-threaded); ``"auto"``: 1 or 2,
            whichever runs faster on the first clips (each timed twice on >= 5 s of audio). Tokens are
            the same either way.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None``: GPU ``rank % n_gpus`` when GPUs exist
            (``rank`` from ``with_rank=True``), else CPU.
        dtype: compute dtype (``"float32"``, ``"bfloat16"``...); ``None`` keeps the model's. It changes
            the codes, so it is part of the cache identity.
        on_error: ``"raise"``: a ``ValueError`` naming the row and the problem. ``"skip"``: the row gets
            an empty token string (empty codes, 0 frames) and the message in ``error_column``.
        num_quantizers: encode with the first k levels only (``None``: all the model has).
        revision: Hub revision of a Hub-id ``model``.
        num_threads: torch CPU threads inside ``num_proc`` workers (default 1, which also avoids the
            OpenMP fork deadlock); ``None`` leaves the main process alone.

    Attributes:
        stats: running totals in this process: ``examples``, ``errors``, ``audio_seconds``,
            ``padded_seconds``, ``encode_calls``, ``encode_seconds``; :attr:`padding_fraction`.
    """

    def __init__(
        self,
        model: Any = None,
        format: Any = "gemma_rvq",
        *,
        audio_column: str = "audio",
        sampling_rate_column: str | None = None,
        sampling_rate: int | None = None,
        pcm_dtype: str | None = None,
        output_column: str = "semantic_tokens",
        return_codes: bool = False,
        codes_column: str = "audio_codes",
        return_num_frames: bool = False,
        num_frames_column: str = "num_frames",
        error_column: str | None = None,
        batch_size: int | str = "auto",
        batch_seconds: float = 60.0,
        max_padding: float = 0.1,
        cpu_streams: int | str = "auto",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        on_error: str = "raise",
        num_quantizers: int | None = None,
        revision: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size >= 1)):
            raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
        if not batch_seconds > 0:
            raise ValueError(f"batch_seconds must be > 0, got {batch_seconds!r}")
        if not 0.0 <= max_padding < 1.0:
            raise ValueError(f"max_padding must be in [0, 1), got {max_padding!r}")
        if sampling_rate is not None:
            sampling_rate = check_sampling_rate(sampling_rate)
        self._model: torch.nn.Module | None = None
        self._model_ref: str | None = None
        self._model_digest: str | None = None
        self._memory_key: str | None = None
        if isinstance(model, torch.nn.Module):
            self._model = model
        elif model is None or isinstance(model, (str, os.PathLike)):
            self._model_ref = os.fspath(model) if model is not None else None
        else:
            raise TypeError(f"model must be a GemmaRVQModel, a path, a Hub id or None, got {type(model)!r}")
        self._format_spec = format
        self._format = None
        self.audio_column = audio_column
        self.sampling_rate_column = sampling_rate_column
        self.sampling_rate = sampling_rate
        self.pcm_dtype = check_pcm_dtype(pcm_dtype)
        self.output_column = output_column
        self.return_codes = return_codes
        self.codes_column = codes_column
        self.return_num_frames = return_num_frames
        self.num_frames_column = num_frames_column
        self.error_column = error_column or f"{output_column}_error"
        self.batch_size = batch_size
        self.batch_seconds = float(batch_seconds)
        self.max_padding = float(max_padding)
        if not (cpu_streams == "auto" or (isinstance(cpu_streams, int) and cpu_streams >= 1)):
            raise ValueError(f"cpu_streams must be a positive int or 'auto', got {cpu_streams!r}")
        self.cpu_streams = cpu_streams
        self.device = str(device) if device is not None else None
        self.dtype = _dtype_name(dtype)
        self.on_error = on_error
        self.num_quantizers = num_quantizers
        self.revision = revision
        self.num_threads = num_threads
        self._init_runtime()

    # ------------------------------------------------------------------ pickling / fingerprint
    def _init_runtime(self) -> None:
        self._format = None
        self._auto_choice: dict | None = None
        self.stats = dict.fromkeys(
            ("examples", "errors", "audio_seconds", "padded_seconds", "encode_calls", "encode_seconds"), 0
        )

    _OPTIONS = (
        "audio_column", "sampling_rate_column", "sampling_rate", "pcm_dtype", "output_column", "return_codes",
        "codes_column", "return_num_frames", "num_frames_column", "error_column", "dtype", "on_error",
        "num_quantizers",
    )  # fmt: skip
    # Options that do not change the output (and so stay out of the cache identity) but travel to workers.
    _RUNTIME_OPTIONS = ("batch_size", "batch_seconds", "max_padding", "cpu_streams", "device", "num_threads")

    def model_identity(self) -> dict:
        """What identifies the model: ``{"digest": ...}`` for objects (state-dict digest, computed once per
        instance) and local paths (file digest, computed once per file state and process); ``{"hub_id",
        "revision"}`` for Hub ids (the cached commit when the revision is a branch or tag)."""
        if self._model is not None or self._memory_key is not None:
            if self._model_digest is None:
                self._model_digest = state_dict_digest(self._model)
            if self._model is not None:
                _MEMORY_MODELS[self._model_digest] = self._model
            return {"digest": self._model_digest}
        ref = self._resolved_ref()
        if os.path.exists(ref):
            return {"digest": path_digest(ref)}
        return {"hub_id": ref, "revision": _hub_commit(ref, self.revision) or self.revision or "main"}

    def _resolved_ref(self) -> str:
        if self._model_ref is not None:
            return self._model_ref
        return os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL

    def identity(self) -> dict:
        """The small, stable dict a pickled transform carries: model identity, token format, gemma-rvq
        version and the options that change the output. Equal identities give equal outputs."""
        return {
            "gemma_rvq": _package_version(),
            "model": self.model_identity(),
            "format": self._format_identity(),
            "options": {k: getattr(self, k) for k in self._OPTIONS},
        }

    def __getstate__(self) -> dict:
        state = self.identity()
        # How to get the model in another process; none of it is weights.
        identity = state["model"]
        if self._model is not None:
            state["load"] = {"memory": identity["digest"]}
        else:
            state["load"] = {"ref": self._resolved_ref(), "revision": self.revision}
        state["runtime"] = {k: getattr(self, k) for k in self._RUNTIME_OPTIONS}
        return state

    def __setstate__(self, state: dict) -> None:
        for k, v in {**state["options"], **state["runtime"]}.items():
            setattr(self, k, v)
        spec = state["format"]
        self._format_spec = spec["preset"] if set(spec) == {"preset"} else spec
        self._format = None
        self._model = None
        self._model_ref = state["load"].get("ref")
        self.revision = state["load"].get("revision")
        self._memory_key = state["load"].get("memory")
        self._model_digest = self._memory_key
        self._pickled_version = state["gemma_rvq"]
        self._init_runtime()

    def __repr__(self) -> str:
        model = f"<{type(self._model).__name__}>" if self._model is not None else self._resolved_ref()
        spec = self._format_identity()
        return f"{type(self).__name__}(model={model!r}, format={spec.get('preset', spec.get('name', '...'))!r})"

    # ------------------------------------------------------------------ model / format
    def _format_identity(self) -> dict:
        """The format as given: a preset name is fitted to the model only when the model is loaded, so
        the identity stays cheap; (preset, model identity, num_quantizers) determine the fitted format."""
        spec = self._format_spec
        if isinstance(spec, str):
            return {"preset": spec}
        return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)

    def _format_for(self, model: torch.nn.Module):
        if self._format is None:
            from .tokens import format_for_model

            config = model.config
            self._format = format_for_model(
                self._format_spec,
                codebook_size=int(config.codebook_size),
                num_quantizers=int(self.num_quantizers or config.num_quantizers),
            )
        return self._format

    @property
    def format(self):
        """The ``SemanticTokenFormat`` in use (a preset name is fitted to the model's Q and K; loads it)."""
        return self._format_for(self.get_model())

    def get_model(self, rank: int | None = None) -> torch.nn.Module:
        """The model, loaded (once per process) on the device for ``rank``, in eval mode."""
        device = self._resolve_device(rank)
        dtype = getattr(torch, self.dtype) if self.dtype else None
        model = self._model
        if model is None and getattr(self, "_memory_key", None) is not None:
            model = _MEMORY_MODELS.get(self._memory_key)
            if model is None:
                raise RuntimeError(
                    "SpeechTokenizer was built from an in-memory model, and this process (started with "
                    "'spawn', or on another machine) cannot see it. Save it with model.save_pretrained(dir) "
                    "and pass SpeechTokenizer(dir, ...) instead."
                )
        if model is not None:
            params = next(model.parameters(), None)
            if params is None or (params.device == device and (dtype is None or params.dtype == dtype)):
                return model.eval()
            # never move or cast the caller's object: a copy per (weights, device, dtype), kept per process
            key = ("memory", self.model_identity()["digest"], str(device), str(dtype))
            with _LOAD_LOCK:
                if key not in _LOADED_MODELS:
                    _LOADED_MODELS[key] = _place(copy.deepcopy(model), device, dtype)
                return _LOADED_MODELS[key]
        ref = self._resolved_ref()
        # the identity keeps a path whose weights changed from reusing the model loaded before
        key = (ref, json.dumps(self.model_identity(), sort_keys=True), str(device), str(dtype))
        with _LOAD_LOCK:
            if key not in _LOADED_MODELS:
                from .convert import load_any

                logger.info("gemma-rvq: loading %s on %s", ref, device)
                kwargs = {"revision": self.revision} if self.revision else {}
                _LOADED_MODELS[key] = _place(load_any(ref, **kwargs), device, dtype)
            return _LOADED_MODELS[key]

    def _resolve_device(self, rank: int | None) -> torch.device:
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.device is None:
            return torch.device(f"cuda:{(rank or 0) % n_gpus}") if n_gpus else torch.device("cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None and n_gpus:
            return torch.device(f"cuda:{(rank or 0) % n_gpus}")
        return device

    # ------------------------------------------------------------------ the transform
    def __call__(self, batch: Mapping[str, Any], *args: Any, rank: int | None = None, indices=None) -> dict:
        """Tokenize one map batch (or one example when ``batched=False``).

        ``args`` are what ``Dataset.map`` appends: the indices (``with_indices=True``) and/or the rank
        (``with_rank=True``), in that order.
        """
        if len(args) > 2:
            raise TypeError(
                f"SpeechTokenizer takes (batch[, indices][, rank]), got {len(args) + 1} arguments"
            )
        if len(args) == 2:  # with_indices=True and with_rank=True, in that order
            indices, rank = args
        elif len(args) == 1:  # an int (or None) is a rank; a list of ints, indices
            if args[0] is None or isinstance(args[0], (int, np.integer)):
                rank = args[0]
            else:
                indices = args[0]
        _configure_worker_threads(self.num_threads)
        if self.audio_column not in batch:
            raise KeyError(
                f"SpeechTokenizer: no column {self.audio_column!r} in the batch (columns: {list(batch.keys())}); "
                "pass audio_column=..."
            )
        values = batch[self.audio_column]
        if indices is not None and not isinstance(indices, (int, np.integer)):
            single = False  # with_indices=True on a batch: the indices are a list
        else:
            single = _is_single_example(batch, self.audio_column)
        if single:
            values = [values]
            indices = [indices] if indices is not None else None
        rates = None
        if self.sampling_rate_column is not None:
            rates = batch[self.sampling_rate_column]
            rates = [rates] if single else list(rates)
        elif self.sampling_rate is not None:
            rates = [self.sampling_rate] * len(values)
        out = self.tokenize(
            list(values), rates, indices=list(indices) if indices is not None else None, rank=rank
        )
        return {k: v[0] for k, v in out.items()} if single else out

    def tokenize(
        self,
        audio: Sequence[Any],
        sampling_rates: Sequence[int | None] | None = None,
        *,
        indices: Sequence[int] | None = None,
        rank: int | None = None,
    ) -> dict[str, list]:
        """Tokenize a list of audio values (any form the audio column accepts).

        Returns the output columns as lists in input order: ``output_column`` (str) and, as asked,
        ``codes_column`` (``[Q][T]`` int arrays), ``num_frames_column`` (int), ``error_column``.
        """
        n = len(audio)
        if sampling_rates is None and self.sampling_rate is not None:
            sampling_rates = [self.sampling_rate] * n
        if sampling_rates is not None and len(sampling_rates) != n:
            raise ValueError(f"{len(sampling_rates)} sampling rates for {n} audio values")
        model = self.get_model(rank)
        target_sr = int(model.config.sampling_rate)
        min_samples = int(model.config.min_samples)
        waves: list[np.ndarray | None] = [None] * n
        errors: list[str | None] = [None] * n
        for i, value in enumerate(audio):
            try:
                waves[i] = load_waveform(
                    value, target_sr, sampling_rate=sampling_rates[i] if sampling_rates is not None else None,
                    pcm_dtype=self.pcm_dtype, min_samples=min_samples, name=source_name(value),
                )  # fmt: skip
            except Exception as err:  # any decoding failure is reported against its row
                errors[i] = _describe(err)
                self._maybe_raise(i, indices, errors[i], err)
        codes = self._encode(model, waves, errors, indices, target_sr)
        strings: list[str] = []
        render = self._format_for(model).render
        for i in range(n):
            if codes[i] is not None and codes[i].shape[-1] == 0:
                errors[i] = "the encoder produced no frames (audio too short?)"
                self._maybe_raise(i, indices, errors[i])
                codes[i] = None
            strings.append(render(codes[i]) if codes[i] is not None else "")
        self.stats["examples"] += n
        self.stats["errors"] += sum(e is not None for e in errors)
        result: dict[str, list] = {self.output_column: strings}
        if self.return_codes:
            q = self.num_quantizers or int(model.config.num_quantizers)
            result[self.codes_column] = [
                c.astype(np.int64) if c is not None else np.zeros((q, 0), np.int64) for c in codes
            ]
        if self.return_num_frames:
            result[self.num_frames_column] = [int(c.shape[-1]) if c is not None else 0 for c in codes]
        if self.on_error == "skip":
            result[self.error_column] = errors
        return result

    @property
    def padding_fraction(self) -> float:
        """Share of the encoded (padded) audio that was padding, over every call so far in this process."""
        padded = self.stats["padded_seconds"]
        return 1.0 - self.stats["audio_seconds"] / padded if padded else 0.0

    # ------------------------------------------------------------------ internals
    def _maybe_raise(self, i: int, indices, message: str, cause: BaseException | None = None) -> None:
        if self.on_error == "skip":
            return
        where = (
            f"row {indices[i]}" if indices is not None
            else f"row {i} of this batch (map with with_indices=True to get the dataset index)"
        )  # fmt: skip
        raise ValueError(f"SpeechTokenizer: {where}, column {self.audio_column!r}: {message}") from cause

    def _encode(self, model, waves, errors, indices, sr: int) -> list[np.ndarray | None]:
        """Encode valid waveforms in length-sorted minibatches; codes ``[Q, T_i]`` per row, input order."""
        codes: list[np.ndarray | None] = [None] * len(waves)
        todo = [i for i, w in enumerate(waves) if w is not None]
        todo.sort(key=lambda i: -len(waves[i]))
        pos = 0
        while pos < len(todo):
            max_count, max_seconds, streams, trial = self._batch_plan(model)
            if model not in _WARM_MODELS:  # the first call builds lazy state (encoder adapter, search tables)
                streams = 1
            groups = []
            while len(groups) < streams and pos < len(todo):
                groups.append(self._next_group(todo, pos, waves, max_count, max_seconds * sr))
                pos += len(groups[-1])
            start = time.perf_counter()
            if len(groups) == 1:
                self._encode_group(model, groups[0], waves, codes, errors, indices, sr)
            else:
                self._encode_concurrently(model, groups, waves, codes, errors, indices, sr)
            _WARM_MODELS.add(model)
            elapsed = time.perf_counter() - start
            audio = sum(self._count(g, waves, sr, elapsed / len(groups)) for g in groups)
            if trial is not None:
                trial["seconds"] += elapsed
                trial["audio"] += audio
        return codes

    def _next_group(self, todo: list[int], pos: int, waves, max_count: int, max_samples: float) -> list[int]:
        """The next minibatch from ``todo[pos:]`` (sorted longest first): it grows while it stays within
        the clip count, the padded-samples budget and the padding budget."""
        group = [todo[pos]]
        longest = real = len(waves[todo[pos]])
        while pos + len(group) < len(todo) and len(group) < max_count:
            nxt = len(waves[todo[pos + len(group)]])
            padded = (len(group) + 1) * longest
            if padded > max_samples or padded - real - nxt > self.max_padding * padded:
                break
            group.append(todo[pos + len(group)])
            real += nxt
        return group

    def _count(self, group: list[int], waves, sr: int, elapsed: float) -> float:
        audio = sum(len(waves[i]) for i in group) / sr
        self.stats["audio_seconds"] += audio
        self.stats["padded_seconds"] += len(group) * len(waves[group[0]]) / sr
        self.stats["encode_calls"] += 1
        self.stats["encode_seconds"] += elapsed
        return audio

    def _encode_concurrently(self, model, groups, waves, codes, errors, indices, sr) -> None:
        """Encode minibatches at once in threads, splitting the torch threads between them: the numpy
        feature extractor and the small kernels of a small encoder then keep every core busy."""
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // len(groups)))
        try:
            with ThreadPoolExecutor(len(groups)) as pool:
                futures = [
                    pool.submit(self._encode_group, model, g, waves, codes, errors, indices, sr)
                    for g in groups
                ]
                for future in futures:
                    future.result()
        finally:
            torch.set_num_threads(threads)

    def _encode_group(self, model, group, waves, codes, errors, indices, sr) -> None:
        try:
            with torch.inference_mode():
                out = model.encode(
                    [torch.from_numpy(waves[i]) for i in group],
                    sampling_rate=sr,
                    num_quantizers=self.num_quantizers,
                )
        except Exception as err:
            if len(group) > 1:  # find the row that fails
                for i in group:
                    self._encode_group(model, [i], waves, codes, errors, indices, sr)
                return
            errors[group[0]] = f"encoding failed: {_describe(err)}"
            self._maybe_raise(group[0], indices, errors[group[0]], err)
            return
        all_codes = out.audio_codes.cpu().numpy()
        mask = out.codes_mask.cpu().numpy().astype(bool)
        for k, i in enumerate(group):
            codes[i] = all_codes[k][:, mask[k]]

    def _batch_plan(self, model) -> tuple[int, float, int, dict | None]:
        """(max clips, max padded seconds, concurrent minibatches, timing slot or None) for the next step."""
        on_cpu = next(model.parameters()).device.type == "cpu"
        fixed_streams = None if self.cpu_streams == "auto" else int(self.cpu_streams)
        if not on_cpu:
            count = 64 if self.batch_size == "auto" else int(self.batch_size)
            seconds = max(self.batch_seconds, 240.0) if self.batch_size == "auto" else self.batch_seconds
            return count, seconds, 1, None
        if self.batch_size != "auto" and fixed_streams is not None:
            return int(self.batch_size), self.batch_seconds, fixed_streams, None
        if self._auto_choice is None:
            # CPU: one clip per call. Measured on the tiny and small Gemma 4 encoders, padded batches of 4
            # or 16 ran 2-3x slower per audio second (large conv maps and copies); see docs/benchmarks.md.
            counts = [1] if self.batch_size == "auto" else [int(self.batch_size)]
            if fixed_streams is not None:
                streams = [fixed_streams]
            else:
                streams = [1, 2] if torch.get_num_threads() >= 2 else [1]
            self._auto_choice = {
                "trials": [
                    {"count": c, "streams": k, "seconds": 0.0, "audio": 0.0} for k in streams for c in counts
                ],
                "chosen": None,
                "next": 0,
            }
        auto = self._auto_choice
        if auto["chosen"] is not None:
            return auto["chosen"]["count"], self.batch_seconds, auto["chosen"]["streams"], None
        trials = auto["trials"]
        # Time each setting on >= 5 s of audio, two rounds each, then keep the fastest per audio second.
        if len(trials) == 1 or (all(t["audio"] >= 5.0 for t in trials) and auto["next"] >= 2 * len(trials)):
            best = min(trials, key=lambda t: t["seconds"] / max(t["audio"], 1e-9))
            auto["chosen"] = {"count": best["count"], "streams": best["streams"]}
            logger.info(
                "gemma-rvq: auto batching on CPU chose %d clips per call, %d concurrent calls",
                best["count"],
                best["streams"],
            )
            return best["count"], self.batch_seconds, best["streams"], None
        trial = trials[auto["next"] % len(trials)]
        auto["next"] += 1
        return trial["count"], self.batch_seconds, trial["streams"], trial


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    model.eval().requires_grad_(False)
    params = next(model.parameters(), None)
    if params is not None and (params.device != device or (dtype is not None and params.dtype != dtype)):
        model.to(device=device, dtype=dtype)
    return model


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return name


def _configure_worker_threads(num_threads: int | None) -> None:
    global _THREADS_SET_IN
    if os.getpid() == _THREADS_SET_IN:  # once per process; a forked child inherits the parent's flag
        return
    _THREADS_SET_IN = os.getpid()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    elif _in_subprocess():
        # One thread per worker: num_proc workers share the cores, and a forked child must not re-enter
        # an OpenMP pool its parent created (that deadlocks).
        torch.set_num_threads(1)


def _is_single_example(batch: Mapping[str, Any], column: str) -> bool:
    """True when ``batch`` holds one example (``map`` with ``batched=False``, or one example given directly)
    rather than a batch.

    ``datasets`` says it for its default format (a ``LazyRow`` vs a ``LazyBatch``). Otherwise, as
    transformers' audio feature extractors read their input: one dict, path, decoder, list of numbers or
    1-D array is one example; a 2-D array is one multi-channel ``[C, S]`` example unless a sibling
    column shows a batch of that many rows (numpy-formatted batches); a list of values is a batch.
    """
    try:
        from datasets.formatting.formatting import LazyBatch, LazyRow
    except ImportError:  # pragma: no cover - datasets is a dependency of gemma-rvq
        LazyBatch = LazyRow = ()
    if isinstance(batch, LazyRow):
        return True
    if isinstance(batch, LazyBatch):
        return False
    value = batch[column]
    if isinstance(value, (Mapping, str, bytes, os.PathLike)) or hasattr(value, "get_all_samples"):
        return True
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if (isinstance(value, np.ndarray) and value.dtype == object) or value.ndim > 2:
            return False
        if value.ndim == 2:
            for key in batch:
                if key == column:
                    continue
                sibling = batch[key]
                if sibling is None or isinstance(sibling, (str, bytes, int, float, np.generic)) or (
                    isinstance(sibling, (np.ndarray, torch.Tensor)) and sibling.ndim == 0
                ):
                    return True
                if isinstance(sibling, (Sequence, np.ndarray, torch.Tensor)) and len(sibling) == len(value):
                    return False
        return True
    return bool(isinstance(value, Sequence) and len(value) and isinstance(value[0], (int, float, np.number)))


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


tokenize_speech = SpeechTokenizer()
"""``dataset.map(tokenize_speech, batched=True)``: the default model (``$GEMMA_RVQ_MODEL`` or
:data:`DEFAULT_MODEL`), loaded on first call, ``"gemma_rvq"`` format, column ``semantic_tokens``."""

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_ENV_VAR",
    "SpeechTokenizer",
    "path_digest",
    "state_dict_digest",
    "tokenize_speech",
]
