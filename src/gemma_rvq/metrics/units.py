"""Edit-distance metrics of unit sequences: the stage-2 unit error rate, and character error rates.

A *unit* is one rendered frame of a token string (all its levels; after run-length collapse when the
format deduplicates). The unit error rate (UER) of stage 2 compares the units it generates from a text
with the units stage 1 gives for the audio of the same utterance:

    UER = (substitutions + deletions + insertions) / reference units

summed over all utterances before dividing (as WER is), at the frame level (a frame is correct only when
every level matches) and per level (level ``l``'s code sequence alone). Plain numpy; the evaluate module
``unit_error_rate`` wraps :func:`unit_error_rate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["character_error_rate", "edit_distance", "unit_error_rate"]


def edit_distance(hypothesis: Sequence[Any] | np.ndarray, reference: Sequence[Any] | np.ndarray) -> int:
    """Levenshtein distance between two sequences of comparable items (ints, strings, frame ids).

    One numpy pass per hypothesis item: the insertion chain of a row is a running minimum
    (``min_j (d[j] - j) + j``), so no Python loop runs over the reference.
    """
    hyp, ref = _as_ids(hypothesis, reference)
    if len(ref) == 0:
        return len(hyp)
    if len(hyp) == 0:
        return len(ref)
    positions = np.arange(len(ref) + 1)
    row = positions.copy()
    for item in hyp:
        substitution = row[:-1] + (ref != item)
        deletion = row[1:] + 1
        candidate = np.empty_like(row)
        candidate[0] = row[0] + 1
        candidate[1:] = np.minimum(substitution, deletion)
        row = np.minimum.accumulate(candidate - positions) + positions  # insertions along the row
    return int(row[-1])


def _as_ids(a: Sequence[Any] | np.ndarray, b: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two sequences as int arrays over a shared vocabulary (strings and other hashables included)."""
    arrays = [np.asarray(a), np.asarray(b)]
    if all(x.dtype.kind in "iub" and x.ndim == 1 for x in arrays):
        return arrays[0].astype(np.int64), arrays[1].astype(np.int64)
    vocab: dict[Any, int] = {}
    return tuple(np.array([vocab.setdefault(item, len(vocab)) for item in seq], dtype=np.int64)
                 for seq in (list(a), list(b)))


def _frames(codes: Any, name: str) -> np.ndarray:
    array = np.asarray(codes, dtype=np.int64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be codes [Q, T] per example, got shape {array.shape}")
    return array


def unit_error_rate(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, Any]:
    """UER of generated units against reference units, frame level and per level.

    Args:
        predictions: per utterance, the generated codes ``[Q, T']`` (e.g. ``fmt.parse(text).codes``).
        references: per utterance, the reference codes ``[Q, T]`` (the audio's units, same format).

    Returns:
        ``unit_error_rate`` (frame level), ``unit_error_rate_per_level`` (Q values), ``num_reference_units``,
        ``num_utterances``. Values can exceed 1 (insertions).
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("unit_error_rate needs at least one utterance")
    frame_edits = 0
    level_edits: np.ndarray | None = None
    total = 0
    for index, (pred, ref) in enumerate(zip(predictions, references)):
        pred, ref = _frames(pred, "predictions"), _frames(ref, "references")
        if pred.shape[0] != ref.shape[0] and pred.shape[1] and ref.shape[1]:
            raise ValueError(f"utterance {index}: predictions have {pred.shape[0]} levels, references "
                             f"{ref.shape[0]}")
        levels = ref.shape[0]
        if level_edits is None:
            level_edits = np.zeros(levels, dtype=np.int64)
        # a frame as one item: rows of the joint [T, Q] table -> ids
        joint = np.concatenate([pred.T, ref.T]) if pred.shape[1] else ref.T
        _, ids = np.unique(joint.reshape(len(joint), -1), axis=0, return_inverse=True)
        ids = ids.reshape(-1)
        frame_edits += edit_distance(ids[: pred.shape[1]], ids[pred.shape[1]:])
        for level in range(levels):
            level_edits[level] += edit_distance(pred[level] if pred.shape[1] else [], ref[level])
        total += ref.shape[1]
    if total == 0:
        raise ValueError("the references hold no units")
    return {"unit_error_rate": frame_edits / total,
            "unit_error_rate_per_level": (level_edits / total).tolist(),
            "num_reference_units": int(total), "num_utterances": len(references)}


def character_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Character edits / reference characters, summed over utterances (jiwer's CER definition)."""
    edits = sum(edit_distance(list(p), list(r)) for p, r in zip(predictions, references, strict=True))
    total = sum(len(r) for r in references)
    if total == 0:
        raise ValueError("the references hold no characters")
    return edits / total
