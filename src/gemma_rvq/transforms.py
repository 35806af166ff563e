"""The ``datasets.map`` transform: a speech column in, semantic token strings out.

    from gemma_rvq import tokenize_speech, SpeechTokenizer

    ds = ds.map(tokenize_speech, batched=True)          # default model, "gemma_rvq" format

    tok = SpeechTokenizer("path/or/hub-id", format="ichigo", return_codes=True, return_num_frames=True)
    ds = ds.map(tok, batched=True, with_indices=True, num_proc=4, with_rank=True)

``SpeechTokenizer`` wires four parts that live in their own modules: :mod:`gemma_rvq.audio` reads every
audio value, :mod:`gemma_rvq.model_registry` names and loads the model (and gives its cache identity),
:mod:`gemma_rvq.batching` plans the length-sorted encoder minibatches, and
:mod:`gemma_rvq.tokenizer_options` declares the options (which change the output, which only travel to
``num_proc`` workers).

Caching: ``datasets`` fingerprints a transform by pickling it. A :class:`SpeechTokenizer` pickles to a
small, stable identity (model id + revision, or a weights digest computed once; the token format;
gemma-rvq's version; the options that change the output), never to the model's weights. The model is
loaded lazily on first call, in whichever process runs the transform.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .audio import load_waveform, source_name
from .batching import STAT_KEYS, BatchPlanner, encode_sorted
from .model_registry import (  # noqa: F401 - _LOADED_MODELS / _MEMORY_MODELS: names kept for old imports
    _LOADED_MODELS,
    _MEMORY_MODELS,
    DEFAULT_MODEL,
    MODEL_ENV_VAR,
    ModelHandle,
    path_digest,
    resolve_device,
    state_dict_digest,
)
from .precision import Precision, choose_encoder_dtype
from .tokenizer_options import OPTION_NAMES, SpeechTokenizerOptions, check_keywords

logger = logging.getLogger(__name__)

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
        dtype: the encoder's compute dtype. ``"auto"`` (default): bfloat16 where the device has bf16
            arithmetic and the encoder measurably runs faster in it (CUDA from compute capability 8.0;
            a CPU with AVX512-BF16 / AMX / Arm BF16, timed on this model: see :mod:`gemma_rvq.precision`),
            float32 elsewhere. ``"float32"``, ``"bfloat16"``...: that dtype. The quantizer (projections,
            nearest-code search) runs in float32 either way (float64 with ``dtype="float64"``), as in the
            seed model card. ``None``: nothing is cast (the model as given). bf16 changes a few percent of
            the codes: the resolved choice is :attr:`precision`, part of the cache identity, and
            ``dtype="float32"`` gives the same codes on every machine's float32 kernels.
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
        dtype: str | torch.dtype | None = "auto",
        on_error: str = "raise",
        num_quantizers: int | None = None,
        revision: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        options = {k: v for k, v in locals().items() if k in OPTION_NAMES}
        self._options = SpeechTokenizerOptions(**options)
        self._handle = ModelHandle(model, revision=revision)
        self._format_spec = format
        self._precision: Precision | None = None  # dtype="auto" resolved: on first need, once
        self._init_runtime()
        # no weights loaded: the object's config, or a config.json at hand (the default model is resolved
        # from $GEMMA_RVQ_MODEL only when first used)
        config = self._handle.config_dict() if model is not None else None
        if config is not None and config.get("codebook_size") and config.get("num_quantizers"):
            # a format that cannot render this model's codes fails here, not after encoding every row
            from .formats import model_format

            self._format = self._fit_format(int(config["codebook_size"]), int(config["num_quantizers"]),
                                            stored=model_format(model))

    # ------------------------------------------------------------------ pickling / fingerprint
    def _init_runtime(self) -> None:
        self._format = None
        self._planner = BatchPlanner(self.batch_size, self.batch_seconds, self.max_padding, self.cpu_streams)
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    @property
    def options(self) -> SpeechTokenizerOptions:
        """Every option, validated (read-only: build a new ``SpeechTokenizer`` to change one)."""
        return self._options

    @property
    def revision(self) -> str | None:
        return self._handle.revision

    def model_identity(self) -> dict:
        """What identifies the model (see :meth:`gemma_rvq.model_registry.ModelHandle.identity`)."""
        return self._handle.identity()

    def identity(self) -> dict:
        """The small, stable dict a pickled transform carries: model identity, token format, gemma-rvq
        version, the options that change the output and the dtypes they resolve to (:attr:`precision`).
        Equal identities give equal outputs."""
        return {
            "gemma_rvq": _package_version(),
            "model": self.model_identity(),
            "format": self._format_identity(),
            "options": self._options.output_options(),
            "precision": self.precision.as_dict(),
        }

    @property
    def precision(self) -> Precision:
        """The dtypes this transform computes in: ``dtype`` with ``"auto"`` resolved for the device of this
        process (decided once, when first needed: at the latest when ``datasets`` fingerprints the
        transform; ``num_proc`` workers receive the decision and never re-decide)."""
        if self._precision is None:
            encoder_dtype = self.dtype
            if encoder_dtype == "auto":
                device = resolve_device(self.device, None)
                key = json.dumps(self.model_identity(), sort_keys=True)
                encoder_dtype = choose_encoder_dtype(device, lambda: self._handle.get(device, None), key)
            self._precision = Precision.for_encoder(encoder_dtype)
        return self._precision

    def __getstate__(self) -> dict:
        state = self.identity()
        state["load"] = self._handle.load_spec()  # how to get the model in another process; never weights
        state["runtime"] = self._options.runtime_options()
        return state

    def __setstate__(self, state: dict) -> None:
        self._options = SpeechTokenizerOptions(**state["options"], **state["runtime"])
        self._precision = Precision(**state["precision"])
        spec = state["format"]
        self._format_spec = spec["preset"] if set(spec) == {"preset"} else spec
        self._handle = ModelHandle.from_load_spec(state["load"], identity=state["model"])
        self._init_runtime()

    def __repr__(self) -> str:
        spec = self._format_identity()
        return (f"{type(self).__name__}(model={self._handle!r}, "
                f"format={spec.get('preset', spec.get('name', '...'))!r})")

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
            from .formats import model_format

            config = model.config
            self._format = self._fit_format(int(config.codebook_size), int(config.num_quantizers),
                                            stored=model_format(model))
        return self._format

    def _fit_format(self, codebook_size: int, num_quantizers: int, stored=None):
        """The format for a model with ``num_quantizers`` levels of ``codebook_size`` codes (``stored``: the
        format its folder records, see ``gemma_rvq.formats.fit_format``), or a ``ValueError`` when it cannot
        render every code the model (with ``num_quantizers=``) produces."""
        from .formats import fit_format

        if self.num_quantizers is not None and self.num_quantizers > num_quantizers:
            raise ValueError(f"num_quantizers={self.num_quantizers}, but the model has {num_quantizers} levels")
        levels = int(self.num_quantizers or num_quantizers)
        fmt = fit_format(self._format_spec, codebook_size=codebook_size, num_quantizers=levels,
                         stored=stored if self.num_quantizers is None else None)
        where = f"token format {getattr(fmt, 'name', fmt)!r} does not fit the model ({levels} levels of {codebook_size} codes)"
        if fmt.num_levels is not None and fmt.num_levels > levels:
            raise ValueError(f"{where}: it renders {fmt.num_levels} levels")
        if fmt.codebook_size is not None and fmt.codebook_size < codebook_size:
            raise ValueError(f"{where}: it takes codes below {fmt.codebook_size} only")
        try:  # whatever else the format checks (code point range...), on the largest codes
            fmt.render(np.full((levels, 2), codebook_size - 1, dtype=np.int64))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        return fmt

    @property
    def format(self):
        """The ``SemanticTokenFormat`` in use (a preset name is fitted to the model's Q and K; loads it)."""
        return self._format_for(self.get_model())

    def get_model(self, rank: int | None = None) -> torch.nn.Module:
        """The model, loaded (once per process) on the device for ``rank``, in eval mode."""
        precision = self.precision
        dtype, encoder_dtype = (getattr(torch, d) if d else None for d in (precision.quantizer, precision.encoder))
        return self._handle.get(resolve_device(self.device, rank), dtype, encoder_dtype)

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
        self._handle.check_unchanged()  # weights changed since datasets fingerprinted this transform?
        model = self.get_model(rank)
        render = self._format_for(model).render  # before any encoding: a misfit is not a row error
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
    def batch_plan(self) -> BatchPlanner:
        """This process's batch plan (``batch_plan.choice``: what ``"auto"`` chose on a CPU)."""
        return self._planner

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

        def encode_group(model, group: list[int]) -> None:
            self._encode_group(model, group, waves, codes, errors, indices, sr)

        encode_sorted(model, waves, sr, self._planner, encode_group, self.stats)
        return codes

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


def _option_property(name: str) -> property:
    return property(lambda self: getattr(self._options, name), doc=f"The ``{name}`` option (read-only).")


for _name in OPTION_NAMES:
    setattr(SpeechTokenizer, _name, _option_property(_name))

# Forgetting to declare an option must be impossible: __init__'s keywords are exactly the declared options
# (plus the model, its format and revision), so a new keyword without a declaration fails at import.
check_keywords(SpeechTokenizer.__init__, besides=("self", "model", "format", "revision"))


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
