"""The ``gemma-rvq`` command: thin subcommands over the library.

Every subcommand parses its arguments and calls one library function; errors are printed as one
clear line and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .commands import add_model_argument, load_model
from .commands import evaluate as _evaluate
from .commands import generate as _generate
from .commands import sft as _sft
from .commands import tokenize as _tokenize
from .commands import train as _train
from .commands.tokenize import AUDIO_SUFFIXES, audio_files  # noqa: F401 - kept for old imports

# the helpers moved to gemma_rvq.commands; their former names keep working (gemma-rvq stream uses them)
_load_model = load_model
_add_model_argument = add_model_argument
_audio_files = audio_files

# The tasks with an example script build their parser in gemma_rvq.commands (one parser per task).
cmd_tokenize = _tokenize.main
cmd_evaluate = _evaluate.main


# --------------------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    from . import convert

    return convert.run(args)


# --------------------------------------------------------------------------------------------- push
def repo_type_of(folder: Path) -> str:
    """The Hub repo type a gemma-rvq folder is for: a Space (README declares an ``sdk``), a dataset
    (``save_to_disk`` output) or a model."""
    from .hub import split_card

    readme = folder / "README.md"
    card = split_card(readme.read_text(encoding="utf-8"))[0] if readme.is_file() else {}
    if card.get("sdk"):
        return "space"
    if any((folder / name).exists() for name in ("state.json", "dataset_dict.json")):
        return "dataset"
    return "model"


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import plan_upload, push_folder

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    repo_type = repo_type_of(folder) if args.repo_type == "auto" else args.repo_type
    plan = plan_upload(folder, args.repo_id, repo_type=repo_type, private=args.private)
    if args.dry_run:
        print(plan.describe())
        return 0
    if plan.local_paths and not args.allow_local_paths:
        listed = "; ".join(f"{name}: {', '.join(paths[:2])}" for name, paths in plan.local_paths.items())
        raise ValueError(f"{folder} is not Hub-ready: files name local paths ({listed}). Fix them, or pass "
                         "--allow-local-paths to upload anyway")
    print(push_folder(folder, args.repo_id, repo_type=repo_type, private=args.private))
    return 0


# --------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .extras import require

    for module in ("accelerate", "matplotlib", "evaluate", "trl", "peft"):  # the whole pipeline: gemma-rvq[all]
        require(module, "gemma-rvq demo")
    from .demo import run_demo

    run_demo(
        output_dir=args.output_dir,
        corpus_dir=args.corpus,
        encoder=args.encoder,
        seed=args.seed,
        quick=args.quick,
    )
    return 0


# --------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from .info import describe_checkpoint

    print(json.dumps(describe_checkpoint(args.checkpoint), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-rvq",
        description="Speech -> discrete semantic tokens for LLMs (the Speechless pipeline).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _tokenize.make_parser(sub)
    _train.make_parser(sub)
    _evaluate.make_parser(sub)
    _sft.make_parser(sub)
    _generate.make_parser(sub)

    p = sub.add_parser(
        "convert",
        help="import a seed rvq_*.pt checkpoint or a SpireLM k-means model into a gemma-rvq folder",
        description="Convert existing checkpoints into gemma-rvq (save_pretrained) folders.",
    )
    from .convert import add_arguments as add_convert_arguments

    add_convert_arguments(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "push",
        help="upload a folder made by gemma-rvq (model, metric Space, token dataset) to the Hub",
        description="Upload a Hub-ready folder with huggingface_hub (needs a token: `hf auth login`).",
    )
    p.add_argument("folder", help="the folder to upload")
    p.add_argument("repo_id", help="target repository, e.g. user/twi-rvq")
    p.add_argument(
        "--repo-type",
        choices=["auto", "model", "dataset", "space"],
        default="auto",
        help="auto (default): a Space if README.md declares an sdk, a dataset if the folder was saved with "
        "save_to_disk, else a model",
    )
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument(
        "--dry-run", action="store_true",
        help="show what would be uploaded and where (files, sizes, repo id and type); upload nothing",
    )  # fmt: skip
    p.add_argument(
        "--allow-local-paths", action="store_true",
        help="upload even when files name absolute local paths (refused by default: they leak your layout)",
    )  # fmt: skip
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "demo",
        help="run the whole pipeline offline at toy scale and write a report",
        description=(
            "Stage 1 (RVQ training), tokenization, stage 2 (Speechless) and stage 3 (LoRA SFT) on the bundled "
            "espeak-ng corpus, with a tiny random encoder unless --encoder is given."
        ),
    )
    p.add_argument("--output-dir", default="demo_output", help="report folder (default: demo_output)")
    p.add_argument("--corpus", default=None, help="corpus folder with metadata.jsonl (default: data/corpus)")
    p.add_argument("--encoder", default=None, help="a real encoder id/path, e.g. rnagabh/gemma4-audio-encoder")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage only: checks the wiring in ~1 min")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "info",
        help="what a checkpoint holds: config, encoder, codebooks, files",
        description="Describe a gemma-rvq folder/Hub repo or a seed-format checkpoint.",
    )
    p.add_argument("checkpoint", help="folder, Hub id, or rvq_*.pt file")
    p.set_defaults(func=cmd_info)

    from .stream_cli import make_parser as add_stream_parser

    add_stream_parser(sub)

    from .downstream import make_answer_parser, make_evaluate_llm_parser

    make_answer_parser(sub)  # gemma-rvq answer FILE... --model DIR
    make_evaluate_llm_parser(sub)  # gemma-rvq evaluate-llm --model DIR --dataset DATA
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _forwarded(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str, list[str]] | None:
    """(command, its arguments) when ``argv`` runs a task that parses its own arguments (train, sft)."""
    sub = parser._subparsers._group_actions[0].choices  # the subcommand parsers
    for i, token in enumerate(argv):
        if not token.startswith("-"):
            command = sub.get(token)
            if command is not None and command.get_default("forward") is not None:
                return token, argv[i + 1 :]
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    forwarded = _forwarded(parser, argv)
    if forwarded is not None:  # the task's own parser reads the rest (HfArgumentParser / TrlParser + YAML)
        command, rest = forwarded
        args = parser.parse_args([*argv[: len(argv) - len(rest) - 1], command])

        def run_forwarded(args: argparse.Namespace) -> int:
            args.forward(rest, f"gemma-rvq {command}")
            return 0

        args.func = run_forwarded
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("gemma-rvq: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line, not a traceback, unless asked for
        if args.traceback:
            raise
        print(f"gemma-rvq {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
