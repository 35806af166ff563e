"""``gemma-rvq tokenize`` / ``examples/tokenize_dataset.py``: audio files, folders or a dataset -> token strings.

    gemma-rvq tokenize recordings/ -m twi-rvq --format ichigo --on-error skip -o tokens.jsonl
    python examples/tokenize_dataset.py --dataset user/twi-speech -m twi-rvq -o twi-tokens
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from . import add_model_argument, load_model, task_parser

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")
HELP = "audio files, folders or a dataset -> semantic-token strings (a dataset or a json/csv/parquet file)"
DESCRIPTION = "Encode speech into semantic-token strings with a gemma-rvq model."


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """The ``tokenize`` parser: a ``gemma-rvq`` subcommand with ``subparsers``, else standalone."""
    parser = task_parser("tokenize", HELP, DESCRIPTION, subparsers, prog)
    parser.add_argument("inputs", nargs="*", help="audio files or folders (searched recursively)")
    add_model_argument(parser)
    parser.add_argument("--dataset", help="instead of files: a Hub dataset id or a save_to_disk folder")
    parser.add_argument("--dataset-config", default=None, help="dataset configuration name")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--audio-column", default="audio", help="audio column of the dataset (default: audio)")
    parser.add_argument(
        "--sampling-rate-column", default=None, help="column with the sampling rate of raw-array audio"
    )
    parser.add_argument(
        "--pcm-dtype",
        default=None,
        choices=["int8", "int16", "int32", "uint8"],
        help="width of integer PCM samples (a dataset's int16 audio arrives as int64 and needs this)",
    )
    parser.add_argument("--format", default="gemma_rvq", help="token format preset: gemma_rvq, ichigo, spire")
    parser.add_argument("--num-quantizers", type=int, default=None, help="render only the first k levels")
    parser.add_argument("--codes", action="store_true", help="also write the integer codes")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per map batch")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="encoder compute dtype: auto (bf16 where the device runs it natively and faster, else float32; "
        "see SpeechTokenizer), float32, bfloat16, or none (the model as loaded)",
    )
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (per task with --executor)")
    parser.add_argument(
        "--on-error", choices=["raise", "skip"], default="raise", help="bad audio: stop, or skip"
    )
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        help="output: a folder (save_to_disk), or a .jsonl, .json, .csv or .parquet file (other suffixes are refused)",
    )
    from ..cluster.launch import add_arguments as add_cluster_arguments  # --executor local|slurm|ray ...

    add_cluster_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def audio_files(inputs: Sequence[str]) -> list[Path]:
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

    from ..audio import undecoded

    if args.dataset:
        path = Path(args.dataset)
        if path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[args.split]
        return undecoded(ds, args.audio_column)  # gemma_rvq.audio decodes, not datasets (torchcodec)
    files = audio_files(args.inputs)
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


def encoder_dtype(value: str) -> str | None:
    """``--dtype`` as ``SpeechTokenizer(dtype=...)`` takes it: ``"none"`` -> ``None`` (the model as loaded)."""
    return None if value.lower() == "none" else value


def main(args: argparse.Namespace) -> int:
    """Tokenize the files or dataset ``args`` names and write ``args.output``; returns the exit status."""
    if getattr(args, "executor", None) is not None:  # a datatrove pipeline on local processes, Slurm or Ray
        from ..cluster.launch import run

        return run(args)
    from ..transforms import SpeechTokenizer

    if not args.inputs and not args.dataset:
        raise ValueError("give audio files/folders, or --dataset")
    output = Path(args.output)
    output_format = _output_format(output)  # refuse an unknown suffix before any work
    ds = _load_input_dataset(args)
    tokenizer = SpeechTokenizer(
        load_model(args.model, args.device),
        format=args.format,
        audio_column=args.audio_column,
        sampling_rate_column=args.sampling_rate_column,
        pcm_dtype=args.pcm_dtype,
        return_codes=args.codes,
        return_num_frames=True,
        num_quantizers=args.num_quantizers,
        on_error=args.on_error,
        dtype=encoder_dtype(args.dtype),
        num_threads=args.num_threads,
    )
    out = ds.map(tokenizer, batched=True, batch_size=args.batch_size, with_indices=True, desc="Tokenizing speech")
    out = out.remove_columns([c for c in [args.audio_column] if c in out.column_names])
    from ..formats import attach_format, save_format

    out = attach_format(out, tokenizer.format, speech_tokenizer=args.model)  # the format travels with the data
    _write_output(out, output, output_format)
    save_format(output if output_format == "" else output.parent, tokenizer.format, speech_tokenizer=args.model)
    print(f"wrote {len(out)} rows to {output}")
    return 0


__all__ = ["AUDIO_SUFFIXES", "OUTPUT_FORMATS", "audio_files", "encoder_dtype", "main", "make_parser"]
