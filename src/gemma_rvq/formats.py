"""Where a token format is stored, and the one place that decides which format applies.

A format travels with what it made:

- a **model folder** (stage 1 RVQ, stage 2/3 LLM) holds ``semantic_format.json`` beside its weights
  (:func:`save_format` / :func:`load_format`); it also names the speech tokenizer (stage-1 model) whose
  codes the format renders, when known;
- a **tokenized dataset** holds the same record in its ``DatasetInfo`` (:func:`attach_format` /
  :func:`dataset_format`): it survives ``map``, ``filter``, ``select_columns``, ``save_to_disk`` and
  ``load_from_disk``; a ``save_to_disk`` folder also gets ``semantic_format.json``.

:func:`resolve_format` is the single resolution path used by the ``SpeechTokenizer`` transform, the recipe
builders and ``examples/sft.py``, and ``generate_semantic_tokens``: an explicit format (a preset name, a
``SemanticTokenFormat``, its dict or a JSON file) is checked against what the data and the model carry,
a missing one is read from them, and a disagreement is a ``ValueError`` naming both formats and the
fields that differ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .tokens import PRESETS, SemanticTokenFormat, format_for_model, get_format

__all__ = [
    "FORMAT_FILE",
    "FormatRecord",
    "attach_format",
    "dataset_format",
    "fit_format",
    "format_for_rvq_model",
    "load_format",
    "load_format_record",
    "model_format",
    "resolve_format",
    "save_format",
    "save_rvq_format",
]

FORMAT_FILE = "semantic_format.json"
_RECIPE_FILE = "gemma_rvq_recipe.json"  # examples/sft.py's record (older folders carry the format only there)
_INFO_MARKER = "gemma-rvq semantic format: "


class FormatRecord(dict):
    """``{"token_format": SemanticTokenFormat, "speech_tokenizer": str | None}`` read from a file or info."""

    @property
    def format(self) -> SemanticTokenFormat:
        return self["token_format"]

    @property
    def speech_tokenizer(self) -> str | None:
        return self.get("speech_tokenizer")


def _record(token_format: Any, speech_tokenizer: str | os.PathLike | None) -> dict:
    fmt = get_format(token_format)
    return {"token_format": fmt.to_dict(),
            "speech_tokenizer": os.fspath(speech_tokenizer) if speech_tokenizer is not None else None}


def _parse_record(data: Any, where: str) -> FormatRecord:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    payload = data.get("token_format", data)  # a bare to_dict() is accepted too
    try:
        fmt = get_format(payload)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: not a token format: {error}") from None
    speech = data.get("speech_tokenizer") if "token_format" in data else None
    return FormatRecord(token_format=fmt, speech_tokenizer=speech)


# ---------------------------------------------------------------------------------------------- folders
def save_format(folder: str | os.PathLike, token_format: Any, *, speech_tokenizer: str | os.PathLike | None = None
                ) -> Path:
    """Write ``semantic_format.json`` (the format and, if known, the speech tokenizer) into ``folder``."""
    path = Path(folder) / FORMAT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_record(token_format, speech_tokenizer), indent=1, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path


def load_format_record(folder_or_file: str | os.PathLike) -> FormatRecord | None:
    """The record of a model/dataset folder (``semantic_format.json``, else the token format of an
    ``examples/sft.py`` folder's ``gemma_rvq_recipe.json``) or of a JSON file; ``None`` if there is none."""
    path = Path(folder_or_file)
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = [path / FORMAT_FILE, path / _RECIPE_FILE]
    else:
        return None
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{candidate}: not valid JSON ({error})") from None
        if candidate.name == _RECIPE_FILE:
            if not isinstance(data, Mapping) or "token_format" not in data:
                continue
            data = {"token_format": data["token_format"], "speech_tokenizer": data.get("speech_tokenizer")}
        record = _parse_record(data, str(candidate))
        if path.is_dir():  # a Hub-ready folder names a local speech tokenizer by name; its local folder, here
            from .cards import local_path

            record["speech_tokenizer"] = local_path(path, "speech_tokenizer") or record.speech_tokenizer
        return record
    return None


def load_format(folder_or_file: str | os.PathLike) -> SemanticTokenFormat | None:
    """The format stored in a folder or JSON file (see :func:`load_format_record`), or ``None``."""
    record = load_format_record(folder_or_file)
    return record.format if record is not None else None


# ---------------------------------------------------------------------------------------------- datasets
def attach_format(dataset: Any, token_format: Any, *, speech_tokenizer: str | os.PathLike | None = None) -> Any:
    """Record the format (and the speech tokenizer) in the dataset's info; returns the dataset.

    Works on a ``Dataset``, ``IterableDataset`` or a ``DatasetDict`` (every split). The record is a line of
    ``info.description``, which datasets carries through ``map``/``filter``/``save_to_disk``/``load_from_disk``.
    """
    line = _INFO_MARKER + json.dumps(_record(token_format, speech_tokenizer), sort_keys=True, ensure_ascii=True)
    for part in _splits(dataset):
        kept = [row for row in (part.info.description or "").splitlines() if not row.startswith(_INFO_MARKER)]
        part.info.description = "\n".join([*[row for row in kept if row.strip()], line])
    return dataset


def dataset_format_record(dataset: Any) -> FormatRecord | None:
    """The record attached to a dataset (all splits must agree), or ``None``."""
    found: dict[str, FormatRecord] = {}
    for part in _splits(dataset):
        info = getattr(part, "info", None)
        for row in ((info.description if info is not None else None) or "").splitlines():
            if row.startswith(_INFO_MARKER):
                found.setdefault(row, _parse_record(json.loads(row[len(_INFO_MARKER):]), "the dataset info"))
    if len({record.format for record in found.values()}) > 1:
        names = [record.format.name for record in found.values()]
        raise ValueError(f"the dataset carries several token formats ({names}): were differently tokenized "
                         "datasets concatenated?")
    return next(iter(found.values()), None)


def dataset_format(dataset: Any) -> SemanticTokenFormat | None:
    """The format attached to a dataset by :func:`attach_format`, or ``None``."""
    record = dataset_format_record(dataset)
    return record.format if record is not None else None


def _splits(dataset: Any) -> list[Any]:
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(dataset, DatasetDict | IterableDatasetDict):
        return list(dataset.values())
    return [dataset]


# ---------------------------------------------------------------------------------------------- models
def model_format_record(model: Any) -> FormatRecord | None:
    """The record a model carries: its ``gemma_rvq_format`` attribute (set by ``load_sft_model``), else the
    ``semantic_format.json`` of its folder (``name_or_path``, also of a PEFT model's adapter), or ``None``.
    ``model`` may also be a folder path."""
    if model is None:
        return None
    if isinstance(model, str | os.PathLike):
        return load_format_record(model)
    record = getattr(model, "gemma_rvq_format", None)
    if isinstance(record, FormatRecord):
        return record
    folders = []
    for config_owner in (model, getattr(model, "base_model", None)):
        name = getattr(getattr(config_owner, "config", None), "_name_or_path", None) or getattr(
            config_owner, "name_or_path", None)
        if name:
            folders.append(name)
    for folder in folders:
        record = load_format_record(folder) if os.path.isdir(folder) else None
        if record is not None:
            return record
    return None


def model_format(model: Any) -> SemanticTokenFormat | None:
    """The format a model (or model folder) carries, or ``None`` (see :func:`model_format_record`)."""
    record = model_format_record(model)
    return record.format if record is not None else None


def fit_format(spec: Any, *, codebook_size: int, num_quantizers: int,
               stored: SemanticTokenFormat | None = None) -> SemanticTokenFormat:
    """The format a stage-1 model's codes are rendered in (what ``SpeechTokenizer`` uses).

    ``stored`` is the format the model's folder records (``semantic_format.json``). ``spec=None``: the stored
    format when there is one, else ``gemma_rvq`` fitted to the model. A preset name is fitted to the model's
    ``codebook_size`` and ``num_quantizers`` levels (the stored format when it is that preset); a format or
    its dict is used as given.
    """
    if spec is None:
        if stored is not None:
            return stored
        spec = "gemma_rvq"
    if isinstance(spec, str) and stored is not None and stored.name == spec:
        return stored
    return format_for_model(spec, codebook_size=codebook_size, num_quantizers=num_quantizers)


def format_for_rvq_model(spec: Any, model: Any, *, num_quantizers: int | None = None) -> SemanticTokenFormat:
    """:func:`fit_format` for a loaded stage-1 model (its folder's record is read; ignored when
    ``num_quantizers`` asks for fewer levels than the model has)."""
    config = model.config
    levels = int(num_quantizers or config.num_quantizers)
    stored = model_format(model) if num_quantizers is None else None
    return fit_format(spec, codebook_size=int(config.codebook_size), num_quantizers=levels, stored=stored)


def save_rvq_format(folder: str | os.PathLike, token_format: Any = None) -> Path:
    """Write a stage-1 model folder's ``semantic_format.json``: ``token_format`` (default ``gemma_rvq``)
    fitted to the model's ``codebook_size`` and ``num_quantizers`` (read from its ``config.json``)."""
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        size, levels = int(config["codebook_size"]), int(config["num_quantizers"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{config_path}: cannot read codebook_size / num_quantizers ({error})") from None
    fmt = format_for_model(token_format or "gemma_rvq", codebook_size=size, num_quantizers=levels)
    return save_format(folder, fmt)  # the folder itself is the speech tokenizer


# ---------------------------------------------------------------------------------------------- resolution
def _explicit(spec: Any, overrides: dict) -> SemanticTokenFormat | str:
    """A format from an explicit spec, or the preset name itself (to be fitted to what is carried)."""
    if isinstance(spec, str | os.PathLike) and (str(spec).endswith(".json") or os.path.isdir(spec)):
        record = load_format_record(spec)
        if record is None:
            raise ValueError(f"token format file {os.fspath(spec)!r} does not exist or holds no format")
        return get_format(record.format, **overrides)
    if isinstance(spec, str) and not overrides and spec in PRESETS:
        return spec
    return get_format(spec, **overrides)


def _differences(a: SemanticTokenFormat, b: SemanticTokenFormat) -> str:
    left, right = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: {left[k]!r} vs {right[k]!r}" for k in left if left[k] != right.get(k))


def resolve_format(
    token_format: Any = None,
    *,
    dataset: Any = None,
    model: Any = None,
    codebook_size: int | None = None,
    num_levels: int | None = None,
    required: bool = True,
) -> SemanticTokenFormat | None:
    """The token format to use, from what is given explicitly and what the data and the model carry.

    Args:
        token_format: ``None`` (read it from ``dataset`` / ``model``), a preset name (the carried format
            when it is that preset, else the preset), a ``SemanticTokenFormat``, its dict, or a JSON file /
            folder holding one.
        dataset: a ``datasets`` dataset that may carry a format (:func:`attach_format`).
        model: a model or model folder that may carry one (:func:`model_format`).
        codebook_size / num_levels: overrides of a preset (the recipe's older options).
        required: raise when no format can be found (else return ``None``).

    Raises:
        ValueError: the dataset and the model carry different formats, the explicit format disagrees with
            them, or (``required``) there is no format anywhere.
    """
    overrides = {k: v for k, v in (("codebook_size", codebook_size), ("num_levels", num_levels)) if v is not None}
    carried: list[tuple[str, SemanticTokenFormat]] = []
    data_format = dataset_format(dataset) if dataset is not None else None
    if data_format is not None:
        carried.append(("the dataset", data_format))
    model_fmt = model_format(model) if model is not None else None
    if model_fmt is not None:
        carried.append((f"the model ({_describe(model)})", model_fmt))
    if len(carried) == 2 and carried[0][1] != carried[1][1]:
        (a_name, a), (b_name, b) = carried
        raise ValueError(
            f"{a_name} was made with token format {a.name!r} and {b_name} with {b.name!r}; they differ in "
            f"{_differences(a, b)}. Tokenize the data with the model's format (or train from a model that "
            "uses the data's)"
        )
    found = carried[0] if carried else None
    if token_format is None and not overrides:
        if found is None:
            if not required:
                return None
            raise ValueError(
                "no token format given and none recorded: pass token_format (a preset name such as "
                f"{sorted(PRESETS)}, a SemanticTokenFormat or a JSON file), or use data tokenized by gemma-rvq "
                "(its format is in the dataset info) / a model folder with semantic_format.json"
            )
        return found[1]
    explicit = _explicit(token_format if token_format is not None else found[1] if found else "gemma_rvq",
                         overrides)
    if found is None:
        return get_format(explicit)
    where, fmt = found
    if isinstance(explicit, str):  # a preset name: the carried format, when it is that preset
        if fmt.name == explicit:
            return fmt
        raise ValueError(f"token_format={explicit!r}, but {where} carries format {fmt.name!r} "
                         f"({fmt.num_levels} levels x {fmt.codebook_size} codes): leave token_format out to use it")
    if explicit != fmt:
        raise ValueError(f"the token format given ({explicit.name!r}) differs from the one {where} carries "
                         f"({fmt.name!r}): {_differences(explicit, fmt)}. Leave token_format out to use it")
    return fmt


def _describe(model: Any) -> str:
    if isinstance(model, str | os.PathLike):
        return os.fspath(model)
    return getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
