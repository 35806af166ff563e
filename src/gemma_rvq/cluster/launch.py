"""Pipelines and executors: tokenize a corpus on one machine, a Slurm cluster or a Ray cluster.

    gemma-rvq tokenize clips/ --model my/rvq --output tokens/ --executor local --tasks 8 --workers 2
    gemma-rvq tokenize shards/*.jsonl --audio-column file --model my/rvq --output tokens/ \\
        --executor slurm --tasks 200 --partition gpu --gpus-per-task 1 --time 04:00:00 --venv-path .venv/bin/activate
    gemma-rvq tokenize --dataset my/speech --model my/rvq --output tokens/ --executor ray --tasks 64 --gpus-per-task 1

This module only imports datatrove inside functions, so that ``gemma-rvq tokenize --help`` works without
the ``cluster`` extra. The pipeline is ``[reader, SpeechTokenizerStep, TokenizedParquetWriter]``;
datatrove shards the input, runs the tasks, and writes a completion marker per finished task under
``<output>/logs``, so running the same command again runs only the tasks that did not finish.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "slurm", "ray")
MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl",
                     ".csv": "csv", ".parquet": "parquet"}  # fmt: skip
RUN_FILE = "gemma_rvq_run.json"


def _require_datatrove() -> None:
    from ..extras import require

    require("datatrove", "gemma-rvq tokenize --executor")


# ----------------------------------------------------------------------------------------- pipeline
def build_pipeline(reader, tokenizer, output_dir: str, *, batch_size: int = 1000, audio_root: str | None = None,
                   drop_audio: bool = True, split: str = "train", **writer_options: Any) -> list:
    """``[reader, SpeechTokenizerStep, TokenizedParquetWriter]`` writing
    ``<output_dir>/data/{split}-{rank}-of-{tasks}.parquet`` and ``<output_dir>/semantic_format.json``.

    ``drop_audio``: leave the audio column out of the written rows when it holds audio data (bytes, arrays);
    file paths and URLs are kept.
    """
    from datatrove.io import get_datafolder

    from .output import DATA_DIR, TokenizedParquetWriter
    from .step import SpeechTokenizerStep

    folder = get_datafolder(output_dir)
    step = SpeechTokenizerStep(tokenizer, batch_size=batch_size, audio_root=audio_root, output_folder=folder)
    writer = TokenizedParquetWriter(
        folder.resolve_paths(DATA_DIR),
        tokenizer,
        audio_column=tokenizer.audio_column if drop_audio else None,
        split=split,
        **writer_options,
    )
    return [reader, step, writer]


def dataset_reader(name: str, *, config: str | None = None, split: str = "train", audio_column: str = "audio",
                   **options: Any):
    """A reader of a Hugging Face dataset whose audio stays undecoded: a ``save_to_disk`` folder (contiguous
    row shards), or a Hub id, streamed (each task reads only its share of the data files; a dataset stored
    as one file is split by rows)."""
    from .readers import AudioDatasetReader

    on_disk = os.path.isdir(name) and any(
        os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")
    )
    if on_disk:
        return AudioDatasetReader(str(Path(name).resolve()), load_from_disk=True, split=split,
                                  audio_column=audio_column, **options)
    dataset_options = {"split": split, **({"name": config} if config else {})}
    options.setdefault("streaming", True)
    return AudioDatasetReader(name, dataset_options=dataset_options, audio_column=audio_column, **options)


def manifest_reader(files: Sequence[str], paths_file: str, **options: Any):
    """A reader of jsonl / csv / parquet manifests (one row per clip); all of one kind. ``paths_file`` is
    written with their paths (datatrove shards the files between tasks: at most one task per file)."""
    from datatrove.pipeline.readers import CSVReader, JsonlReader, ParquetReader

    from .step import audio_row_adapter

    kinds = {_manifest_kind(f) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(f"manifests must all be jsonl, csv or parquet files, got: {', '.join(files)}")
    kind = kinds.pop()
    paths = [str(Path(f).resolve()) for f in files]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    _write_if_unchanged(paths_file, "".join(os.path.relpath(p, root) + "\n" for p in paths), "input files")
    cls = {"jsonl": JsonlReader, "csv": CSVReader, "parquet": ParquetReader}[kind]
    reader = cls(root, paths_file=paths_file, adapter=audio_row_adapter, **options)
    reader.add_file_path = False  # keep rows as they are (ParquetReader has no argument for it)
    return reader


def audio_files_reader(files: Sequence[Path], manifest_dir: str, *, tasks: int, column: str = "file"):
    """A reader over audio files: their paths go into ``tasks`` contiguous jsonl manifests (rows
    ``{column: absolute path}``), so every task gets a share and the output keeps the files' order."""
    paths = [str(Path(f).resolve()) for f in files]
    shards = max(1, min(tasks, len(paths)))
    bounds = [round(i * len(paths) / shards) for i in range(shards + 1)]
    os.makedirs(manifest_dir, exist_ok=True)
    names = []
    for i in range(shards):
        name = os.path.join(manifest_dir, f"{i:05d}.jsonl")
        rows = "".join(json.dumps({column: p}) + "\n" for p in paths[bounds[i]:bounds[i + 1]])
        _write_if_unchanged(name, rows, "audio file list")
        names.append(name)
    return manifest_reader(names, os.path.join(manifest_dir, "paths.txt"), id_key=column)


def _manifest_kind(path: str) -> str | None:
    name = str(path).lower()
    return next((kind for suffix, kind in MANIFEST_SUFFIXES.items() if name.endswith(suffix)), None)


def _write_if_unchanged(path: str, text: str, what: str) -> None:
    """Write ``text`` to ``path``; on a re-run the file must be the same, or the completed tasks' shards
    would no longer match their input."""
    if os.path.isfile(path):
        if Path(path).read_text() != text:
            raise ValueError(
                f"the {what} differs from the first run into this output folder ({path}): completed tasks "
                "would not match their input. Use a new --output folder"
            )
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Path(path).write_text(text)


def check_run_identity(logging_dir: str, identity: dict) -> None:
    """Record what a run computes (model identity, format, options, gemma-rvq version) in the logs; a re-run
    into the same folder must compute the same, since its completed tasks are skipped."""
    path = os.path.join(logging_dir, RUN_FILE)
    text = json.dumps(identity, indent=2, sort_keys=True, default=str) + "\n"
    if os.path.isfile(path):
        before = json.loads(Path(path).read_text())
        now = json.loads(text)
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ValueError(
                f"this output folder was made with other settings ({', '.join(changed)} differ; see {path}), "
                "and its completed tasks would be kept: use a new --output folder, or the same settings"
            )
        return
    os.makedirs(logging_dir, exist_ok=True)
    Path(path).write_text(text)


# ----------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--executor`` options of ``gemma-rvq tokenize``."""
    g = parser.add_argument_group(
        "many processes or machines (datatrove; pip install 'gemma-rvq[cluster]')",
        "With --executor, --output is a folder of Parquet shards (data/*.parquet) that "
        "datasets.load_dataset(folder) reads, with semantic_format.json and a resumable log (logs/).",
    )
    g.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="run as a datatrove pipeline: local processes, a Slurm job array, or Ray tasks")
    g.add_argument("--tasks", type=int, default=1, help="number of tasks (input shards, output files)")
    g.add_argument("--workers", type=int, default=-1, help="tasks running at once (default: all)")
    g.add_argument("--logging-dir", default=None, help="datatrove logs and completion markers (default: OUTPUT/logs)")
    g.add_argument("--audio-root", default=None,
                   help="folder or URL that relative audio paths of manifests are read from "
                        "(default: the manifests' folder)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="slurm/ray: CPUs per task")
    g.add_argument("--mem-per-cpu-gb", type=float, default=None, help="slurm/ray: memory per CPU in GB")
    g.add_argument("--gpus-per-task", type=int, default=None, help="slurm/ray: GPUs per task")
    g.add_argument("--partition", default=None, help="slurm: partition")
    g.add_argument("--time", default=None, help="slurm: time limit per task (HH:MM:SS)")
    g.add_argument("--job-name", default=None, help="slurm: job name")
    g.add_argument("--qos", default=None, help="slurm: quality of service")
    g.add_argument("--venv-path", default=None, help="slurm: a venv activate script to source in the job")
    g.add_argument("--env-command", default=None, help="slurm: a command that sets up the job's environment")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: an extra #SBATCH option, e.g. account=myproj (repeatable)")
    g.add_argument("--ray-address", default=None, help="ray: cluster address (default: start a local Ray)")
    g.add_argument("--executor-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the datatrove executor, value parsed as YAML, e.g. "
                        "tasks_per_job=4 or ray_remote_kwargs={max_retries: 2} (repeatable)")


def _key_values(items: Sequence[str], flag: str, parse: bool) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if parse else value
    return out


def executor_options(args: argparse.Namespace) -> dict[str, Any]:
    """The datatrove executor options given on the command line (only those set)."""
    names = {"local": (), "slurm": ("cpus_per_task", "mem_per_cpu_gb", "gpus_per_task", "partition", "time",
                                    "job_name", "qos", "venv_path", "env_command"),
             "ray": ("cpus_per_task", "mem_per_cpu_gb", "gpus_per_task")}[args.executor]  # fmt: skip
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    given = {k: getattr(args, k) for k in ("cpus_per_task", "mem_per_cpu_gb", "gpus_per_task", "partition", "time",
                                          "job_name", "qos", "venv_path", "env_command")}  # fmt: skip
    stray = sorted(k for k, v in given.items() if v is not None and k not in names)
    if stray:
        raise ValueError(f"--{stray[0].replace('_', '-')} does not apply to --executor {args.executor}")
    if args.executor == "slurm" and "mem_per_cpu_gb" in options:  # sbatch takes whole units: 4G, not 4.0G
        if not float(options["mem_per_cpu_gb"]).is_integer():
            raise ValueError(f"--mem-per-cpu-gb must be a whole number for slurm, got {options['mem_per_cpu_gb']}")
        options["mem_per_cpu_gb"] = int(options["mem_per_cpu_gb"])
    if args.sbatch_arg:
        if args.executor != "slurm":
            raise ValueError("--sbatch-arg applies to --executor slurm only")
        options["sbatch_args"] = _key_values(args.sbatch_arg, "--sbatch-arg", parse=False)
    options.update(_key_values(args.executor_arg, "--executor-arg", parse=True))
    return options


def run(args: argparse.Namespace) -> int:
    """``gemma-rvq tokenize --executor ...``: build the pipeline, write the dataset card, run (or submit)."""
    _require_datatrove()
    from ..commands.tokenize import encoder_dtype
    from ..transforms import SpeechTokenizer
    from .output import LOGS_DIR, write_dataset_card

    if args.tasks < 1:
        raise ValueError(f"--tasks must be >= 1, got {args.tasks}")
    output = os.path.abspath(os.path.expanduser(args.output))
    if Path(output).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        raise ValueError(f"with --executor, --output is a folder (of Parquet shards), not a {Path(output).suffix} file")
    logging_dir = os.path.abspath(args.logging_dir) if args.logging_dir else os.path.join(output, LOGS_DIR)
    model = args.model
    if model.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(model)):
        model = os.path.abspath(os.path.expanduser(model))
        if not os.path.exists(model):
            raise FileNotFoundError(f"no such checkpoint folder or file: {args.model}")
    audio_column, audio_root, source = args.audio_column, args.audio_root, None
    if args.dataset:
        reader = dataset_reader(args.dataset, config=args.dataset_config, split=args.split,
                                audio_column=audio_column)
        source = f"the dataset `{args.dataset}`"
    elif not args.inputs:
        raise ValueError("give audio files/folders, jsonl/csv/parquet manifests, or --dataset")
    elif all(_manifest_kind(i) for i in args.inputs):
        reader = manifest_reader(args.inputs, os.path.join(logging_dir, "inputs.txt"))
        if audio_root is None:
            audio_root = os.path.commonpath([os.path.dirname(os.path.abspath(i)) for i in args.inputs])
        source = "manifests " + ", ".join(f"`{os.path.basename(i)}`" for i in args.inputs[:5])
    else:
        from ..commands.tokenize import audio_files

        files = audio_files(args.inputs)
        audio_column = "file"
        reader = audio_files_reader(files, os.path.join(logging_dir, "inputs"), tasks=args.tasks, column=audio_column)
        source = f"{len(files)} audio files"
    tokenizer = SpeechTokenizer(
        model,
        format=args.format,
        audio_column=audio_column,
        sampling_rate_column=getattr(args, "sampling_rate_column", None),
        pcm_dtype=getattr(args, "pcm_dtype", None),
        return_codes=args.codes,
        return_num_frames=True,
        num_quantizers=args.num_quantizers,
        on_error=args.on_error,
        device=args.device,
        dtype=encoder_dtype(args.dtype),
        num_threads=args.num_threads,
    )
    options = executor_options(args)
    check_run_identity(logging_dir, {**tokenizer.identity(), "tasks": args.tasks})
    pipeline = build_pipeline(reader, tokenizer, output, batch_size=args.batch_size, audio_root=audio_root,
                              split=args.split)
    write_dataset_card(output, tokenizer, model=args.model, split=args.split, source=source)
    from .executors import make_executor

    executor = make_executor(args.executor, pipeline, tasks=args.tasks, workers=args.workers,
                             logging_dir=logging_dir, **options)
    if args.executor == "ray":
        from ..extras import require

        ray = require("ray", "--executor ray")
        if not ray.is_initialized():
            ray.init(address=args.ray_address)
    executor.run()
    if args.executor == "slurm":
        print(f"submitted {args.tasks} tasks; job script: {os.path.join(logging_dir, 'launch_script.slurm')}")
    else:
        completions = os.path.join(logging_dir, "completions")
        done = len(os.listdir(completions)) if os.path.isdir(completions) else 0
        print(f"{done}/{args.tasks} tasks complete; load with datasets.load_dataset({output!r})")
    return 0
