"""Word timings from a CTC model: forced alignment (Viterbi) of a transcript to the model's emissions.

:func:`build_interleaved_dataset <gemma_rvq.recipes.interleave.build_interleaved_dataset>` switches between text
and speech at word boundaries, so it needs, per utterance, each word's start and end in seconds. A dataset may
carry them (the bundled corpus does: ``data/corpus/words.jsonl``); otherwise :class:`CTCWordAligner` computes
them with any CTC model of transformers (``Wav2Vec2ForCTC``, ``HubertForCTC``, ...) and its character
tokenizer, as a ``datasets.map`` transform.

Why our own Viterbi: ``torchaudio.functional.forced_align`` is the usual tool, but torchaudio's newest wheel
(2.11) is built against an older torch than ours and does not load beside it, and the maintained alternatives
either need a C++ build at install time or pull in model downloads and ONNX runtimes. The dynamic program is
small: :func:`ctc_forced_align` is tested against brute-force enumeration of every CTC path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["CTCWordAligner", "ctc_forced_align", "ctc_token_spans", "ctc_word_timings"]


def ctc_forced_align(log_probs: torch.Tensor, targets: Sequence[int] | torch.Tensor, *, blank: int = 0):
    """The most likely CTC path of ``log_probs`` that reads exactly ``targets``.

    Args:
        log_probs: ``[T, V]`` log-probabilities (log-softmax of a CTC model's logits) of one utterance.
        targets: ``[S]`` token ids, no blanks; repeated tokens need a blank between them in the path.
        blank: the blank id.

    Returns:
        ``(path, scores)``: ``path`` ``LongTensor [T]`` with the token (or blank) each frame emits along the
        best path, ``scores`` ``FloatTensor [T]`` the frame log-probabilities along it (their sum is the path's
        log-probability).

    Raises:
        ValueError: ``T`` frames cannot hold the targets (``S`` plus one per repeated pair), or a target is the
            blank or outside ``[0, V)``.
    """
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs must be [T, V] (one utterance), got shape {tuple(log_probs.shape)}")
    frames, vocab = log_probs.shape
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab or (targets == blank).any()):
        raise ValueError(f"targets must be non-blank ids in [0, {vocab}), got {targets.tolist()}")
    repeats = int((targets[1:] == targets[:-1]).sum()) if targets.numel() > 1 else 0
    if frames < targets.numel() + repeats:
        raise ValueError(f"{frames} frames cannot hold {targets.numel()} target tokens ({repeats} repeated pairs "
                         "need a blank between them): the audio is too short for its transcript")
    lp = log_probs.detach().float()
    states = torch.full((2 * targets.numel() + 1,), blank, dtype=torch.long)
    states[1::2] = targets
    n = states.numel()
    # a state may come from itself, the previous one, or skip a blank between two different tokens
    skip = torch.zeros(n, dtype=torch.bool)
    if n > 2:
        skip[2:] = (states[2:] != blank) & (states[2:] != states[:-2])
    neg = torch.tensor(float("-inf"))
    alpha = torch.full((n,), float("-inf"))
    alpha[0] = lp[0, blank]
    if n > 1:
        alpha[1] = lp[0, states[1]]
    back = torch.zeros((frames, n), dtype=torch.int8)
    for t in range(1, frames):
        stay = alpha
        step = torch.cat([neg.view(1), alpha[:-1]])
        jump = torch.where(skip, torch.cat([neg.expand(2), alpha[:-2]]), neg)
        candidates = torch.stack([stay, step, jump])  # [3, n]
        best, choice = candidates.max(0)
        back[t] = choice.to(torch.int8)
        alpha = best + lp[t, states]
    last = n - 1 if n == 1 or alpha[n - 1] >= alpha[n - 2] else n - 2
    if not torch.isfinite(alpha[last]):
        raise ValueError("no CTC path reads the targets (log_probs are -inf on every path)")
    path_states = torch.empty(frames, dtype=torch.long)
    state = last
    for t in range(frames - 1, -1, -1):
        path_states[t] = state
        state -= int(back[t, state])
    path = states[path_states]
    return path, lp[torch.arange(frames), path]


def ctc_token_spans(path: torch.Tensor, num_targets: int, *, blank: int = 0) -> list[tuple[int, int]]:
    """``[(first frame, end frame)]`` of each target token along a path from :func:`ctc_forced_align`.

    A token's span covers the frames that emit it (end exclusive); blanks belong to no token. Consecutive
    frames of the same id are one token unless a blank separates them.
    """
    spans: list[tuple[int, int]] = []
    previous = blank
    for t, token in enumerate(path.tolist()):
        if token != blank and token != previous:
            spans.append((t, t + 1))
        elif token != blank:
            spans[-1] = (spans[-1][0], t + 1)
        previous = token
    if len(spans) != num_targets:
        raise ValueError(f"the path reads {len(spans)} tokens, expected {num_targets}")
    return spans


def ctc_word_timings(log_probs: torch.Tensor, words: Sequence[Sequence[int]], seconds_per_frame: float, *,
                     blank: int = 0, delimiter: int | None = None) -> list[tuple[float, float]]:
    """``[(start, end)]`` seconds of each word, by forced alignment of the words' token ids.

    Args:
        log_probs: ``[T, V]`` of one utterance.
        words: token ids of each word (at least one per word).
        seconds_per_frame: the model's frame hop (e.g. 0.02 for wav2vec2 at 16 kHz).
        delimiter: a word-delimiter token placed between words (wav2vec2's ``|``), or ``None``.

    A word runs from the first frame of its first token to the end of its last token's frames.
    """
    if any(len(ids) == 0 for ids in words):
        raise ValueError("every word needs at least one token id")
    targets: list[int] = []
    owner: list[int] = []
    for index, ids in enumerate(words):
        if index and delimiter is not None:
            targets.append(delimiter)
            owner.append(-1)
        targets += list(ids)
        owner += [index] * len(ids)
    path, _ = ctc_forced_align(log_probs, targets, blank=blank)
    spans = ctc_token_spans(path, len(targets), blank=blank)
    timings = []
    for index in range(len(words)):
        mine = [span for span, who in zip(spans, owner) if who == index]
        timings.append((mine[0][0] * seconds_per_frame, mine[-1][1] * seconds_per_frame))
    return timings


class CTCWordAligner:
    """A ``datasets.map`` transform: audio + transcript -> a ``words`` column of ``{"word", "start", "end"}``.

    Args:
        model: a transformers CTC model (``Wav2Vec2ForCTC``, ``HubertForCTC``, ...), used in eval mode.
        processor: its processor (feature extractor + character tokenizer, e.g. ``Wav2Vec2Processor``).
        audio_column / text_column / words_column: column names.
        lowercase / uppercase: normalise each word before tokenising (the vocabulary's case).

    Words are the transcript's whitespace-separated words, kept verbatim in the output; characters the
    tokenizer does not know are dropped for the alignment, and a word left with no token at all (a lone
    punctuation mark) joins the previous word. Works on one example or a batch (``batched=True``).
    """

    def __init__(self, model, processor, *, audio_column: str = "audio", text_column: str = "text",
                 words_column: str = "words", lowercase: bool = False, uppercase: bool = False) -> None:
        self.model = model.eval()
        self.processor = processor
        self.audio_column, self.text_column, self.words_column = audio_column, text_column, words_column
        self.lowercase, self.uppercase = lowercase, uppercase
        tokenizer = processor.tokenizer
        self.blank = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        delimiter = getattr(tokenizer, "word_delimiter_token", None)
        self.delimiter = tokenizer.convert_tokens_to_ids(delimiter) if delimiter else None
        self.sampling_rate = processor.feature_extractor.sampling_rate

    def _word_ids(self, word: str) -> list[int]:
        tokenizer = self.processor.tokenizer
        if self.lowercase:
            word = word.lower()
        if self.uppercase:
            word = word.upper()
        ids = tokenizer(word, add_special_tokens=False).input_ids
        unknown = tokenizer.unk_token_id
        return [i for i in ids if i not in (unknown, self.blank, self.delimiter)]

    def align(self, waveform, transcript: str) -> list[dict[str, Any]]:
        """Word timings of one utterance: ``waveform`` ``[S]`` at the processor's rate, ``transcript`` text."""
        words = transcript.split()
        if not words:
            raise ValueError("the transcript is empty")
        units: list[list] = []
        for word in words:
            ids = self._word_ids(word)
            if ids:
                units.append([word, ids])
            elif units:
                units[-1][0] += " " + word
            else:  # a leading symbol-only word joins the next one
                units.append([word, []])
        if units and not units[0][1]:
            first = units.pop(0)[0]
            if not units:
                raise ValueError(f"no character of {transcript!r} is in the CTC vocabulary")
            units[0][0] = f"{first} {units[0][0]}"
        features = self.processor(waveform, sampling_rate=self.sampling_rate, return_tensors="pt")
        with torch.no_grad():
            logits = self.model(features.input_values).logits[0]
        num_samples = features.input_values.shape[-1]
        seconds_per_frame = num_samples / self.sampling_rate / logits.shape[0]
        timings = ctc_word_timings(logits.log_softmax(-1), [ids for _, ids in units], seconds_per_frame,
                                   blank=self.blank, delimiter=self.delimiter)
        duration = num_samples / self.sampling_rate
        return [{"word": word, "start": round(min(start, duration), 6), "end": round(min(end, duration), 6)}
                for (word, _), (start, end) in zip(units, timings)]

    def _waveform(self, audio) -> Any:
        from .audio import load_waveform, source_name

        return load_waveform(audio, self.sampling_rate, name=source_name(audio, self.audio_column))

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        audio, text = example[self.audio_column], example[self.text_column]
        if isinstance(text, list):
            return {self.words_column: [self.align(self._waveform(a), t) for a, t in zip(audio, text)]}
        return {self.words_column: self.align(self._waveform(audio), text)}
