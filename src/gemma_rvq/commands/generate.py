"""``gemma-rvq generate`` / ``examples/generate_semantic.py``: stage 2, text in, semantic tokens out, with a
Speechless model (text-only data -> stage-3 training data). Needs ``pip install 'gemma-rvq[sft]'``.

    gemma-rvq generate --model_name_or_path out/speechless --dataset_name my-org/instructions-sw \\
        --text_column instruction --output_dir data/instructions-sw-tokens
    accelerate launch --num_processes 8 examples/generate_semantic.py --model_name_or_path ... (same arguments)

Across processes, rows are split between them and gathered; the main process writes the dataset. The model
is what ``gemma-rvq sft --recipe speechless`` saved (a full model or a LoRA adapter, a folder or a Hub id;
the token format is read from its ``semantic_format.json`` and the prompt template from its
``gemma_rvq_recipe.json``; a ``--token_format`` given must agree). Generation follows the format's grammar
(``gemma_rvq.grammar.SemanticGrammarLogitsProcessor``), so every row's ``semantic_tokens`` parses;
``generation_error`` stays ``None`` unless ``--grammar false``. The output dataset carries the format (its
info and ``semantic_format.json``), so stage 3 (``gemma-rvq sft --recipe speech_instruct``) reads it.
Arguments: :class:`GenerateSemanticArguments`, from a ``--config`` YAML file and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import TaskParser, add_forwarding_subparser

HELP = "stage 2: turn text into semantic tokens with a Speechless model (text-only data -> stage-3 data)"
DESCRIPTION = "Generate the semantic-token strings of a dataset's texts with a stage-2 (Speechless) model."


@dataclass
class GenerateSemanticArguments:
    """The arguments of ``gemma-rvq generate`` (each a ``--flag``, or a key of the ``--config`` YAML)."""

    model_name_or_path: str = field(metadata={"help": "Output folder of examples/sft.py (speechless recipe)."})
    dataset_name: str = field(metadata={"help": "Hub dataset id, save_to_disk folder, or json/jsonl/csv/parquet file."})
    output_dir: str = field(metadata={"help": "Where the dataset is written (save_to_disk)."})
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_column: str = field(default="text", metadata={"help": "Column with the text to turn into tokens."})
    output_column: str = "semantic_tokens"
    error_column: str = "generation_error"
    language: str | None = field(default=None, metadata={"help": "Language tag for every row (as in training)."})
    language_column: str | None = None
    token_format: str | None = field(default=None, metadata={"help": "Default: the model's semantic_format.json."})
    codebook_size: int | None = None
    num_levels: int | None = None
    grammar: bool = field(default=True, metadata={"help": "Constrain generation to the format's grammar."})
    num_beams: int = 1
    prompt_template: str | None = field(default=None, metadata={"help": "Default: the model's recipe file."})
    batch_size: int = 32
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})
    max_samples: int | None = None
    push_to_hub: str | None = field(default=None, metadata={"help": "Also push the dataset to this repo id."})
    seed: int = 0


def main(args: GenerateSemanticArguments):
    """Generate, gather, save (main process). Returns the dataset with the two new columns."""
    from ..extras import require

    require("trl", "gemma-rvq generate")
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from datasets import DatasetDict

    from ..formats import save_format
    from ..recipes import (
        RECIPE_FILE,
        generate_semantic_dataset,
        load_raw_dataset,
        load_sft_model,
        resolve_token_format,
    )

    accelerator = Accelerator()
    set_seed(args.seed)
    recipe = {}
    recipe_path = os.path.join(args.model_name_or_path, RECIPE_FILE)
    if os.path.isfile(recipe_path):
        with open(recipe_path, encoding="utf-8") as handle:
            recipe = json.load(handle)
    template = args.prompt_template or recipe.get("prompt_template") or "speechless"

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_sft_model(args.model_name_or_path, dtype=dtype)
    model.to(accelerator.device)
    # the model's own format (semantic_format.json); a --token_format given must agree with it
    fmt = resolve_token_format(args.token_format, args.codebook_size, args.num_levels, model=model)

    dataset = load_raw_dataset(args.dataset_name, dataset_config=args.dataset_config)
    if isinstance(dataset, DatasetDict):
        if args.dataset_split not in dataset:
            raise ValueError(f"split {args.dataset_split!r} not found; available: {list(dataset)}")
        dataset = dataset[args.dataset_split]
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))

    result = generate_semantic_dataset(
        model, tokenizer, dataset, fmt, text_column=args.text_column, output_column=args.output_column,
        error_column=args.error_column, language=args.language, language_column=args.language_column,
        accelerator=accelerator, template=template, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, grammar=args.grammar,
        **({"temperature": args.temperature, "top_p": args.top_p} if args.do_sample else {}),
        **({"num_beams": args.num_beams} if args.num_beams > 1 else {}),
    )
    if accelerator.is_main_process:
        failed = sum(error is not None for error in result[args.error_column])
        accelerator.print(f"{len(result) - failed} of {len(result)} rows parsed; {failed} reported in "
                          f"{args.error_column!r}")
        result.save_to_disk(args.output_dir)
        record = getattr(model, "gemma_rvq_format", None)
        save_format(args.output_dir, fmt, speech_tokenizer=record.speech_tokenizer if record else None)
        if args.push_to_hub:
            result.push_to_hub(args.push_to_hub)
    accelerator.wait_for_everyone()
    return result


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """``GenerateSemanticArguments`` fields + ``--config``; with ``subparsers``, the ``gemma-rvq generate``
    entry that hands its arguments to this same parser."""
    if subparsers is not None:
        return add_forwarding_subparser(subparsers, "generate", HELP, run)
    return TaskParser(GenerateSemanticArguments, prog=prog, description=DESCRIPTION)


def run(argv: Sequence[str] | None = None, prog: str | None = None):
    """Parse ``argv`` (``--config`` and flags) and generate."""
    (args,) = make_parser(prog=prog).parse_args_and_config(argv)
    return main(args)


__all__ = ["GenerateSemanticArguments", "main", "make_parser", "run"]
