"""``gemma-rvq train`` / ``examples/train_rvq.py``: stage 1, train an RVQ on frozen-encoder embeddings.

    gemma-rvq train --config examples/configs/train_rvq_tiny.yaml
    python examples/train_rvq.py --config examples/configs/train_rvq_tiny.yaml --batch_size 8192
    accelerate launch examples/train_rvq.py --config examples/configs/train_rvq_gemma4.yaml

Every ``RVQTrainingConfig`` field is a flag (``--batch_size``, ``--batch-size``) and overrides the YAML.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from . import TaskParser, add_forwarding_subparser

HELP = "train an RVQ (stage 1) from a YAML config; for several GPUs: accelerate launch examples/train_rvq.py"
DESCRIPTION = "Train a residual vector quantizer on frozen-encoder embeddings (stage 1)."
SUMMARY_METRICS = ("mse", "fvu", "cosine_similarity", "codebook_utilization", "codebook_perplexity")


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """``RVQTrainingConfig`` fields + ``--config``; with ``subparsers``, the ``gemma-rvq train`` entry that
    hands its arguments to this same parser."""
    if subparsers is not None:
        return add_forwarding_subparser(subparsers, "train", HELP, run)
    from ..training.config import RVQTrainingConfig

    return TaskParser(RVQTrainingConfig, prog=prog, description=DESCRIPTION)


def main(config: Any) -> dict:
    """Train with ``config`` (an ``RVQTrainingConfig``); prints and returns the exported folders' metrics."""
    from ..training import train_rvq

    result = train_rvq(config)
    summary = {
        name: {split: {k: m[split][k] for k in SUMMARY_METRICS if k in m[split]} for split in m}
        for name, m in result.metrics.items()
    }
    if summary:
        print(json.dumps({"steps": result.steps, "folders": result.folders, "metrics": summary}, indent=1))
    else:
        for name, folder in result.folders.items():
            print(f"{name}: {folder}")
    return summary


def run(argv: Sequence[str] | None = None, prog: str | None = None) -> dict:
    """Parse ``argv`` (``--config`` and flags) and train."""
    (config,) = make_parser(prog=prog).parse_args_and_config(argv)
    return main(config)


__all__ = ["main", "make_parser", "run"]
