"""datatrove executors for tokenization runs: local processes, a Slurm job array, Ray tasks."""

from __future__ import annotations

import os
from typing import Any

from datatrove.executor import LocalPipelineExecutor

from .step import LOCAL_RANK_ENV

EXECUTORS = ("local", "slurm", "ray")


class LocalExecutor(LocalPipelineExecutor):
    """datatrove's ``LocalPipelineExecutor`` that tells each task which worker slot runs it.

    A slot (0..workers-1) belongs to one running task at a time, so with ``workers <= GPUs`` the tasks
    running at once sit on different GPUs (:class:`SpeechTokenizerStep` puts slot ``s`` on GPU
    ``s % n_gpus``). Everything else is datatrove's.
    """

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        os.environ[LOCAL_RANK_ENV] = str(local_rank)
        try:
            return super()._run_for_rank(rank, local_rank, node_rank)
        finally:
            os.environ.pop(LOCAL_RANK_ENV, None)


def default_start_method() -> str:
    """``"fork"`` on a Linux machine without a visible GPU, else datatrove's ``"forkserver"``.

    Forked workers start without re-importing torch and transformers (on the 2-core CPU machine the 3-task
    corpus run took half the wall time of forkserver); they set torch to one thread (the tokenizer's rule
    for pool workers), which keeps them clear of the OpenMP pool of a parent that ran torch. Where a GPU is
    visible, forking is unsafe as soon as anything in the parent has touched the CUDA driver, which
    ``torch.cuda.is_initialized()`` does not report (``torch.cuda.is_available()`` alone initialises the
    driver); an 8-worker forked run on an H200 machine hung (the cause was not isolated). So GPU machines
    get fresh worker processes.
    """
    import sys

    import torch

    return "fork" if sys.platform.startswith("linux") and not torch.cuda.is_available() else "forkserver"


def make_executor(kind: str, pipeline: list, *, tasks: int, workers: int = -1, logging_dir: str, **options: Any):
    """A datatrove executor of ``kind`` (``"local"``, ``"slurm"``, ``"ray"``) for ``pipeline``.

    ``options`` go to the executor's constructor unchanged, under datatrove's names: ``partition``,
    ``time``, ``cpus_per_task``, ``mem_per_cpu_gb``, ``gpus_per_task``, ``sbatch_args``, ``venv_path``,
    ``tasks_per_job`` (Slurm); ``cpus_per_task``, ``gpus_per_task``, ``ray_remote_kwargs`` (Ray);
    ``start_method`` (local; default: :func:`default_start_method`). The Ray executor expects
    ``ray.init(...)`` to have been called.
    """
    if kind == "local":
        options.setdefault("start_method", default_start_method())
        return LocalExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, **options)
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        missing = [k for k in ("partition", "time") if not options.get(k)]
        if missing:
            raise ValueError(f"the slurm executor needs {' and '.join('--' + k for k in missing)}")
        return SlurmPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, **options)
    if kind == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, **options)
    raise ValueError(f"unknown executor {kind!r}; expected one of {EXECUTORS}")
