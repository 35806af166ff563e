"""Scoring a speech tokenizer: the one place where RVQ quality is computed.

Everything that reports a quality number goes through :func:`evaluate_frames`: the trainer's dev metrics
(and so the ``best`` export and the model cards), ``gemma-rvq evaluate`` (:func:`evaluate_audio_files`)
and the training benchmark (gemma-rvq and the vector-quantize-pytorch baseline alike). The metric math is
:mod:`gemma_rvq.metrics.functional`; this module feeds it frames, codes and reconstructions.

A model is scored through two calls, ``encode_frames(x [n, D]) -> codes [n, Q]`` and
``decode_frames(codes [n, k]) -> reconstruction [n, D]`` (the first k levels): a ``GemmaRVQModel`` is
adapted by :class:`GemmaRVQFrameCodec` (its public ``encode(embeddings=...)`` / ``decode``); any other
quantizer can be scored by passing an object with those two methods and ``num_quantizers`` /
``codebook_size`` attributes (a :class:`FrameCodec`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .audio import load_waveform

__all__ = [
    "LEVEL_ERROR_KEYS",
    "FrameCodec",
    "GemmaRVQFrameCodec",
    "as_frame_codec",
    "embed_audio_files",
    "evaluate_audio_files",
    "evaluate_frames",
    "iter_audio_frames",
    "metric_plots",
]

#: The reconstruction metrics reported after each number of levels in ``level_errors``.
LEVEL_ERROR_KEYS: tuple[str, ...] = ("mse", "nmse", "fvu", "cosine_similarity", "centred_cosine_similarity")


@runtime_checkable
class FrameCodec(Protocol):
    """What :func:`evaluate_frames` needs of a quantizer (frames are rows, all valid)."""

    num_quantizers: int
    codebook_size: int

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``FloatTensor [n, D]`` -> ``LongTensor [n, Q]``."""

    def decode_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """``LongTensor [n, k]`` (the first k <= Q levels) -> ``FloatTensor [n, D]``."""


class GemmaRVQFrameCodec:
    """A ``GemmaRVQModel`` seen as a :class:`FrameCodec`, through its public ``encode`` / ``decode``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.num_quantizers = int(model.config.num_quantizers)
        self.codebook_size = int(model.config.codebook_size)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.encode(embeddings=frames[None]).audio_codes[0].t()  # [1, Q, n] -> [n, Q]

    def decode_frames(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes.t()[None]).embeddings[0]  # [n, k] -> [1, k, n] -> [n, D]


def as_frame_codec(model: Any) -> FrameCodec:
    """``model`` itself when it already is a :class:`FrameCodec`, else a :class:`GemmaRVQFrameCodec`."""
    if isinstance(model, FrameCodec):
        return model
    if hasattr(model, "config") and hasattr(model, "encode") and hasattr(model, "decode"):
        return GemmaRVQFrameCodec(model)
    raise ValueError(f"cannot score a {type(model).__name__}: expected a GemmaRVQModel or an object with "
                     "encode_frames, decode_frames, num_quantizers and codebook_size")


def _device_of(model: Any) -> torch.device:
    module = model.model if isinstance(model, GemmaRVQFrameCodec) else model
    if isinstance(module, nn.Module):
        for tensor in list(module.parameters()) + list(module.buffers()):
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_frames(model: Any, frames: torch.Tensor | Iterable[torch.Tensor], *, chunk_size: int = 8192,
                    per_level: bool = True, mean: torch.Tensor | None = None) -> dict[str, Any]:
    """Every metric of :mod:`gemma_rvq.metrics.functional` of ``model`` on encoder frames.

    Args:
        model: a ``GemmaRVQModel`` or a :class:`FrameCodec`.
        frames: ``FloatTensor [N, D]`` (streamed ``chunk_size`` rows at a time), or an iterable of
            ``[n_i, D]`` chunks (e.g. one per audio file; then ``mean`` is required, since the centred
            cosine needs the centring vector before the first chunk).
        per_level: also score the reconstruction from the first k levels, k = 1..Q.
        mean: ``[D]`` centring vector of the centred cosine (default: the mean of ``frames``).

    Returns:
        ``num_frames, mse, nmse, fvu, cosine_similarity, centred_cosine_similarity`` (all Q levels),
        ``num_code_frames, codebook_utilization(_per_level), codebook_perplexity(_per_level),
        pooled_perplexity``, ``code_counts`` (``LongTensor [Q, K]``; drop it before writing JSON) and,
        with ``per_level``, ``level_errors = {"num_quantizers": [1..Q], "mse": [...], ...}`` (one value
        per k, keys :data:`LEVEL_ERROR_KEYS`; the last entry equals the top-level number). Streaming is
        exact: the result equals the one-shot metrics over all frames (float64 sums).
    """
    from .metrics.functional import RVQStatsAccumulator

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(frames, torch.Tensor):
        if frames.dim() != 2:
            raise ValueError(f"frames must be [N, D], got shape {list(frames.shape)}")
        if frames.shape[0] == 0:
            raise ValueError("no frames to evaluate")
        if mean is None:
            mean = frames.double().mean(0)
        chunks: Iterable[torch.Tensor] = frames.split(chunk_size)
    else:
        if mean is None:
            raise ValueError("streaming frames in chunks needs the centring vector: pass mean=[D]")
        chunks = frames
    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    was_training = bool(getattr(module, "training", False))
    if isinstance(module, nn.Module):
        module.eval()
    codec = as_frame_codec(model)
    device = _device_of(codec)
    q, k = codec.num_quantizers, codec.codebook_size
    levels = list(range(1, q + 1)) if per_level else [q]
    accs = {lv: RVQStatsAccumulator(k, mean=mean) for lv in levels}
    try:
        for chunk in chunks:
            for piece in chunk.split(chunk_size):
                x = piece.to(device=device, dtype=torch.float32)
                codes = codec.encode_frames(x).long()  # [n, Q]
                if codes.shape != (x.shape[0], q):
                    raise ValueError(f"encode_frames returned shape {list(codes.shape)}, expected "
                                     f"[{x.shape[0]}, {q}]")
                target = x.cpu()
                for lv in levels:
                    recon = codec.decode_frames(codes[:, :lv]).float().cpu()
                    accs[lv].update(prediction=recon, target=target,
                                    codes=codes.t().unsqueeze(0).cpu() if lv == q else None)
    finally:
        if isinstance(module, nn.Module):
            module.train(was_training)
    if accs[q].num_frames == 0:
        raise ValueError("no frames to evaluate")
    out: dict[str, Any] = accs[q].compute()
    out["code_counts"] = accs[q].counts  # [Q, K] long tensor (dropped from JSON logs; used for plots)
    if per_level:
        per = [accs[lv].compute() for lv in levels]
        out["level_errors"] = {"num_quantizers": levels, **{m: [p[m] for p in per] for m in LEVEL_ERROR_KEYS}}
    return out


def metric_plots(folder: str | os.PathLike, metrics: dict[str, Any]) -> list[str]:
    """``code_usage.png`` (per-level code histograms) and ``level_errors.png`` (error vs levels used) of
    one :func:`evaluate_frames` result, written into ``folder``."""
    from .metrics import plots

    out = []
    if isinstance(metrics.get("code_counts"), torch.Tensor):
        out.append(plots.plot_code_usage(metrics["code_counts"], os.path.join(folder, "code_usage.png")))
    if "level_errors" in metrics:
        errors = {k: v for k, v in metrics["level_errors"].items()
                  if k in ("num_quantizers", "mse", "fvu", "cosine_similarity")}
        out.append(plots.plot_level_errors(errors, os.path.join(folder, "level_errors.png")))
    return out


# ---------------------------------------------------------------------------------------------- audio


def _load_waveform(model: Any, path: str | os.PathLike) -> Any:
    """One file as a float32 mono waveform at the model's rate (the audio module's checks and messages)."""
    return load_waveform(path, model.sampling_rate, min_samples=int(model.config.min_samples), name=str(path))


def _duration(path: str | os.PathLike) -> float:
    """Seconds of audio in ``path`` from its header (0 when the header cannot tell: decoded later)."""
    try:
        import soundfile

        info = soundfile.info(str(path))
        return info.frames / info.samplerate
    except Exception:  # any format soundfile cannot read is measured by decoding it
        return 0.0


@torch.no_grad()
def iter_audio_frames(model: Any, files: Sequence[str | os.PathLike], *, batch_size: int = 16,
                      batch_seconds: float = 120.0) -> Iterable[torch.Tensor]:
    """Valid encoder frames of ``files``, one ``FloatTensor [n, D]`` (float32, CPU) per encoder batch.

    Files are decoded batch by batch (never all at once), sorted by length so that little compute goes to
    padding, and grouped into batches of at most ``batch_size`` files and ``batch_seconds`` of audio (a
    longer file goes alone). Long files are cut into windows by the model itself, never truncated.
    """
    if not files:
        raise ValueError("no audio files to evaluate")
    if batch_size < 1 or batch_seconds <= 0:
        raise ValueError(f"batch_size must be >= 1 and batch_seconds > 0, got {batch_size}, {batch_seconds}")
    from tqdm.auto import tqdm

    durations = [_duration(f) for f in files]
    order = sorted(range(len(files)), key=lambda i: durations[i])
    batches: list[list[int]] = [[]]
    for i in order:
        batch = batches[-1]
        if batch and (len(batch) >= batch_size or sum(durations[j] for j in batch) + durations[i] > batch_seconds):
            batches.append([i])
        else:
            batch.append(i)
    for batch in tqdm(batches, desc="Encoding audio", unit="batch", disable=len(batches) < 2):
        waves = [_load_waveform(model, files[i]) for i in batch]
        embeddings, mask = model.embed(waves, sampling_rate=model.sampling_rate)
        yield embeddings[mask].float().cpu()
        del waves, embeddings, mask


def embed_audio_files(model: Any, files: Sequence[str | os.PathLike], *, batch_size: int = 16,
                      batch_seconds: float = 120.0) -> torch.Tensor:
    """Valid encoder frames of every file, concatenated: ``FloatTensor [N, D]`` (float32, CPU); see
    :func:`iter_audio_frames`."""
    return torch.cat(list(iter_audio_frames(model, files, batch_size=batch_size, batch_seconds=batch_seconds)))


def evaluate_audio_files(
    model: Any, files: Sequence[str | os.PathLike], *, batch_size: int = 16, batch_seconds: float = 120.0
) -> dict[str, Any]:
    """RVQ quality of ``model`` on ``files``: :func:`evaluate_frames` of their encoder frames (MSE, NMSE,
    FVU, cosine raw and centred, utilization and perplexity overall and per level, and the error after
    each number of levels), as a JSON-ready dict.

    Memory: one encoder batch (at most ``batch_size`` files and ``batch_seconds`` of audio; the model
    runs a long file's windows a batch at a time) plus the frames themselves, ``N x D`` float32 (kept for
    the centred cosine, which needs their mean before the first frame is scored): 95 s of audio at 25
    frames/s and D = 1024 is 10 MB.
    """
    frames = embed_audio_files(model, files, batch_size=batch_size, batch_seconds=batch_seconds)
    results = evaluate_frames(model, frames)
    results.pop("code_counts", None)
    results["num_files"] = len(files)
    results["seconds_of_audio"] = frames.shape[0] / model.frame_rate
    return results
