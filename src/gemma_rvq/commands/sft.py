"""``gemma-rvq sft`` / ``examples/sft.py``: supervised fine-tuning for the recipes (stage 2 Speechless,
stage 3 speech instructions, ASR). Needs ``pip install 'gemma-rvq[sft]'``.

    gemma-rvq sft --config examples/recipes/speechless_llama3.2_1b.yaml
    accelerate launch --num_processes 8 examples/sft.py --config examples/recipes/speechless_llama3.2_1b.yaml

Arguments: ``gemma_rvq.recipes.SemanticSFTArguments`` (recipe, dataset, token format, columns,
templates), ``trl.SFTConfig`` (training) and ``trl.ModelConfig`` (model, LoRA), from the YAML file and
the command line (``trl.TrlParser``). The logic lives in ``gemma_rvq.recipes.run_sft``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from . import add_forwarding_subparser

HELP = "fine-tune an LLM on a recipe (stage 2 Speechless, stage 3 speech instructions) with TRL's SFT"


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """``TrlParser((SemanticSFTArguments, SFTConfig, ModelConfig))``; with ``subparsers``, the
    ``gemma-rvq sft`` entry that hands its arguments to this same parser."""
    if subparsers is not None:
        return add_forwarding_subparser(subparsers, "sft", HELP, run)
    from ..extras import require

    require("trl", "gemma-rvq sft")
    from trl import ModelConfig, SFTConfig, TrlParser

    from ..recipes import SemanticSFTArguments

    return TrlParser((SemanticSFTArguments, SFTConfig, ModelConfig), prog=prog)


def main(script_args: Any, training_args: Any, model_args: Any):
    """Train with the recipe named by ``script_args.recipe``; returns the trainer (after saving)."""
    from ..recipes import run_sft

    trainer = run_sft(script_args, training_args, model_args)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    return trainer


def run(argv: Sequence[str] | None = None, prog: str | None = None):
    """Parse ``argv`` (``--config`` and flags) and train."""
    return main(*make_parser(prog=prog).parse_args_and_config(argv))


__all__ = ["main", "make_parser", "run"]
