"""Data builders: datasets with ``text`` / ``semantic_tokens`` / ``response`` columns in, TRL datasets out.

Every builder takes a ``datasets.Dataset``, ``IterableDataset`` or ``DatasetDict`` (each split is
converted) and returns the same kind, so the result can be saved, streamed or ``push_to_hub``-ed as is.
Outputs are in TRL's prompt/completion form, for which ``SFTTrainer`` computes the loss on the completion
only:

- :func:`build_speechless_dataset` (stage 2): ``prompt`` = text (+ language tag), ``completion`` =
  the semantic token string of the same utterance.
- :func:`build_speech_instruct_dataset` (stage 3): conversational ``prompt`` = ``[user: <tokens of the
  spoken instruction>]``, ``completion`` = ``[assistant: <text answer>]`` (or a ``messages`` column for
  ``assistant_only_loss``).
- :func:`build_asr_dataset`: tokens -> transcript (and tokens -> translation when a translation column
  is given), SpireLM-style prompt by default.

Rows whose token string is missing (``None`` or empty, e.g. a failed generation in
``examples/generate_semantic.py``) raise a ``ValueError`` naming the row, unless ``drop_missing=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from .templates import PromptTemplate, get_template

__all__ = [
    "RECIPES",
    "build_asr_dataset",
    "build_recipe_dataset",
    "build_speech_instruct_dataset",
    "build_speechless_dataset",
]

logger = logging.getLogger(__name__)

RECIPES = ("speechless", "speech_instruct", "asr", "cpt")

AnyDataset = Dataset | IterableDataset | DatasetDict | IterableDatasetDict


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    names = dataset.column_names
    if names is None:  # an IterableDataset without known features: look at the first row
        names = list(next(iter(dataset)).keys())
    return list(names)


def _require_columns(dataset: Dataset | IterableDataset, columns: dict[str, str | None], builder: str) -> None:
    """``columns`` maps the argument name to the column it names (``None`` = not used)."""
    available = _column_names(dataset)
    missing = [f"{arg}={col!r}" for arg, col in columns.items() if col is not None and col not in available]
    if missing:
        raise ValueError(
            f"{builder}: the dataset has no column(s) {', '.join(missing)}; available columns: {available}. "
            "Pass the right column names (e.g. text_column=..., tokens_column=...)."
        )


def _per_split(dataset: AnyDataset, fn: Callable[[Dataset | IterableDataset], Any]) -> AnyDataset:
    if isinstance(dataset, DatasetDict | IterableDatasetDict):
        return type(dataset)({split: fn(part) for split, part in dataset.items()})
    if not isinstance(dataset, Dataset | IterableDataset):
        raise ValueError(
            f"expected a datasets.Dataset, IterableDataset or DatasetDict, got {type(dataset).__name__}"
        )
    return fn(dataset)


def _drop_missing(dataset: Dataset | IterableDataset, tokens_column: str, drop: bool, num_proc: int | None):
    if not drop:
        return dataset
    kwargs = {"num_proc": num_proc, "desc": "Dropping rows without semantic tokens"} if isinstance(
        dataset, Dataset
    ) else {}
    before = len(dataset) if isinstance(dataset, Dataset) else None
    kept = dataset.filter(lambda tokens: isinstance(tokens, str) and bool(tokens.strip()),
                          input_columns=[tokens_column], **kwargs)
    if before is not None and len(kept) < before:
        logger.warning("dropped %d of %d rows without %r", before - len(kept), before, tokens_column)
    return kept


def _check_string(value: Any, column: str, index: int, *, hint: str = "") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"row {index}: column {column!r} must be a non-empty string, got {value!r}{hint}")
    return value


def _check_tokens(value: Any, column: str, index: int, token_format: Any) -> str:
    hint = " (a failed generation? pass drop_missing=True to skip such rows)" if value is None else ""
    value = _check_string(value, column, index, hint=hint)
    if token_format is not None:
        try:
            token_format.parse(value)
        except ValueError as error:
            raise ValueError(f"row {index}: column {column!r} does not parse with format "
                             f"{token_format.name!r}: {error}") from None
    return value


def _resolve_format(token_format: Any, part: Dataset | IterableDataset):
    """The format to check rows with: the given one (checked against the dataset's), else the dataset's."""
    from ..formats import resolve_format

    return resolve_format(token_format, dataset=part, required=False)


def _carry_format(built: Dataset | IterableDataset, fmt: Any, part: Dataset | IterableDataset):
    """The built dataset carries the format (and speech tokenizer) of its source."""
    from ..formats import attach_format, dataset_format_record

    if fmt is None:
        return built
    record = dataset_format_record(part)
    return attach_format(built, fmt, speech_tokenizer=record.speech_tokenizer if record else None)


def _map_kwargs(dataset: Dataset | IterableDataset, num_proc: int | None, desc: str) -> dict:
    if isinstance(dataset, Dataset):
        return {"num_proc": num_proc, "desc": desc}
    return {}


def _removed(dataset: Dataset | IterableDataset, keep_columns: list[str] | None) -> list[str]:
    keep = set(keep_columns or ())
    return [c for c in _column_names(dataset) if c not in keep]


# ---------------------------------------------------------------------------------------------- stage 2
def build_speechless_dataset(
    dataset: AnyDataset,
    *,
    text_column: str = "text",
    tokens_column: str = "semantic_tokens",
    language: str | None = None,
    language_column: str | None = None,
    template: str | PromptTemplate = "speechless",
    token_format: Any = None,
    drop_missing: bool = False,
    keep_columns: list[str] | None = None,
    num_proc: int | None = None,
) -> AnyDataset:
    """Stage 2 (Speechless): ``prompt`` = text (+ ``[language]`` tag), ``completion`` = token string.

    Args:
        dataset: rows with ``text_column`` and ``tokens_column`` (what ``tokenize_speech`` emits).
        language / language_column: a fixed language name for every row, or a column holding it; the
            ``speechless`` template then prefixes the prompt with ``[<language>] ``.
        template: a preset of :data:`gemma_rvq.recipes.TEMPLATES` or a :class:`PromptTemplate`.
        token_format: a format (name, dict or ``SemanticTokenFormat``); default: the one the dataset carries
            (``gemma_rvq.formats.attach_format``; a different given one is an error). The output carries the
            format. When one is given, every token string is also parsed, and a row that does not parse
            raises ``ValueError`` naming the row.
        drop_missing: drop rows whose token string is ``None``/empty instead of raising.
        keep_columns: input columns to carry over (default: only ``prompt`` and ``completion``).
    """
    template = get_template(template)

    def convert(part: Dataset | IterableDataset):
        _require_columns(part, {"text_column": text_column, "tokens_column": tokens_column,
                                "language_column": language_column}, "build_speechless_dataset")
        fmt = _resolve_format(token_format, part)
        check = fmt if token_format is not None else None  # parse every row only when asked
        part = _drop_missing(part, tokens_column, drop_missing, num_proc)

        def fn(batch: dict, indices: list[int]) -> dict:
            prompts, completions = [], []
            for row, index in enumerate(indices):
                text = _check_string(batch[text_column][row], text_column, index)
                tokens = _check_tokens(batch[tokens_column][row], tokens_column, index, check)
                lang = batch[language_column][row] if language_column else language
                prompt, completion = template.render(text=text, speech=tokens, language=lang)
                prompts.append(prompt)
                completions.append(completion)
            return {"prompt": prompts, "completion": completions}

        built = part.map(fn, batched=True, with_indices=True, remove_columns=_removed(part, keep_columns),
                         **_map_kwargs(part, num_proc, "Building the Speechless (stage 2) dataset"))
        return _carry_format(built, fmt, part)

    return _per_split(dataset, convert)


# ---------------------------------------------------------------------------------------------- ASR / ST
def build_asr_dataset(
    dataset: AnyDataset,
    *,
    tokens_column: str = "semantic_tokens",
    text_column: str = "text",
    language: str | None = "English",
    language_column: str | None = None,
    translation_column: str | None = None,
    target_language: str | None = None,
    include_asr: bool = True,
    template: str | PromptTemplate = "spire_asr",
    token_format: Any = None,
    drop_missing: bool = False,
    num_proc: int | None = None,
) -> AnyDataset:
    """Tokens -> transcript (ASR), and tokens -> translation (speech translation) when the data has one.

    With the default ``spire_asr`` template an ASR row is ``prompt="Speech: <tokens>\\nEnglish:"``,
    ``completion=" <transcript>"``; a translation row names ``target_language`` instead. With
    ``translation_column`` every input row gives an ASR row (unless ``include_asr=False``) and a
    translation row.
    """
    template = get_template(template)
    if translation_column is not None and not target_language:
        raise ValueError("build_asr_dataset: translation_column needs target_language (e.g. 'English')")
    if not include_asr and translation_column is None:
        raise ValueError("build_asr_dataset: include_asr=False leaves nothing to build without translation_column")

    def convert(part: Dataset | IterableDataset):
        _require_columns(part, {"tokens_column": tokens_column, "text_column": text_column,
                                "language_column": language_column, "translation_column": translation_column},
                         "build_asr_dataset")
        fmt = _resolve_format(token_format, part)
        check = fmt if token_format is not None else None  # parse every row only when asked
        part = _drop_missing(part, tokens_column, drop_missing, num_proc)

        def fn(batch: dict, indices: list[int]) -> dict:
            out: dict[str, list] = {"prompt": [], "completion": [], "task": []}
            for row, index in enumerate(indices):
                tokens = _check_tokens(batch[tokens_column][row], tokens_column, index, check)
                if include_asr:
                    text = _check_string(batch[text_column][row], text_column, index)
                    lang = batch[language_column][row] if language_column else language
                    prompt, completion = template.render(text=text, speech=tokens, language=lang)
                    out["prompt"].append(prompt)
                    out["completion"].append(completion)
                    out["task"].append("asr")
                if translation_column is not None:
                    translation = _check_string(batch[translation_column][row], translation_column, index)
                    prompt, completion = template.render(text=translation, speech=tokens,
                                                         language=target_language)
                    out["prompt"].append(prompt)
                    out["completion"].append(completion)
                    out["task"].append("translation")
            return out

        built = part.map(fn, batched=True, with_indices=True, remove_columns=_column_names(part),
                         **_map_kwargs(part, num_proc, "Building the ASR dataset"))
        return _carry_format(built, fmt, part)

    return _per_split(dataset, convert)


# ---------------------------------------------------------------------------------------------- stage 3
def build_speech_instruct_dataset(
    dataset: AnyDataset,
    *,
    tokens_column: str = "semantic_tokens",
    response_column: str = "response",
    system_prompt: str | None = None,
    user_template: str = "{speech}",
    output: str = "prompt_completion",
    token_format: Any = None,
    drop_missing: bool = False,
    keep_columns: list[str] | None = None,
    num_proc: int | None = None,
) -> AnyDataset:
    """Stage 3: the spoken (or Speechless-generated) instruction as tokens -> the text answer.

    Args:
        dataset: rows with ``tokens_column`` (the semantic tokens of the instruction) and
            ``response_column`` (the answer text). The written ``instruction`` is not needed.
        system_prompt: an optional system turn.
        user_template: the user turn, a format string with ``{speech}`` (e.g. ``"{speech}"`` or
            ``"Answer the spoken question.\\n{speech}"``).
        output: ``"prompt_completion"`` (default; conversational ``prompt`` / ``completion`` columns, the
            loss is on the completion only, works with any chat template) or ``"messages"`` (one
            ``messages`` column; train with ``assistant_only_loss=True``, which needs a chat template
            with ``{% generation %}`` markers).
    """
    if output not in ("prompt_completion", "messages"):
        raise ValueError(f"output must be 'prompt_completion' or 'messages', got {output!r}")
    if "{speech}" not in user_template:
        raise ValueError(f"user_template {user_template!r} must contain {{speech}}")

    def convert(part: Dataset | IterableDataset):
        _require_columns(part, {"tokens_column": tokens_column, "response_column": response_column},
                         "build_speech_instruct_dataset")
        fmt = _resolve_format(token_format, part)
        check = fmt if token_format is not None else None  # parse every row only when asked
        part = _drop_missing(part, tokens_column, drop_missing, num_proc)

        def fn(batch: dict, indices: list[int]) -> dict:
            prompts, completions = [], []
            for row, index in enumerate(indices):
                tokens = _check_tokens(batch[tokens_column][row], tokens_column, index, check)
                response = _check_string(batch[response_column][row], response_column, index)
                prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
                prompt.append({"role": "user", "content": user_template.format(speech=tokens)})
                prompts.append(prompt)
                completions.append([{"role": "assistant", "content": response}])
            if output == "messages":
                return {"messages": [p + c for p, c in zip(prompts, completions)]}
            return {"prompt": prompts, "completion": completions}

        built = part.map(fn, batched=True, with_indices=True, remove_columns=_removed(part, keep_columns),
                         **_map_kwargs(part, num_proc, "Building the speech-instruction (stage 3) dataset"))
        return _carry_format(built, fmt, part)

    return _per_split(dataset, convert)


_BUILDERS: dict[str, Callable[..., AnyDataset]] = {
    "speechless": build_speechless_dataset,
    "speech_instruct": build_speech_instruct_dataset,
    "asr": build_asr_dataset,
}


def build_recipe_dataset(recipe: str, dataset: AnyDataset, **kwargs: Any) -> AnyDataset:
    """Dispatch to the builder of ``recipe`` (one of :data:`RECIPES`)."""
    if recipe == "cpt":  # continued pretraining on documents (gemma_rvq.recipes.interleave)
        from .interleave import build_cpt_text_dataset

        return build_cpt_text_dataset(dataset, **kwargs)
    if recipe not in _BUILDERS:
        raise ValueError(f"unknown recipe {recipe!r}; available: {list(RECIPES)}")
    return _BUILDERS[recipe](dataset, **kwargs)
