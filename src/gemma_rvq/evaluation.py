"""Score a speech tokenizer on audio files: backs ``gemma-rvq evaluate``.

The audio goes through the model's frozen encoder once; the frame embeddings are then scored with
:func:`gemma_rvq.training.trainer.evaluate_frames` (the same code the trainer runs at every eval), so
the numbers are directly comparable with a training run's dev metrics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .audio import decode_audio, prepare_waveform


@torch.no_grad()
def embed_audio_files(model: Any, files: Sequence[str | os.PathLike], *, batch_size: int = 16) -> torch.Tensor:
    """Valid encoder frames of every file, concatenated: ``FloatTensor [N, D]`` (float32, CPU).

    Files are sorted by length into batches so little compute goes to padding; long files are chunked
    by the model (never cut).
    """
    if not files:
        raise ValueError("no audio files to evaluate")
    waves = []
    for path in files:
        array, rate = decode_audio(path)
        waves.append(prepare_waveform(array, rate, model.sampling_rate, name=str(path)))
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    frames = []
    for start in tqdm(range(0, len(order), batch_size), desc="Encoding audio", unit="batch"):
        batch = [waves[i] for i in order[start : start + batch_size]]
        embeddings, mask = model.embed(batch, sampling_rate=model.sampling_rate)
        frames.append(embeddings[mask].float().cpu())
    return torch.cat(frames)


def evaluate_audio_files(
    model: Any, files: Sequence[str | os.PathLike], *, batch_size: int = 16
) -> dict[str, Any]:
    """RVQ quality of ``model`` on ``files``: MSE, NMSE, FVU, cosine (raw and centred), utilization and
    perplexity (overall and per level) and the error after each number of levels, as a JSON-ready dict."""
    from .training.trainer import evaluate_frames

    frames = embed_audio_files(model, files, batch_size=batch_size)
    results = evaluate_frames(model, frames)
    results.pop("code_counts", None)
    results["num_files"] = len(files)
    results["seconds_of_audio"] = frames.shape[0] / model.frame_rate
    return results
