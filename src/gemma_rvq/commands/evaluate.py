"""``gemma-rvq evaluate``: score a checkpoint on audio files (MSE, NMSE, FVU, cosine, utilization, perplexity).

    gemma-rvq evaluate dev-clips/ -m twi-rvq -o dev-metrics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_model_argument, load_model, task_parser

HELP = "score a checkpoint on audio: MSE, NMSE, FVU, cosine, utilization, perplexity"
DESCRIPTION = "Encode audio, reconstruct the embeddings and report the RVQ quality metrics."


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """The ``evaluate`` parser: a ``gemma-rvq`` subcommand with ``subparsers``, else standalone."""
    parser = task_parser("evaluate", HELP, DESCRIPTION, subparsers, prog)
    parser.add_argument("inputs", nargs="+", help="audio files or folders")
    add_model_argument(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="clips per encoder batch")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("--output", "-o", help="also write the results to this JSON file")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Evaluate ``args.model`` on ``args.inputs``; prints (and writes) the JSON results."""
    from ..evaluation import evaluate_audio_files
    from .tokenize import audio_files

    model = load_model(args.model, args.device)
    results = evaluate_audio_files(model, audio_files(args.inputs), batch_size=args.batch_size)
    text = json.dumps(results, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


__all__ = ["main", "make_parser"]
