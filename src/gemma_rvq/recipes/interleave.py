"""Continued-pretraining data: interleaved speech-text sequences (SpiritLM) and mixtures (SpireLM).

SpiritLM trains one LM on sequences that switch between text and speech tokens at word boundaries, each span
introduced by a modality marker (``[TEXT]``, ``[SPEECH]``); SpireLM continues pretraining a text LLM on a
mixture of text-only, speech-only and paired (speech -> transcript) documents before instruction tuning.
Both need nothing but a tokenized dataset:

- :func:`build_interleaved_dataset`: rows with a word-alignment column (``[{"word", "start", "end"}]``, in
  seconds) and the utterance's codes ``[Q][T]`` (or its token string) -> a ``text`` column that switches
  modality at word boundaries, with a configurable switching rate. A speech span of words ``i..j`` is exactly
  the frames ``round(start_i * frame_rate) .. round(end_j * frame_rate)``, rendered with the token format.
- :func:`render_cpt_rows` turns the same rows into one kind of document: ``text`` (the transcript),
  ``speech`` (the token string), ``paired`` (``[SPEECH]tokens[TEXT]transcript``) or ``interleaved``.
- :func:`mix_cpt_datasets` draws documents of each kind in exact ratios (by documents), and
  :func:`build_cpt_dataset` does both from one tokenized dataset.

The result is a plain ``text`` dataset for the ``cpt`` recipe of ``examples/sft.py``: causal-LM loss on every
token, documents packed into ``max_length`` rows by TRL's best-fit-decreasing packing (``packing_strategy
bfd_split``: a long document is split, never joined to another inside one sequence), with per-document
position ids so that attention never crosses documents. Word alignments come from the dataset (the bundled
corpus ships ``words.jsonl``) or from :class:`gemma_rvq.alignment.CTCWordAligner`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets

__all__ = [
    "CPT_KINDS",
    "MODALITY_MARKERS",
    "build_cpt_dataset",
    "build_cpt_text_dataset",
    "build_interleaved_dataset",
    "interleave_words",
    "mix_cpt_datasets",
    "render_cpt_rows",
    "word_frame_spans",
]

MODALITY_MARKERS = {"text": "[TEXT]", "speech": "[SPEECH]"}  # SpiritLM's
CPT_KINDS = ("text", "speech", "paired", "interleaved")


# ---------------------------------------------------------------------------------------------- one row
def word_frame_spans(words: Sequence[Mapping[str, Any]], frame_rate: float, num_frames: int,
                     *, name: str = "row") -> list[tuple[int, int]]:
    """``[(first frame, end frame)]`` of each word: ``round(start * frame_rate)``, ``round(end * frame_rate)``.

    Frames are clipped to ``[0, num_frames]`` and every word keeps at least one frame. Raises ``ValueError``
    naming ``name`` and the word when times are missing, negative, reversed, out of order, or past the audio.
    """
    spans = []
    previous_start = -math.inf
    for index, word in enumerate(words):
        try:
            start, end = float(word["start"]), float(word["end"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{name}: word {index} must be a dict with 'word', 'start' and 'end' seconds, "
                             f"got {word!r}") from None
        if not (0 <= start <= end) or start < previous_start:
            raise ValueError(f"{name}: word {index} ({word.get('word')!r}) has start {start} / end {end}: times "
                             "must be non-negative, start <= end, and the words in order")
        first = min(round(start * frame_rate), num_frames)
        last = min(round(end * frame_rate), num_frames)
        if first >= num_frames:
            raise ValueError(f"{name}: word {index} ({word.get('word')!r}) starts at {start} s, after the "
                             f"{num_frames} frames ({num_frames / frame_rate:.3f} s) of the codes: wrong frame_rate "
                             "or alignments of another clip?")
        spans.append((first, max(last, first + 1)))
        previous_start = start
    return spans


def interleave_words(words: Sequence[Mapping[str, Any]], codes: np.ndarray, token_format, frame_rate: float, *,
                     switch_rate: float = 0.3, start_modality: str | None = None,
                     rng: np.random.Generator | None = None, markers: Mapping[str, str | None] | None = None,
                     ensure_both: bool = True, name: str = "row") -> tuple[str, list[dict[str, Any]]]:
    """One interleaved sequence: ``(text, spans)``.

    Args:
        words: ``[{"word", "start", "end"}]`` in seconds, in order.
        codes: ``[Q, T]`` codes of the whole utterance.
        token_format: a :class:`~gemma_rvq.tokens.SemanticTokenFormat` (renders each speech span, its start /
            end markers included).
        frame_rate: frames per second of ``codes`` (``model.config.frame_rate``).
        switch_rate: probability of switching modality at each word boundary (expected span: ``1 / rate``
            words).
        start_modality: ``"text"``, ``"speech"`` or ``None`` (drawn with probability 1/2).
        rng: a numpy generator (seed it for reproducible data).
        markers: text put before each span, per modality (default :data:`MODALITY_MARKERS`; ``None``: none).
        ensure_both: with two or more words and no switch drawn, switch at one random boundary so that every
            sequence really interleaves.

    Returns:
        The string and its spans ``[{"modality", "first_word", "end_word", "start_frame", "end_frame"}]``
        (word indices end-exclusive; frames only for speech spans, end-exclusive).
    """
    if not 0 <= switch_rate <= 1:
        raise ValueError(f"switch_rate must be in [0, 1], got {switch_rate}")
    if start_modality not in (None, "text", "speech"):
        raise ValueError(f"start_modality must be 'text', 'speech' or None, got {start_modality!r}")
    if not words:
        raise ValueError(f"{name}: no words to interleave")
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"{name}: codes must be [Q, T], got shape {codes.shape}")
    rng = rng if rng is not None else np.random.default_rng()
    markers = dict(MODALITY_MARKERS if markers is None else markers)
    frames = word_frame_spans(words, frame_rate, codes.shape[1], name=name)
    switches = rng.random(len(words) - 1) < switch_rate
    if ensure_both and len(words) > 1 and not switches.any():
        switches[rng.integers(len(words) - 1)] = True
    modality = start_modality or ("text" if rng.random() < 0.5 else "speech")
    bounds = [0, *(np.flatnonzero(switches) + 1).tolist(), len(words)]
    parts, spans = [], []
    for first, end in itertools.pairwise(bounds):
        span: dict[str, Any] = {"modality": modality, "first_word": first, "end_word": end,
                                "start_frame": None, "end_frame": None}
        if modality == "text":
            content = " ".join(str(word["word"]) for word in words[first:end])
        else:
            span["start_frame"], span["end_frame"] = frames[first][0], max(frames[end - 1][1], frames[first][0] + 1)
            content = token_format.render(codes[:, span["start_frame"]: span["end_frame"]])
        parts.append((markers.get(modality) or "") + content)
        spans.append(span)
        modality = "speech" if modality == "text" else "text"
    return "".join(parts), spans


# ---------------------------------------------------------------------------------------------- datasets
def _codes_of(example: dict, codes_column: str | None, tokens_column: str | None, fmt, name: str) -> np.ndarray:
    if codes_column is not None and example.get(codes_column) is not None:
        codes = np.asarray(example[codes_column])
        return codes[None] if codes.ndim == 1 else codes
    if tokens_column is not None and example.get(tokens_column):
        try:
            return fmt.parse(example[tokens_column]).expand()
        except ValueError as err:
            raise ValueError(f"{name}: column {tokens_column!r} does not parse with format {fmt.name!r}: {err}") \
                from None
    raise ValueError(f"{name}: no codes (column {codes_column!r}) and no token string (column {tokens_column!r})")


def _check_columns(dataset: Dataset, needed: dict[str, str | None], what: str) -> None:
    missing = [f"{arg}={col!r}" for arg, col in needed.items() if col is not None and col not in dataset.column_names]
    if missing:
        raise ValueError(f"{what}: the dataset has no column(s) {', '.join(missing)}; available: "
                         f"{dataset.column_names}")


def build_interleaved_dataset(dataset: Dataset | DatasetDict, token_format, *, frame_rate: float,
                              words_column: str = "words", codes_column: str | None = "audio_codes",
                              tokens_column: str | None = "semantic_tokens", switch_rate: float = 0.3,
                              start_modality: str | None = None, markers: Mapping[str, str | None] | None = None,
                              ensure_both: bool = True, seed: int = 0, return_spans: bool = False,
                              keep_columns: Sequence[str] = (), num_proc: int | None = None) -> Dataset | DatasetDict:
    """SpiritLM-style interleaved sequences: a ``text`` column switching between words and speech tokens.

    Args:
        dataset: rows with ``words_column`` (``[{"word", "start", "end"}]`` seconds) and the utterance's codes
            (``codes_column``, ``[Q][T]`` as ``SpeechTokenizer(return_codes=True)`` writes them) or its token
            string (``tokens_column``, parsed with ``token_format`` and run-length expanded).
        token_format: a preset name, dict or :class:`~gemma_rvq.tokens.SemanticTokenFormat`.
        frame_rate: frames per second of the codes (25 for Gemma 4, 50 for HuBERT / wav2vec2).
        switch_rate / start_modality / markers / ensure_both: see :func:`interleave_words`.
        seed: row ``i`` uses ``numpy.random.default_rng([seed, i])``: the same data on every run and process.
        return_spans: also write a ``spans`` column (see :func:`interleave_words`).
        keep_columns: input columns to carry over.

    Returns:
        The same kind of dataset with ``text`` (and ``spans``); a ``DatasetDict`` is converted split by split.
    """
    from ..tokens import get_format

    fmt = get_format(token_format)
    if frame_rate <= 0:
        raise ValueError(f"frame_rate must be > 0, got {frame_rate}")
    if isinstance(dataset, DatasetDict):
        return DatasetDict({split: build_interleaved_dataset(
            part, fmt, frame_rate=frame_rate, words_column=words_column, codes_column=codes_column,
            tokens_column=tokens_column, switch_rate=switch_rate, start_modality=start_modality, markers=markers,
            ensure_both=ensure_both, seed=seed, return_spans=return_spans, keep_columns=keep_columns,
            num_proc=num_proc) for split, part in dataset.items()})
    _check_columns(dataset, {"words_column": words_column}, "build_interleaved_dataset")
    codes_column = codes_column if codes_column in dataset.column_names else None
    tokens_column = tokens_column if tokens_column in dataset.column_names else None
    if codes_column is None and tokens_column is None:
        raise ValueError("build_interleaved_dataset: the dataset has neither the codes column nor the token string "
                         f"column; available: {dataset.column_names}")

    def convert(example: dict, index: int) -> dict:
        name = f"row {index}"
        codes = _codes_of(example, codes_column, tokens_column, fmt, name)
        text, spans = interleave_words(example[words_column], codes, fmt, frame_rate, switch_rate=switch_rate,
                                       start_modality=start_modality, rng=np.random.default_rng([seed, index]),
                                       markers=markers, ensure_both=ensure_both, name=name)
        return {"text": text, **({"spans": spans} if return_spans else {})}

    removed = [c for c in dataset.column_names if c not in set(keep_columns)]
    return dataset.map(convert, with_indices=True, remove_columns=removed, num_proc=num_proc,
                       desc="Interleaving speech and text")


def render_cpt_rows(dataset: Dataset, kind: str, token_format, *, text_column: str = "text",
                    tokens_column: str | None = "semantic_tokens", codes_column: str | None = "audio_codes",
                    markers: Mapping[str, str | None] | None = None, **interleave_kwargs: Any) -> Dataset:
    """One kind of continued-pretraining document per row, in a ``text`` column (plus ``kind``).

    - ``text``: the transcript; ``speech``: the token string; ``paired``: ``[SPEECH]<tokens>[TEXT]<transcript>``
      (SpireLM's speech -> transcript documents, with the modality markers); ``interleaved``:
      :func:`build_interleaved_dataset` (needs a word-alignment column; ``interleave_kwargs`` go there).
    """
    from ..tokens import get_format

    if kind not in CPT_KINDS:
        raise ValueError(f"kind must be one of {CPT_KINDS}, got {kind!r}")
    fmt = get_format(token_format)
    marks = dict(MODALITY_MARKERS if markers is None else markers)
    if kind == "interleaved":
        out = build_interleaved_dataset(dataset, fmt, codes_column=codes_column, tokens_column=tokens_column,
                                        markers=marks, **interleave_kwargs)
        return out.add_column("kind", [kind] * len(out))
    _check_columns(dataset, {"text_column": text_column if kind != "speech" else None}, "render_cpt_rows")

    def tokens_of(example: dict, index: int) -> str:
        if tokens_column is not None and example.get(tokens_column):
            return example[tokens_column]
        return fmt.render(_codes_of(example, codes_column, None, fmt, f"row {index}"))

    def convert(example: dict, index: int) -> dict:
        if kind == "text":
            text = example[text_column]
        elif kind == "speech":
            text = tokens_of(example, index)
        else:
            text = (marks.get("speech") or "") + tokens_of(example, index) + (marks.get("text") or "") + \
                example[text_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"row {index}: empty {kind} document")
        return {"text": text, "kind": kind}

    return dataset.map(convert, with_indices=True, remove_columns=dataset.column_names,
                       desc=f"Rendering {kind} documents")


def _counts(ratios: Mapping[str, float], total: int) -> dict[str, int]:
    """Largest-remainder apportionment of ``total`` documents to the ratios (exact, sums to ``total``)."""
    norm = sum(ratios.values())
    shares = {k: total * v / norm for k, v in ratios.items()}
    counts = {k: math.floor(s) for k, s in shares.items()}
    for k in sorted(shares, key=lambda k: shares[k] - counts[k], reverse=True)[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def mix_cpt_datasets(sources: Mapping[str, Dataset], ratios: Mapping[str, float], *, num_rows: int | None = None,
                     seed: int = 0, replace: bool = False) -> Dataset:
    """Documents drawn from each source in exact proportions, shuffled; columns ``text``, ``kind``, ``document``.

    Args:
        sources: kind -> a dataset with a ``text`` column (e.g. from :func:`render_cpt_rows`).
        ratios: kind -> weight (normalised; kinds with weight 0 are left out). Counts are by documents:
            ``num_rows`` is apportioned with the largest-remainder method, so they are exact.
        num_rows: documents in the mixture; default: the most that keeps the ratios without repeating a
            document.
        replace: draw with repetition when a source is smaller than its share (otherwise ``ValueError``).
        seed: the draw and the shuffle.
    """
    ratios = {k: float(v) for k, v in ratios.items() if v}
    if not ratios or any(v < 0 for v in ratios.values()):
        raise ValueError(f"ratios must be non-negative with at least one positive weight, got {dict(ratios)}")
    missing = [k for k in ratios if k not in sources]
    if missing:
        raise ValueError(f"no source dataset for kind(s) {missing}; sources: {list(sources)}")
    for kind in ratios:
        if "text" not in sources[kind].column_names:
            raise ValueError(f"source {kind!r} has no 'text' column; columns: {sources[kind].column_names}")
    norm = sum(ratios.values())
    if num_rows is None:
        num_rows = int(min(len(sources[k]) * norm / v for k, v in ratios.items()) + 1e-9)
        while any(c > len(sources[k]) for k, c in _counts(ratios, num_rows).items()):
            num_rows -= 1
    counts = _counts(ratios, num_rows)
    rng = np.random.default_rng(seed)
    parts = []
    for kind, count in counts.items():
        size = len(sources[kind])
        if count > size and not replace:
            raise ValueError(f"kind {kind!r} needs {count} documents but its source has {size}: lower num_rows, "
                             "change the ratios, or pass replace=True")
        if size == 0 and count:
            raise ValueError(f"the source of kind {kind!r} is empty")
        index = rng.choice(size, size=count, replace=count > size)
        part = sources[kind].select(index.tolist()).select_columns(["text"])
        parts.append(part.add_column("kind", [kind] * count))
    mixed = concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()
    return mixed.add_column("document", list(range(len(mixed))))


def build_cpt_dataset(dataset: Dataset, token_format, ratios: Mapping[str, float], *, frame_rate: float | None = None,
                      text_dataset: Dataset | None = None, num_rows: int | None = None, seed: int = 0,
                      replace: bool = False, text_column: str = "text", tokens_column: str | None = "semantic_tokens",
                      codes_column: str | None = "audio_codes", words_column: str = "words",
                      switch_rate: float = 0.3, markers: Mapping[str, str | None] | None = None) -> Dataset:
    """A SpireLM-style continued-pretraining mixture from one tokenized dataset.

    Each kind with a positive ratio (``text``, ``speech``, ``paired``, ``interleaved``) is rendered from
    ``dataset`` with :func:`render_cpt_rows` (``text`` documents come from ``text_dataset`` when given: any
    text-only corpus with a ``text_column``), then :func:`mix_cpt_datasets` draws them in the ratios.
    ``interleaved`` needs ``frame_rate`` and a ``words_column``.
    """
    sources: dict[str, Dataset] = {}
    for kind, weight in ratios.items():
        if not weight:
            continue
        if kind == "text" and text_dataset is not None:
            _check_columns(text_dataset, {"text_column": text_column}, "build_cpt_dataset (text_dataset)")
            sources[kind] = text_dataset.select_columns([text_column]).rename_columns(
                {text_column: "text"} if text_column != "text" else {})
            continue
        extra: dict[str, Any] = {}
        if kind == "interleaved":
            if frame_rate is None:
                raise ValueError("build_cpt_dataset: interleaved documents need frame_rate (frames per second)")
            extra = {"frame_rate": frame_rate, "words_column": words_column, "switch_rate": switch_rate,
                     "seed": seed}
        sources[kind] = render_cpt_rows(dataset, kind, token_format, text_column=text_column,
                                        tokens_column=tokens_column, codes_column=codes_column, markers=markers,
                                        **extra)
    return mix_cpt_datasets(sources, ratios, num_rows=num_rows, seed=seed, replace=replace)


def build_cpt_text_dataset(dataset, *, text_column: str = "text", num_proc: int | None = None, **_: Any):
    """The ``cpt`` recipe's builder (``examples/sft.py --recipe cpt``): the documents' ``text_column`` as ``text``.

    Every row must be a non-empty string (``ValueError`` names the row). Works on a ``Dataset``,
    ``IterableDataset`` or ``DatasetDict``.
    """
    from datasets import IterableDataset, IterableDatasetDict

    if isinstance(dataset, DatasetDict | IterableDatasetDict):
        return type(dataset)({split: build_cpt_text_dataset(part, text_column=text_column, num_proc=num_proc)
                              for split, part in dataset.items()})
    names = dataset.column_names or list(next(iter(dataset)).keys())
    if text_column not in names:
        raise ValueError(f"the cpt recipe reads documents from column {text_column!r}; available: {names} "
                         "(build them with gemma_rvq.recipes.interleave.build_cpt_dataset)")

    def check(batch: dict, indices: list[int]) -> dict:
        for value, index in zip(batch[text_column], indices):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"row {index}: column {text_column!r} must be a non-empty string, got {value!r}")
        return {"text": batch[text_column]}

    kwargs = {"num_proc": num_proc, "desc": "Checking the cpt documents"} if not isinstance(
        dataset, IterableDataset) else {}
    return dataset.map(check, batched=True, with_indices=True,
                       remove_columns=[c for c in names if c != "text"] if text_column == "text" else names,
                       **kwargs)
