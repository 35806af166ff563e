"""Turning text into semantic tokens with a stage-2 (Speechless) model.

:func:`generate_semantic_tokens` runs batched, left-padded greedy (or sampled, or beam) generation under
:class:`~gemma_rvq.grammar.SemanticGrammarLogitsProcessor`, which lets the model write only strings the
token format parses (markers, level order, durations, separator, closing within ``max_new_tokens``), and
parses each output back with the format. (``grammar=False`` falls back to
:class:`SemanticVocabularyLogitsProcessor`, which only keeps the format's tokens; a string that does not
parse is then reported in an error column and not kept.) :func:`generate_semantic_dataset` does this over
a ``datasets.Dataset``, sharded across processes with ``accelerate`` and gathered again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..grammar import SemanticGrammarLogitsProcessor, semantic_token_ids
from .templates import PromptTemplate, get_template

__all__ = [
    "SemanticGrammarLogitsProcessor",
    "SemanticVocabularyLogitsProcessor",
    "generate_semantic_dataset",
    "generate_semantic_tokens",
    "semantic_token_ids",
]


class SemanticVocabularyLogitsProcessor(LogitsProcessor):
    """Keep only ``allowed_token_ids``: every other logit is set to ``-inf``.

    ``scores``: ``[B, V]`` (V may exceed the tokenizer size when the embeddings are padded).
    """

    def __init__(self, allowed_token_ids: Sequence[int]) -> None:
        ids = sorted({int(i) for i in allowed_token_ids})
        if not ids or ids[0] < 0:
            raise ValueError(f"allowed_token_ids must be non-empty, non-negative ids, got {allowed_token_ids!r}")
        self.allowed_token_ids = torch.tensor(ids, dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed_token_ids.to(scores.device)
        if int(allowed[-1]) >= scores.shape[-1]:
            raise ValueError(f"allowed token id {int(allowed[-1])} is outside the logits ({scores.shape[-1]})")
        mask = torch.full_like(scores, float("-inf"))
        mask[:, allowed] = 0
        return scores + mask


def _stop_ids(tokenizer, model, fmt) -> list[int]:
    stops = set()
    if fmt.end_token is not None:
        stops.add(tokenizer.convert_tokens_to_ids(fmt.end_token))
    eos = getattr(model.generation_config, "eos_token_id", None)
    for value in (tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])):
        if value is not None:
            stops.add(int(value))
    if not stops:
        raise ValueError("no stop token: the format has no end marker and the tokenizer no eos token")
    return sorted(stops)


@torch.inference_mode()
def generate_semantic_tokens(
    model,
    tokenizer,
    texts: Sequence[str],
    token_format: Any = None,
    *,
    template: str | PromptTemplate = "speechless",
    languages: str | Sequence[str | None] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 512,
    grammar: bool = True,
    show_progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, list]:
    """Generate the semantic token string of each text with a stage-2 model.

    Args:
        model: a causal LM trained with the ``speechless`` recipe (its tokenizer has the format's tokens).
        texts: the input texts (rendered with ``template``, as in training).
        token_format: ``None`` (default): the format the model carries (``semantic_format.json`` in the
            folder ``examples/sft.py`` saved, read by :func:`gemma_rvq.formats.resolve_format`). A preset
            name, dict or ``SemanticTokenFormat`` must agree with it (a mismatch is a ``ValueError``).
        languages: one language for all texts, or one per text (``None`` = no tag).
        batch_size: prompts per ``generate`` call; prompts are sorted by length to limit padding.
        max_new_tokens: the longest output in LM tokens. Under the grammar every row closes its string
            within it; without, a row that reaches it without a stop token is reported as an error.
        grammar: constrain generation with :class:`~gemma_rvq.grammar.SemanticGrammarLogitsProcessor`
            (every output parses); ``False`` only keeps the format's tokens.
        generate_kwargs: passed to ``model.generate`` (e.g. ``do_sample=True, temperature=0.7`` or
            ``num_beams=4``).

    Returns:
        ``{"semantic_tokens": [str | None], "generation_error": [str | None]}`` in the order of ``texts``:
        exactly one of the two is set per row.
    """
    from tqdm.auto import tqdm

    from ..formats import resolve_format

    fmt = resolve_format(token_format, model=model)
    template = get_template(template)
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"row {index}: the text must be a non-empty string, got {text!r}")
    if languages is None or isinstance(languages, str):
        languages = [languages] * len(texts)
    elif len(languages) != len(texts):
        raise ValueError(f"got {len(languages)} languages for {len(texts)} texts")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")

    vocab_ids = semantic_token_ids(tokenizer, fmt)
    stops = _stop_ids(tokenizer, model, fmt)
    if grammar:
        processor = SemanticGrammarLogitsProcessor(tokenizer, fmt, eos_token_id=stops,
                                                   max_new_tokens=max_new_tokens)
        separator_ids = processor.separator_ids
    else:
        processor = SemanticVocabularyLogitsProcessor([*vocab_ids, *stops])
        separator_ids = []
    id_to_token = {i: t for t, i in zip(fmt.vocabulary(), vocab_ids)}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    prompts = [template.render(text=t, language=lang)[0] for t, lang in zip(texts, languages)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens_out: list[str | None] = [None] * len(prompts)
    errors: list[str | None] = [None] * len(prompts)

    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Generating semantic tokens",
                          disable=not show_progress):
            rows = order[start:start + batch_size]
            encoded = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True).to(model.device)
            output = model.generate(
                **encoded,
                logits_processor=LogitsProcessorList([processor]),
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=pad_id,
                **{"do_sample": False, **generate_kwargs},
            )
            new_tokens = output[:, encoded["input_ids"].shape[1]:].tolist()
            for row, ids in zip(rows, new_tokens):
                tokens_out[row], errors[row] = _to_string(ids, stops, fmt, id_to_token, max_new_tokens,
                                                          separator_ids)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return {"semantic_tokens": tokens_out, "generation_error": errors}


def _to_string(ids: list[int], stops: list[int], fmt, id_to_token: dict[int, str],
               max_new_tokens: int, separator_ids: Sequence[int] = ()) -> tuple[str | None, str | None]:
    """Cut at the first stop token (keeping the end marker), join, parse. Returns ``(tokens, error)``."""
    end_id = None
    kept: list[int] = []
    for token_id in ids:
        if token_id in stops:
            end_id = token_id
            if id_to_token.get(token_id) == fmt.end_token and fmt.end_token is not None:
                kept.append(token_id)
            break
        kept.append(token_id)
    separators = set(separator_ids)
    outside = [i for i in kept if i not in id_to_token and i not in separators]
    if outside:  # cannot happen under the grammar; guards custom logits processors
        return None, f"generated ids outside the format's vocabulary: {outside[:5]}"
    kept = [i for i in kept if i in id_to_token]
    if end_id is None:
        return None, f"no stop token within max_new_tokens={max_new_tokens}"
    if fmt.end_token is not None and (not kept or id_to_token.get(kept[-1]) != fmt.end_token):
        return None, f"stopped without the end marker {fmt.end_token!r}"
    text = fmt.separator.join(id_to_token[i] for i in kept)
    try:
        parsed = fmt.parse(text)
    except ValueError as error:
        return None, f"does not parse: {error}"
    if parsed.codes.shape[-1] == 0:
        return None, "no frames generated"
    return text, None


def generate_semantic_dataset(
    model,
    tokenizer,
    dataset,
    token_format: Any = None,
    *,
    text_column: str = "text",
    output_column: str = "semantic_tokens",
    error_column: str = "generation_error",
    language: str | None = None,
    language_column: str | None = None,
    accelerator=None,
    **kwargs: Any,
):
    """:func:`generate_semantic_tokens` over a ``datasets.Dataset``: adds ``output_column`` and ``error_column``.

    With an ``accelerate.Accelerator`` of several processes, the rows are split between processes
    (``accelerator.split_between_processes``), each process generates its shard on its device, and the
    results are gathered: every process returns the full dataset (save it on the main process).
    ``kwargs`` go to :func:`generate_semantic_tokens`. The result carries the format
    (:func:`gemma_rvq.formats.attach_format`), so the stage-3 recipe reads it from there.
    """
    from datasets import Dataset

    from ..formats import attach_format, model_format_record, resolve_format

    if not isinstance(dataset, Dataset):
        raise ValueError(f"generate_semantic_dataset takes a datasets.Dataset, got {type(dataset).__name__}")
    for name, column in (("text_column", text_column), ("language_column", language_column)):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"{name}={column!r} is not a column of the dataset; available: {dataset.column_names}")
    for column in (output_column, error_column):
        if column in dataset.column_names:
            raise ValueError(f"the dataset already has a {column!r} column; remove it or pick another name")

    token_format = resolve_format(token_format, model=model)
    indices = list(range(len(dataset)))
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        with accelerator.split_between_processes(indices) as shard:
            local = _generate_rows(model, tokenizer, dataset, shard, token_format, text_column, language,
                                   language_column, show=accelerator.is_local_main_process, **kwargs)
        rows = sorted(gather_object(local), key=lambda r: r[0])
    else:
        rows = _generate_rows(model, tokenizer, dataset, indices, token_format, text_column, language,
                              language_column, show=kwargs.pop("show_progress", True), **kwargs)
    if [r[0] for r in rows] != indices:
        raise RuntimeError("gathered generation results do not cover the dataset exactly once")
    dataset = dataset.add_column(output_column, [r[1] for r in rows])
    dataset = dataset.add_column(error_column, [r[2] for r in rows])
    record = model_format_record(model)
    return attach_format(dataset, token_format, speech_tokenizer=record.speech_tokenizer if record else None)


def _generate_rows(model, tokenizer, dataset, indices, token_format, text_column, language, language_column,
                   *, show: bool, **kwargs) -> list[tuple[int, str | None, str | None]]:
    if not indices:
        return []
    kwargs.pop("show_progress", None)
    subset = dataset.select(indices)
    languages = subset[language_column] if language_column else language
    result = generate_semantic_tokens(model, tokenizer, subset[text_column], token_format,
                                      languages=languages, show_progress=show, **kwargs)
    return list(zip(indices, result["semantic_tokens"], result["generation_error"]))
