"""SFT glue for TRL: the logic of ``examples/sft.py``.

``run_sft(script_args, training_args, model_args)`` loads the model and tokenizer, adds the format's
semantic tokens (``gemma_rvq.llm.add_semantic_tokens``, which resizes the embeddings BEFORE the trainer
exists: ``SFTTrainer`` never resizes), builds the recipe's dataset, configures LoRA so that the new
token rows are trainable (``trainable_token_indices``; the output rows too when the head is untied),
builds ``trl.SFTTrainer``, trains, and saves the model (or adapter), the tokenizer and a
``gemma_rvq_recipe.json`` that :func:`load_sft_model` reads back, plus ``semantic_format.json`` (the token
format and the speech tokenizer it came from, :mod:`gemma_rvq.formats`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import ScriptArguments

from ..cards import MODEL_ID_KEY, hub_reference, local_path, local_paths_of, write_local_paths
from .data import RECIPES, build_recipe_dataset

__all__ = [
    "RECIPE_FILE",
    "SemanticSFTArguments",
    "build_sft_trainer",
    "drop_long_examples",
    "embedding_module_names",
    "finish_hub_folder",
    "load_raw_dataset",
    "load_sft_dataset",
    "load_sft_model",
    "patch_trainable_tokens_head",
    "prepare_adapter_saving",
    "prepare_semantic_tokens",
    "recipe_builder_kwargs",
    "resolve_token_format",
    "run_sft",
    "save_recipe",
    "semantic_peft_config",
]

logger = logging.getLogger(__name__)

RECIPE_FILE = "gemma_rvq_recipe.json"

_DEFAULT_TEMPLATE = {"speechless": "speechless", "asr": "spire_asr", "speech_instruct": None, "cpt": None}


@dataclass
class SemanticSFTArguments(ScriptArguments):
    """Script arguments of ``examples/sft.py`` (TRL's ``ScriptArguments`` plus the recipe's own)."""

    recipe: str = field(default="speechless", metadata={"help": f"One of {list(RECIPES)}."})
    token_format: str | None = field(
        default=None,
        metadata={"help": "Semantic token format: default the one the dataset carries (recorded by gemma-rvq "
                          "tokenize / generate_semantic) or the model folder's semantic_format.json; or a preset "
                          "(gemma_rvq, ichigo, spire) or a JSON file, which must agree with the recorded one."},
    )
    codebook_size: int | None = field(default=None, metadata={"help": "Override a preset's codebook size."})
    num_levels: int | None = field(default=None, metadata={"help": "Override a preset's number of levels."})
    token_init: str = field(default="mean", metadata={"help": "Init of the new embedding rows (add_semantic_tokens)."})
    embedding_pad_to_multiple_of: int | None = field(
        default=64, metadata={"help": "Pad the resized embedding matrix to a multiple of this (None: no padding)."}
    )
    token_seed: int = field(default=0, metadata={"help": "Seed of the new rows' init (reproduced on reload)."})
    train_new_token_rows: bool = field(
        default=True,
        metadata={"help": "With LoRA: train the new tokens' embedding (and untied output) rows via PEFT "
                          "trainable_token_indices."},
    )
    data_files: list[str] | None = field(default=None, metadata={"help": "data_files for load_dataset."})
    prepared_dataset: bool = field(
        default=False, metadata={"help": "The dataset is already in TRL form (prompt/completion or messages)."}
    )
    text_column: str = field(default="text", metadata={"help": "Text column (speechless, asr; cpt: the documents)."})
    tokens_column: str = field(default="semantic_tokens", metadata={"help": "Semantic token string column."})
    response_column: str = field(default="response", metadata={"help": "Answer column (speech_instruct)."})
    translation_column: str | None = field(default=None, metadata={"help": "Translation column (asr)."})
    language: str | None = field(default=None, metadata={"help": "Language name for every row."})
    language_column: str | None = field(default=None, metadata={"help": "Column holding the language name."})
    target_language: str | None = field(default=None, metadata={"help": "Target language (speech translation)."})
    prompt_template: str | None = field(
        default=None, metadata={"help": "Prompt template preset (speechless, spire_asr, asr); default per recipe."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System turn (speech_instruct)."})
    user_template: str = field(default="{speech}", metadata={"help": "User turn (speech_instruct), with {speech}."})
    instruct_output: str = field(
        default="prompt_completion",
        metadata={"help": "speech_instruct dataset form: prompt_completion (completion-only loss) or messages "
                          "(needs assistant_only_loss and a chat template with generation markers)."},
    )
    drop_missing_tokens: bool = field(
        default=False, metadata={"help": "Drop rows without semantic tokens (failed generations) instead of failing."}
    )
    validate_tokens: bool = field(default=False, metadata={"help": "Parse every token string before training."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "The Hub id of model_name_or_path when that is a local folder (e.g. a pre-downloaded "
                          "copy): the saved folder names the base by this id (card, adapter_config.json, "
                          "gemma_rvq_recipe.json), never by its local path."},
    )
    drop_long_examples: bool = field(
        default=True,
        metadata={"help": "Drop rows longer than max_length instead of letting TRL truncate them (a cut token "
                          "string loses its end marker and teaches the model not to stop)."},
    )

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {list(RECIPES)}, got {self.recipe!r}")


# ---------------------------------------------------------------------------------------------- tokens
def resolve_token_format(token_format: Any = None, codebook_size: int | None = None, num_levels: int | None = None,
                         *, dataset: Any = None, model: Any = None):
    """The ``SemanticTokenFormat`` to train with: :func:`gemma_rvq.formats.resolve_format` (explicit spec or
    JSON file, checked against what ``dataset`` and ``model`` carry; read from them when ``None``)."""
    from ..formats import resolve_format

    return resolve_format(token_format, dataset=dataset, model=model, codebook_size=codebook_size,
                          num_levels=num_levels)


def prepare_semantic_tokens(model, tokenizer, token_format: Any, *, init: str = "mean",
                            pad_to_multiple_of: int | None = 64, seed: int = 0, rvq_model=None) -> list[int]:
    """Make sure ``tokenizer`` and ``model`` know the format's tokens; return their ids (vocabulary order).

    Tokens are added with ``gemma_rvq.llm.add_semantic_tokens`` (which resizes and initialises the
    embedding rows) unless the tokenizer has them all already (e.g. a stage-2 checkpoint reused for stage
    3): then only a missing resize is done. Must run before the trainer is built.
    """
    from ..llm import add_semantic_tokens
    from ..tokens import get_format

    fmt = get_format(token_format)
    vocab = fmt.vocabulary()
    known = tokenizer.get_vocab()
    present = [t in known for t in vocab]
    if all(present):
        ids = [known[t] for t in vocab]
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
    else:
        if any(present):
            logger.warning("the tokenizer already has %d of the %d tokens of format %r; adding the rest",
                           sum(present), len(vocab), fmt.name)
        ids = add_semantic_tokens(tokenizer, model, format=fmt, init=init, rvq_model=rvq_model,
                                  pad_to_multiple_of=pad_to_multiple_of, seed=seed)
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer) or max(ids) >= rows:
        raise RuntimeError(f"the embeddings have {rows} rows for a tokenizer of {len(tokenizer)} tokens")
    return list(ids)


def embedding_module_names(model) -> tuple[str, str | None, bool]:
    """``(input embedding name, output embedding name or None, tied)``: last components of the module names."""
    names = {module: name for name, module in model.named_modules()}
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    head_name = names[head].rsplit(".", 1)[-1] if head is not None else None
    return names[embed].rsplit(".", 1)[-1], head_name, tied


def semantic_peft_config(model_args, model, new_token_ids: list[int], *, train_new_token_rows: bool = True):
    """TRL's ``get_peft_config(model_args)`` with the new token rows made trainable.

    ``trainable_token_indices`` covers the input embedding and, for an untied head, the output embedding
    (a tied head follows the input rows); Gemma 3n/4 per-layer embeddings (``embed_tokens_per_layer``)
    are included when the model has them. Returns ``None`` without ``use_peft``.
    """
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is None or not train_new_token_rows or not new_token_ids:
        return config
    embed_name, head_name, tied = embedding_module_names(model)
    indices = dict(config.trainable_token_indices or {})
    targets = [embed_name] + ([] if tied or head_name is None else [head_name])
    if any(name.endswith("embed_tokens_per_layer") for name, _ in model.named_modules()):
        targets.append("embed_tokens_per_layer")
    saved = set(config.modules_to_save or ())
    for target in targets:
        if target in saved:  # the whole module is trained already
            continue
        indices[target] = sorted(set(indices.get(target, [])) | set(new_token_ids))
    config.trainable_token_indices = indices or None
    return config


def patch_trainable_tokens_head(trainer) -> None:
    """Work around TRL 1.16 reading ``lm_head.bias`` of a PEFT ``TrainableTokensWrapper`` (AttributeError).

    The wrapper of a bias-free head has no ``bias`` attribute; giving it ``None`` is what the unwrapped
    ``nn.Linear`` has.
    """
    head = trainer.model.get_output_embeddings()
    if head is not None and type(head).__name__ == "TrainableTokensWrapper":
        try:
            head.bias  # noqa: B018
        except AttributeError:
            head.bias = None


# ---------------------------------------------------------------------------------------------- data
def load_raw_dataset(name: str | None, *, dataset_config: str | None = None, data_files=None,
                     streaming: bool = False):
    """Load a Hub dataset id, a ``save_to_disk`` folder, or a json/jsonl/csv/parquet file.

    A ``semantic_format.json`` in the folder (or beside the file) is attached to the dataset's info when
    the data does not carry a format already (:mod:`gemma_rvq.formats`).
    """
    from datasets import load_dataset, load_from_disk

    from ..formats import attach_format, dataset_format, load_format_record

    if name is None:
        raise ValueError("dataset_name is required: a Hub dataset id, a save_to_disk folder or a data file")
    if os.path.isdir(name) and (
        os.path.isfile(os.path.join(name, "dataset_dict.json")) or os.path.isfile(os.path.join(name, "state.json"))
    ):
        dataset, folder = load_from_disk(name), name
    elif os.path.isfile(name):
        extension = name.rsplit(".", 1)[-1].lower()
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(extension)
        if builder is None:
            raise ValueError(f"unsupported data file {name!r} (json, jsonl, csv or parquet)")
        dataset, folder = load_dataset(builder, data_files=name), os.path.dirname(os.path.abspath(name))
    else:
        return load_dataset(name, name=dataset_config, data_files=data_files, streaming=streaming)
    record = load_format_record(folder) if os.path.isfile(os.path.join(folder, "semantic_format.json")) else None
    if record is not None and dataset_format(dataset) is None:
        attach_format(dataset, record.format, speech_tokenizer=record.speech_tokenizer)
    return dataset


def recipe_builder_kwargs(script_args, token_format) -> dict[str, Any]:
    """The keyword arguments ``build_recipe_dataset(script_args.recipe, dataset, **kwargs)`` takes for these
    script arguments (columns, template, language, output style; ``token_format`` validates token strings when
    ``script_args.validate_tokens``). Shared by the SFT and distillation recipes so that both build rows alike."""
    fmt = token_format if script_args.validate_tokens else None
    common = {"tokens_column": script_args.tokens_column, "drop_missing": script_args.drop_missing_tokens,
              "token_format": fmt}
    if script_args.recipe == "cpt":  # documents in a text column (gemma_rvq.recipes.interleave.build_cpt_dataset)
        return {"text_column": script_args.text_column}
    template = script_args.prompt_template or _DEFAULT_TEMPLATE[script_args.recipe]
    if script_args.recipe == "speechless":
        return {**common, "text_column": script_args.text_column, "language": script_args.language,
                "language_column": script_args.language_column, "template": template}
    if script_args.recipe == "asr":
        return {**common, "text_column": script_args.text_column, "language": script_args.language or "English",
                "language_column": script_args.language_column, "template": template,
                "translation_column": script_args.translation_column,
                "target_language": script_args.target_language}
    return {**common, "response_column": script_args.response_column, "system_prompt": script_args.system_prompt,
            "user_template": script_args.user_template, "output": script_args.instruct_output}


def load_sft_dataset(script_args, token_format=None):
    """Load ``script_args.dataset_name`` and build the recipe's dataset; returns ``(train, eval or None)``."""
    train, evaluation = _load_raw_splits(script_args)
    return _build_splits(script_args, train, evaluation, token_format)


def _load_raw_splits(script_args):
    from datasets import Dataset, DatasetDict, IterableDatasetDict

    raw = load_raw_dataset(script_args.dataset_name, dataset_config=script_args.dataset_config,
                           data_files=script_args.data_files, streaming=script_args.dataset_streaming)
    if isinstance(raw, DatasetDict | IterableDatasetDict):
        if script_args.dataset_train_split not in raw:
            raise ValueError(f"split {script_args.dataset_train_split!r} not found; available: {list(raw)}")
        train = raw[script_args.dataset_train_split]
        evaluation = raw.get(script_args.dataset_test_split)
    else:
        train, evaluation = raw, None
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train)))) if isinstance(
            train, Dataset) else train.take(script_args.max_train_samples)
    return train, evaluation


def _build_splits(script_args, train, evaluation, token_format):
    from datasets import Dataset

    if not script_args.prepared_dataset:
        kwargs = recipe_builder_kwargs(script_args, token_format)
        train = build_recipe_dataset(script_args.recipe, train, **kwargs)
        if evaluation is not None:
            evaluation = build_recipe_dataset(script_args.recipe, evaluation, **kwargs)
    if isinstance(train, Dataset) and len(train) == 0:
        raise ValueError(
            f"the training split of {script_args.dataset_name!r} is empty after building the "
            f"{script_args.recipe!r} dataset" + (" (every row was dropped by drop_missing_tokens: did the "
                                                 "generation fail everywhere? see its generation_error column)"
                                                 if script_args.drop_missing_tokens else "")
        )
    return train, evaluation


def drop_long_examples(dataset, tokenizer, max_length: int, *, num_proc: int | None = None):
    """Drop rows whose tokenised prompt + completion (or messages) exceed ``max_length`` tokens.

    Lengths are counted as TRL counts them: the chat template for conversational rows, the tokenizer (with
    its special tokens) plus the appended eos for plain text. Returns the filtered dataset.
    """
    from datasets import Dataset

    def length(example: dict) -> int:
        if "messages" in example:
            conversation = example["messages"]
        elif isinstance(example.get("prompt"), list):
            conversation = example["prompt"] + example["completion"]
        else:
            return len(tokenizer(example["prompt"] + example["completion"])["input_ids"]) + 1
        return len(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])

    kwargs = {"num_proc": num_proc, "desc": f"Dropping rows longer than {max_length} tokens"} if isinstance(
        dataset, Dataset) else {}
    before = len(dataset) if isinstance(dataset, Dataset) else None
    kept = dataset.filter(lambda example: length(example) <= max_length, **kwargs)
    if before is not None and len(kept) < before:
        if len(kept) == 0:
            raise ValueError(f"every one of the {before} rows is longer than max_length={max_length} tokens: "
                             "raise max_length (or pass --drop_long_examples false to truncate instead)")
        logger.warning("dropped %d of %d rows longer than max_length=%d", before - len(kept), before, max_length)
    return kept


# ---------------------------------------------------------------------------------------------- trainer
def _load_model_and_tokenizer(model_args, training_args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required")
    init_kwargs = dict(training_args.model_init_kwargs or {})
    dtype = model_args.dtype
    init_kwargs.setdefault("dtype", getattr(torch, dtype) if dtype not in (None, "auto") else dtype)
    if model_args.attn_implementation is not None:
        init_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    # the model is built here (it must be resized before the trainer), so the trainer gets no init kwargs
    training_args.model_init_kwargs = None
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code, **init_kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    return model, tokenizer


def build_sft_trainer(script_args, training_args, model_args, *, model=None, tokenizer=None,
                      train_dataset=None, eval_dataset=None, rvq_model=None):
    """Everything up to ``trainer.train()``: returns a ``trl.SFTTrainer`` ready to train.

    ``model`` / ``tokenizer`` / datasets default to what the arguments name; passing them lets a notebook
    reuse objects it already holds.
    """
    from trl import SFTTrainer

    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither")
    if model is None:
        model, tokenizer = _load_model_and_tokenizer(model_args, training_args)
    if (script_args.recipe == "speech_instruct" and getattr(tokenizer, "chat_template", None) is None
            and training_args.chat_template_path is None):
        raise ValueError(
            f"the speech_instruct recipe renders conversations with the model's chat template, and the tokenizer "
            f"of {model_args.model_name_or_path!r} has none: use an instruction-tuned model, set "
            "--chat_template_path (a tokenizer folder or .jinja file), or use the asr recipe (plain text prompts)"
        )
    from ..formats import dataset_format_record

    raw_train = raw_eval = None
    if train_dataset is None:
        raw_train, raw_eval = _load_raw_splits(script_args)
    data = raw_train if train_dataset is None else train_dataset
    # one resolution path: the given format, checked against what the data and the model carry
    fmt = resolve_token_format(script_args.token_format, script_args.codebook_size, script_args.num_levels,
                               dataset=data, model=model)
    data_record = dataset_format_record(data)
    new_ids = prepare_semantic_tokens(model, tokenizer, fmt, init=script_args.token_init,
                                      pad_to_multiple_of=script_args.embedding_pad_to_multiple_of,
                                      seed=script_args.token_seed, rvq_model=rvq_model)
    embedding_rows = model.get_input_embeddings().num_embeddings  # before PEFT wraps the embeddings
    if train_dataset is None:
        check = fmt if script_args.validate_tokens else None
        train_dataset, loaded_eval = _build_splits(script_args, raw_train, raw_eval, check)
        eval_dataset = eval_dataset if eval_dataset is not None else loaded_eval
    if training_args.eval_strategy == "no":
        eval_dataset = None
    # (a template given by --chat_template_path is only installed by the trainer: TRL truncates those rows)
    templated = script_args.recipe != "speech_instruct" or getattr(tokenizer, "chat_template", None) is not None
    if (script_args.drop_long_examples and training_args.max_length is not None and not training_args.packing
            and templated and script_args.recipe != "cpt"):
        train_dataset = drop_long_examples(train_dataset, tokenizer, training_args.max_length,
                                           num_proc=training_args.dataset_num_proc)
        if eval_dataset is not None:
            eval_dataset = drop_long_examples(eval_dataset, tokenizer, training_args.max_length,
                                              num_proc=training_args.dataset_num_proc)
    if script_args.recipe == "speech_instruct" and script_args.instruct_output == "messages":
        training_args.assistant_only_loss = True
    if script_args.recipe == "cpt" and training_args.packing and training_args.packing_strategy == "wrapped":
        raise ValueError("the cpt recipe packs documents without crossing them: use packing_strategy bfd_split "
                         "(or bfd), not wrapped")
    peft_config = semantic_peft_config(model_args, model, new_ids,
                                       train_new_token_rows=script_args.train_new_token_rows)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    patch_trainable_tokens_head(trainer)
    # the saved folder names the base model and the speech tokenizer by Hub id (or by name: never by path)
    base = hub_reference(model_args.model_name_or_path, script_args.base_model_id)
    speech_source = data_record.speech_tokenizer if data_record else None
    speech = hub_reference(speech_source)
    if peft_config is not None:
        prepare_adapter_saving(trainer.model, base.id)
    # ... and remembers their local folders in a file that is never uploaded
    trainer.gemma_rvq_local_paths = local_paths_of(base_model=model_args.model_name_or_path,
                                                   speech_tokenizer=speech_source)
    trainer.gemma_rvq_recipe = {
        "recipe": script_args.recipe,
        "token_format": fmt.to_dict(),
        "num_new_tokens": len(new_ids),
        "new_token_ids": [min(new_ids), max(new_ids)] if new_ids else None,
        "vocab_size": len(tokenizer),
        "embedding_rows": embedding_rows,
        "base_model": base.id,  # a Hub id, or None for a local base without one (never its path)
        "base_model_name": base.name,
        MODEL_ID_KEY: training_args.hub_model_id,
        "token_init": script_args.token_init,
        "token_seed": script_args.token_seed,
        "pad_to_multiple_of": script_args.embedding_pad_to_multiple_of,
        "peft": peft_config is not None,
        "prompt_template": script_args.prompt_template or _DEFAULT_TEMPLATE[script_args.recipe],
        "system_prompt": script_args.system_prompt,
        "user_template": script_args.user_template,
        "language": script_args.language,
        "speech_tokenizer": speech.id,
        "speech_tokenizer_name": speech.name,
    }
    return trainer


def save_recipe(trainer, output_dir: str) -> None:
    """Write ``gemma_rvq_recipe.json`` (what :func:`load_sft_model` needs) on the main process."""
    if trainer.accelerator.is_main_process:
        from ..formats import save_format

        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, RECIPE_FILE), "w", encoding="utf-8") as handle:
            json.dump(trainer.gemma_rvq_recipe, handle, indent=2)
        recipe = trainer.gemma_rvq_recipe
        save_format(output_dir, recipe["token_format"], speech_tokenizer=recipe.get("speech_tokenizer"))
        write_local_paths(output_dir, getattr(trainer, "gemma_rvq_local_paths", {}))


def run_sft(script_args, training_args, model_args, **kwargs):
    """Build the trainer, train, save a Hub-ready folder (model or adapter, tokenizer, recipe file, model card),
    push it with ``--push_to_hub``. Returns the trainer."""
    trainer = build_sft_trainer(script_args, training_args, model_args, **kwargs)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    save_recipe(trainer, training_args.output_dir)
    finish_hub_folder(trainer, training_args.output_dir, dataset_name=script_args.dataset_name)
    return trainer


# ---------------------------------------------------------------------------------------------- Hub-ready folders
def prepare_adapter_saving(model, base_model_id: str | None) -> None:
    """Make a PEFT model save a Hub-ready adapter: ``base_model_name_or_path`` is the base's Hub id (``None``
    for a local base: never its path), and the resized embedding matrices are not saved.

    PEFT's default (``save_embedding_layers="auto"``) saves both full embedding matrices whenever the vocabulary
    grew, with a warning (for Gemma 4 E2B about 800 MB next to a LoRA of a few dozen). They are not needed:
    :func:`load_sft_model` rebuilds the new rows exactly (same format, init and seed) and the trained rows are
    in the adapter (``trainable_token_indices``). ``Trainer.save_model`` cannot pass the option, so it is bound
    to this model's ``save_pretrained``.
    """
    import functools

    for config in model.peft_config.values():
        config.base_model_name_or_path = base_model_id
    # PEFT fills a None base_model_name_or_path from the base model's name_or_path when saving
    model.get_base_model().name_or_path = base_model_id
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)


def finish_hub_folder(trainer, output_dir: str, *, dataset_name: str | None = None, model_name: str | None = None,
                      tags=()) -> None:
    """After ``trainer.save_model(output_dir)``: the model card (:func:`gemma_rvq.cards.write_lm_model_card`),
    an adapter's base ``config.json``, no ``training_args.bin`` (a pickle of the arguments, local paths included; the card lists the
    hyperparameters instead), then the upload when ``push_to_hub`` is set (``hub_model_id``, else the folder
    name in the token's namespace)."""
    from ..cards import write_lm_model_card

    args = trainer.args
    if not trainer.accelerator.is_main_process:
        return
    write_lm_model_card(trainer, output_dir, model_name=model_name, dataset_name=dataset_name, tags=tags)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config"):
        # an adapter folder with the base's config.json: transformers' pipeline(model=folder) reads it instead of
        # resolving adapter_config.json's base_model_name_or_path (None for a local base), and our loader,
        # load_sft_model, finds the base itself
        model.get_base_model().config.save_pretrained(output_dir)
    stale = os.path.join(output_dir, "training_args.bin")
    if os.path.isfile(stale):
        os.remove(stale)
    if args.push_to_hub:
        from ..hub import push_folder

        push_folder(output_dir, args.hub_model_id or os.path.basename(os.path.normpath(output_dir)),
                    token=args.hub_token, private=bool(args.hub_private_repo), revision=args.hub_revision,
                    commit_message="Upload a gemma-rvq SFT model")


def _local_folder(name_or_path: str, revision: str | None = None) -> str:
    """A local folder for ``name_or_path``: itself, or the Hub snapshot of a repo id (downloaded or cached)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    from ..convert import check_hub_source

    # a mistyped path or an offline miss fails at once, named (every saved folder has a tokenizer)
    check_hub_source(name_or_path, "tokenizer_config.json", revision=revision)
    return snapshot_download(name_or_path, revision=revision)


def load_sft_model(path: str, *, base_model_name_or_path: str | None = None, rvq_model=None,
                   **from_pretrained_kwargs: Any):
    """Load what ``examples/sft.py`` saved in ``path`` (a folder or a Hub id): ``(model, tokenizer)``.

    A full fine-tune loads directly. A LoRA run saved an adapter: the base model is loaded, its tokenizer
    extended exactly as in training (same format, init and seed, from ``gemma_rvq_recipe.json``), and the
    adapter (LoRA weights and the trained token rows) applied with ``PeftModel.from_pretrained``. The base is
    ``base_model_name_or_path``, else the local folder it was trained from (on that machine: the folder's
    ``_gemma_rvq_local.json``, never uploaded), else the Hub id the folder records; a copy from the Hub of an
    adapter trained on a local base without ``--base_model_id`` records none, so the base must be named.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..formats import load_format_record

    path = _local_folder(path, revision=from_pretrained_kwargs.get("revision"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    record = load_format_record(path)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
        model.gemma_rvq_format = record  # what generate_semantic_tokens and the pipeline read
        return model, tokenizer
    from peft import PeftModel

    recipe_path = os.path.join(path, RECIPE_FILE)
    if not os.path.isfile(recipe_path):
        raise ValueError(f"{path} holds an adapter but no {RECIPE_FILE}: was it saved by examples/sft.py?")
    with open(recipe_path, encoding="utf-8") as handle:
        recipe = json.load(handle)
    # the base: as given, else its local folder on the machine that trained it, else its Hub id
    base_path = base_model_name_or_path or local_path(path, "base_model") or recipe.get("base_model")
    if not base_path:
        raise ValueError(
            f"{path} holds an adapter of a local base model ({recipe.get('base_model_name')!r}) whose Hub id was not "
            "given at training time (--base_model_id): pass it as base_model_name_or_path=<folder or Hub id>"
        )
    base = AutoModelForCausalLM.from_pretrained(base_path, **from_pretrained_kwargs)
    base_tokenizer = AutoTokenizer.from_pretrained(base_path)
    prepare_semantic_tokens(base, base_tokenizer, recipe["token_format"], init=recipe["token_init"],
                            pad_to_multiple_of=recipe["pad_to_multiple_of"], seed=recipe["token_seed"],
                            rvq_model=rvq_model)
    if len(base_tokenizer) != len(tokenizer) or base.get_input_embeddings().num_embeddings != recipe[
            "embedding_rows"]:
        raise ValueError(
            f"re-extending the base model gave {len(base_tokenizer)} tokens / "
            f"{base.get_input_embeddings().num_embeddings} rows, the adapter was trained with "
            f"{len(tokenizer)} / {recipe['embedding_rows']}: wrong base model?"
        )
    model = PeftModel.from_pretrained(base, path)
    model.gemma_rvq_format = record
    return model, tokenizer
