"""The training run's output folder: refuse to mix two runs in one folder, and lock it while a run writes.

transformers' convention (its example scripts, ``overwrite_output_dir``): a training run does not write
into a non-empty ``output_dir`` unless it is asked to overwrite it or to resume from a checkpoint there.
Otherwise a fresh run in a finished run's folder would silently restart at step 0 and replace its
exports, and two runs started on one folder would both finish with ``best``, ``final`` and ``averaged``
coming from different runs.

While a run writes, it holds ``<output_dir>/.gemma-rvq.lock`` (JSON: pid, host, start time, command): a
second run on the same folder fails at once, naming the holder. A lock left by a process that no longer
exists on this host is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = ".gemma-rvq.lock"
#: What a previous run leaves in its folder, removed by ``overwrite_output_dir`` (nothing else is deleted).
RUN_OUTPUTS = ("checkpoints", "best", "final", "averaged", "logs", "results.json", "history.json",
               "loss_curves.png", "code_usage.png", "level_errors.png")

logger = logging.getLogger(__name__)
_held: dict[str, int] = {}  # lock paths held by this process -> nesting depth


class OutputDirInUseError(RuntimeError):
    """Another live process holds the output folder's lock."""


def _ignored(output_dir: Path, cache_dir: str | os.PathLike | None) -> set[str]:
    names = {LOCK_NAME}
    if cache_dir is not None:
        cache = Path(cache_dir).resolve()
        if cache.parent == output_dir.resolve():
            names.add(cache.name)  # the embedding cache is reusable across runs (resumable writing)
    return names


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool = False, resume: str | None = None,
                     cache_dir: str | os.PathLike | None = None) -> None:
    """Raise ``ValueError`` when ``output_dir`` holds another run's outputs and neither ``overwrite`` nor a
    ``resume`` is asked for. The embedding cache inside the folder and the lock file do not count."""
    folder = Path(output_dir)
    if overwrite or resume or not folder.is_dir():
        return
    ignored = _ignored(folder, cache_dir)
    found = sorted(p.name for p in folder.iterdir() if p.name not in ignored)
    if found:
        shown = ", ".join(found[:6]) + (f" ... ({len(found)} entries)" if len(found) > 6 else "")
        raise ValueError(
            f"output_dir {str(folder)!r} already exists and is not empty ({shown}): it holds another run. "
            "Pass --resume_from_checkpoint latest to continue that run, --overwrite_output_dir true to replace "
            "it, or choose another --output_dir."
        )


def clear_run_outputs(output_dir: str | os.PathLike) -> list[str]:
    """Remove a previous run's outputs (:data:`RUN_OUTPUTS`) from ``output_dir``; returns what was removed."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The lock holder's record (``pid``, ``host``, ``started``, ``command``), or None when unlocked."""
    path = Path(output_dir) / LOCK_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "started": None, "command": "unreadable lock file"}


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {when} ({holder.get('command')})"


@contextlib.contextmanager
def run_lock(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<output_dir>/.gemma-rvq.lock`` for the duration of the block (re-entrant within a process).

    Raises:
        OutputDirInUseError: another live process holds it; the message names it.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = str(path.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(sys.argv)[:300]}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(folder) or {}
            pid = holder.get("pid")
            if holder.get("host") == record["host"] and isinstance(pid, int) and not _alive(pid):
                logger.warning(f"{path}: taking over the lock of a process that no longer exists "
                               f"({_describe(holder)})")
                path.unlink(missing_ok=True)
                continue
            raise OutputDirInUseError(
                f"output_dir {str(folder)!r} is in use by another training run: {_describe(holder)}. Wait for it "
                f"to finish or use another --output_dir; if that process is gone, delete {path}."
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        break
    else:  # pragma: no cover - two processes raced for a stale lock
        raise OutputDirInUseError(f"could not take the lock {path}")
    _held[key] = 1
    try:
        yield path
    finally:
        _held.pop(key, None)
        holder = read_lock(folder)
        if holder and holder.get("pid") == os.getpid():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def claim_output_dir(config: Any, accelerator: Any) -> Iterator[None]:
    """The checks and the lock for ``config.output_dir``, on the main process; every process raises the
    same error when they fail (so that none waits forever for the others)."""
    error: list[Any] = [None]
    stack = contextlib.ExitStack()
    if accelerator.is_main_process:
        try:
            stack.enter_context(run_lock(config.output_dir))
            if not _nested(config.output_dir):
                check_output_dir(config.output_dir, overwrite=config.overwrite_output_dir,
                                 resume=config.resume_from_checkpoint, cache_dir=config.resolved_cache_dir)
                if config.overwrite_output_dir and not config.resume_from_checkpoint:
                    removed = clear_run_outputs(config.output_dir)
                    if removed:
                        logger.warning(f"overwrite_output_dir: removed {removed} from {config.output_dir}")
        except (ValueError, OutputDirInUseError) as err:
            stack.close()
            error[0] = (type(err).__name__, str(err))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(error)
    if error[0] is not None:
        kind, message = error[0]
        raise (OutputDirInUseError if kind == "OutputDirInUseError" else ValueError)(message)
    with stack:
        yield


def _nested(output_dir: str | os.PathLike) -> bool:
    """True when this process already held the lock before the current claim (an inner claim: the outer
    one has checked the folder already, e.g. ``train_rvq`` around ``RVQTrainer.train``)."""
    return _held.get(str((Path(output_dir) / LOCK_NAME).resolve()), 0) > 1
