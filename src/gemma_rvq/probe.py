"""Tokenizer content probe: do the tokens carry what was said?

A small CTC model (tokens -> characters) is trained on the train split's tokens and transcripts and
scored by character error rate (CER) on the dev split (unseen voice), as DASB / SpeechBrain's
discrete-SSL benchmarks and Ichigo's WER tables do with far larger probes:

- :func:`train_ctc_probe`: one probe on unit sequences ``[L, T]`` (the first L RVQ levels, or k-means units);
- :func:`content_probe`: the probe for the first 1..Q levels of an RVQ model's codes and for a Spire-style
  k-means tokenizer fitted on the same encoder features (K units on the train frames), so the numbers
  compare tokenizers at equal cost.

The probe is deliberately small (per-level embeddings summed, two 1-D convolutions, a linear CTC head;
frames repeated ``upsample`` times so that short token sequences can still emit every character), so it
runs in seconds on a CPU; its CER is a relative measure between tokenizers on the same data, not an ASR
result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .metrics.functional import character_error_rate

__all__ = ["ProbeResult", "content_probe", "kmeans_units", "train_ctc_probe"]


@dataclass
class ProbeResult:
    """CER of one probe on the dev split, with its training loss and a few decoded examples."""

    cer: float
    train_loss: float
    examples: list[tuple[str, str]]  # (reference, hypothesis)


class _Probe(nn.Module):
    """Per-level unit embeddings summed, a window of 5 frames mixed by two linear layers, a CTC head.

    (The window is an ``unfold`` + ``Linear``, i.e. a 1-D convolution computed as a matmul: on a CPU this
    trains several times faster than ``Conv1d`` at these small widths.)
    """

    def __init__(self, sizes: Sequence[int], num_chars: int, hidden: int, upsample: int, window: int = 5) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(size, hidden) for size in sizes)
        self.upsample, self.window = upsample, window
        self.mix = nn.Sequential(nn.Linear(window * hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, num_chars + 1)  # + blank (index 0)

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        """``units [B, L, T]`` -> log-probabilities ``[B, T * upsample, C + 1]``."""
        x = sum(embedding(units[:, level]) for level, embedding in enumerate(self.embeddings))  # [B, T, H]
        x = x.repeat_interleave(self.upsample, dim=1)
        pad = self.window // 2
        windows = nn.functional.pad(x, (0, 0, pad, pad)).unfold(1, self.window, 1)  # [B, T', H, W]
        x = x + self.mix(windows.flatten(2))
        return self.head(x).log_softmax(-1)


def _batch(units: Sequence[np.ndarray], levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([u.shape[1] for u in units])
    out = torch.zeros(len(units), levels, int(lengths.max()), dtype=torch.long)
    for i, u in enumerate(units):
        out[i, :, : u.shape[1]] = torch.as_tensor(np.asarray(u[:levels]), dtype=torch.long)
    return out, lengths


def train_ctc_probe(
    train_units: Sequence[Any],
    train_texts: Sequence[str],
    dev_units: Sequence[Any],
    dev_texts: Sequence[str],
    *,
    sizes: Sequence[int],
    steps: int = 300,
    hidden: int = 64,
    upsample: int = 2,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> ProbeResult:
    """Train a CTC probe on ``train_units`` -> ``train_texts``; CER of its greedy decoding on the dev split.

    Args:
        train_units / dev_units: per utterance, units ``[L, T]`` (ints; level ``l`` in ``[0, sizes[l])``).
        train_texts / dev_texts: the transcripts (lower-cased; characters unseen in training count as errors).
        sizes: the number of distinct units of each of the L levels.
        steps: full-batch Adam steps (the demo's corpus has a few dozen utterances).
    """
    if len(train_units) != len(train_texts) or len(dev_units) != len(dev_texts):
        raise ValueError("units and texts must have the same number of utterances")
    if not train_units or not dev_units:
        raise ValueError("the probe needs train and dev utterances")
    levels = len(sizes)
    train_units = [np.asarray(u).reshape(-1, np.asarray(u).shape[-1])[:levels] for u in train_units]
    dev_units = [np.asarray(u).reshape(-1, np.asarray(u).shape[-1])[:levels] for u in dev_units]
    train_texts = [t.lower() for t in train_texts]
    dev_texts = [t.lower() for t in dev_texts]
    chars = sorted({c for t in train_texts for c in t})
    index = {c: i + 1 for i, c in enumerate(chars)}
    torch.manual_seed(seed)
    probe = _Probe(sizes, len(chars), hidden, upsample)
    optimizer = torch.optim.Adam(probe.parameters(), lr=learning_rate)
    x, lengths = _batch(train_units, levels)
    targets = [torch.tensor([index[c] for c in t]) for t in train_texts]
    target_lengths = torch.tensor([len(t) for t in targets])
    flat_targets = torch.cat(targets)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    loss = torch.tensor(float("nan"))
    probe.train()
    for _ in range(steps):
        log_probs = probe(x).transpose(0, 1)  # [T', B, C+1]
        loss = ctc(log_probs, flat_targets, lengths * upsample, target_lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.eval()
    with torch.no_grad():
        dev_x, dev_lengths = _batch(dev_units, levels)
        best = probe(dev_x).argmax(-1)  # [B, T']
    hypotheses = []
    for row, length in zip(best.tolist(), (dev_lengths * upsample).tolist()):
        out, previous = [], 0
        for symbol in row[:length]:
            if symbol != previous and symbol != 0:
                out.append(chars[symbol - 1])
            previous = symbol
        hypotheses.append("".join(out))
    return ProbeResult(cer=character_error_rate(hypotheses, dev_texts), train_loss=float(loss.detach()),
                       examples=list(zip(dev_texts, hypotheses))[:3])


def kmeans_units(train_features: Sequence[Any], dev_features: Sequence[Any], num_units: int, *, seed: int = 0
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A Spire-style k-means tokenizer: ``num_units`` centroids fitted on the train frames ``[T, D]``;
    returns the units ``[1, T]`` of every train and dev utterance (nearest centroid, duplicates kept)."""
    from .quantization import kmeans

    frames = torch.cat([torch.as_tensor(np.asarray(f), dtype=torch.float32) for f in train_features])
    centroids, _ = kmeans(frames, num_units, generator=torch.Generator().manual_seed(seed))

    def assign(features: Sequence[Any]) -> list[np.ndarray]:
        out = []
        for f in features:
            x = torch.as_tensor(np.asarray(f), dtype=torch.float32)
            out.append(torch.cdist(x, centroids).argmin(-1).numpy()[None])
        return out

    return assign(train_features), assign(dev_features)


def content_probe(
    train_codes: Sequence[Any],
    train_texts: Sequence[str],
    dev_codes: Sequence[Any],
    dev_texts: Sequence[str],
    *,
    codebook_size: int,
    train_features: Sequence[Any] | None = None,
    dev_features: Sequence[Any] | None = None,
    kmeans_size: int | None = None,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """The probe's dev CER for the first 1..Q levels of RVQ codes, and for k-means units on the same features.

    Args:
        train_codes / dev_codes: per utterance, RVQ codes ``[Q, T]``.
        train_features / dev_features: per utterance, the encoder frames ``[T, D]`` the RVQ quantizes;
            when given, a k-means tokenizer with ``kmeans_size`` units (default: ``codebook_size``) is
            fitted on the train frames and probed too.
        probe_kwargs: :func:`train_ctc_probe` options (``steps``, ``hidden``, ``upsample``, ``seed``...).

    Returns:
        ``{"levels": {1: ProbeResult, ..., Q: ...}, "kmeans": ProbeResult | None, "kmeans_size": int | None}``.
    """
    num_levels = int(np.asarray(train_codes[0]).shape[0])
    results: dict[str, Any] = {"levels": {}, "kmeans": None, "kmeans_size": None}
    for levels in range(1, num_levels + 1):
        results["levels"][levels] = train_ctc_probe(train_codes, train_texts, dev_codes, dev_texts,
                                                    sizes=[codebook_size] * levels, **probe_kwargs)
    if train_features is not None and dev_features is not None:
        size = kmeans_size or codebook_size
        train_units, dev_units = kmeans_units(train_features, dev_features, size,
                                              seed=probe_kwargs.get("seed", 0))
        results["kmeans"] = train_ctc_probe(train_units, train_texts, dev_units, dev_texts, sizes=[size],
                                            **probe_kwargs)
        results["kmeans_size"] = size
    return results
