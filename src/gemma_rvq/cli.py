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

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        "-m",
        required=True,
        help="gemma-rvq checkpoint: a local folder or Hub id (seed-format rvq_*.pt folders are converted on the fly)",
    )


def _load_model(name_or_path: str, device: str | None = None):
    from .convert import load_any

    model = load_any(name_or_path)  # a mistyped local path fails at once, never tried as a Hub id
    if device:
        model.to(device)
    return model.eval()


# --------------------------------------------------------------------------------------------- tokenize
def _audio_files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    if not files:
        raise ValueError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) found in: {' '.join(inputs)}")
    return files


def _load_input_dataset(args: argparse.Namespace):
    import datasets

    from .audio import undecoded

    if args.dataset:
        path = Path(args.dataset)
        if path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[args.split]
        return undecoded(ds, args.audio_column)  # gemma_rvq.audio decodes, not datasets (torchcodec)
    files = _audio_files(args.inputs)
    return datasets.Dataset.from_dict(
        {"file": [str(f) for f in files], args.audio_column: [{"path": str(f), "bytes": None} for f in files]}
    )


OUTPUT_FORMATS = {".jsonl": "JSON lines", ".json": "a JSON array", ".csv": "CSV", ".parquet": "Parquet"}


def _output_format(output: Path) -> str:
    """The file suffix ``-o`` names (one of :data:`OUTPUT_FORMATS`), or ``""`` for a save_to_disk folder."""
    suffix = output.suffix.lower()
    if suffix in OUTPUT_FORMATS:
        return suffix
    if not suffix or output.is_dir():
        return ""
    formats = ", ".join(f"{s} ({name})" for s, name in OUTPUT_FORMATS.items())
    raise ValueError(f"cannot tell the output format of {output}: name a folder (no suffix: save_to_disk) or a "
                     f"file ending in {formats}")


def _write_output(ds, output: Path, fmt: str) -> None:
    if fmt == "":
        ds.save_to_disk(str(output))
    elif fmt in (".jsonl", ".json"):
        ds.to_json(str(output), lines=fmt == ".jsonl", force_ascii=False, **({} if fmt == ".jsonl" else {"orient": "records"}))
    elif fmt == ".csv":
        # nested lists (the codes) as JSON text: CSV has no list type
        from datasets import Value

        nested = [c for c, f in ds.features.items() if not isinstance(f, Value)]
        if nested:
            ds = ds.map(lambda row: {c: json.dumps(row[c]) for c in nested}, desc="Codes as JSON text")
        ds.to_csv(str(output), index=False)
    else:
        ds.to_parquet(str(output))


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .transforms import SpeechTokenizer

    if not args.inputs and not args.dataset:
        raise ValueError("give audio files/folders, or --dataset")
    output = Path(args.output)
    output_format = _output_format(output)  # refuse an unknown suffix before any work
    ds = _load_input_dataset(args)
    tokenizer = SpeechTokenizer(
        _load_model(args.model, args.device),
        format=args.format,
        audio_column=args.audio_column,
        sampling_rate_column=args.sampling_rate_column,
        pcm_dtype=args.pcm_dtype,
        return_codes=args.codes,
        return_num_frames=True,
        num_quantizers=args.num_quantizers,
        on_error=args.on_error,
    )
    out = ds.map(tokenizer, batched=True, batch_size=args.batch_size, with_indices=True, desc="Tokenizing speech")
    out = out.remove_columns([c for c in [args.audio_column] if c in out.column_names])
    _write_output(out, output, output_format)
    print(f"wrote {len(out)} rows to {output}")
    return 0


# --------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .training import RVQTrainingConfig, train_rvq

    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    config = RVQTrainingConfig.from_yaml(args.config, **overrides)
    result = train_rvq(config)
    for name, folder in result.folders.items():
        print(f"{name}: {folder}")
    return 0


# --------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_audio_files

    model = _load_model(args.model, args.device)
    results = evaluate_audio_files(model, _audio_files(args.inputs), batch_size=args.batch_size)
    text = json.dumps(results, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


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
    from .hub import push_folder

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    repo_type = repo_type_of(folder) if args.repo_type == "auto" else args.repo_type
    print(push_folder(folder, args.repo_id, repo_type=repo_type, private=args.private))
    return 0


# --------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
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

    p = sub.add_parser(
        "tokenize",
        help="audio files, folders or a dataset -> semantic-token strings (a dataset or JSONL)",
        description="Encode speech into semantic-token strings with a gemma-rvq model.",
    )
    p.add_argument("inputs", nargs="*", help="audio files or folders (searched recursively)")
    _add_model_argument(p)
    p.add_argument("--dataset", help="instead of files: a Hub dataset id or a save_to_disk folder")
    p.add_argument("--dataset-config", default=None, help="dataset configuration name")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--audio-column", default="audio", help="audio column of the dataset (default: audio)")
    p.add_argument(
        "--sampling-rate-column", default=None, help="column with the sampling rate of raw-array audio"
    )
    p.add_argument(
        "--pcm-dtype",
        default=None,
        choices=["int8", "int16", "int32", "uint8"],
        help="width of integer PCM samples (a dataset's int16 audio arrives as int64 and needs this)",
    )
    p.add_argument("--format", default="gemma_rvq", help="token format preset: gemma_rvq, ichigo, spire")
    p.add_argument("--num-quantizers", type=int, default=None, help="render only the first k levels")
    p.add_argument("--codes", action="store_true", help="also write the integer codes")
    p.add_argument("--batch-size", type=int, default=64, help="examples per map batch")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad audio: stop, or skip")
    p.add_argument(
        "--output",
        "-o",
        required=True,
        help="output: a folder (save_to_disk), or a .jsonl, .json, .csv or .parquet file (other suffixes are refused)",
    )
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser(
        "train",
        help="train an RVQ (stage 1) from a YAML config; for multi-GPU use accelerate launch examples/train_rvq.py",
        description="Train a residual vector quantizer on frozen-encoder embeddings (stage 1).",
    )
    p.add_argument("--config", "-c", required=True, help="YAML file of RVQTrainingConfig fields")
    p.add_argument("--output-dir", help="override output_dir of the config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="score a checkpoint on audio: MSE, NMSE, FVU, cosine, utilization, perplexity",
        description="Encode audio, reconstruct the embeddings and report the RVQ quality metrics.",
    )
    p.add_argument("inputs", nargs="+", help="audio files or folders")
    _add_model_argument(p)
    p.add_argument("--batch-size", type=int, default=16, help="clips per encoder batch")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--output", "-o", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_evaluate)

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
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
