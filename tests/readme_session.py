"""Run README steps, each in a fresh process forked from one interpreter that has imported the heavy
third-party libraries (torch, transformers, datasets, ...), never gemma_rvq.

    python readme_session.py steps.json OUTPUT_DIR

``steps.json``: a list of ``{"kind": "python", "code": ...}`` or ``{"kind": "command", "argv": [...]}``, run in
order in the current directory. Each step runs in its own child process (``os.fork``), so nothing a step does
(imports of gemma_rvq, Auto-class registrations, globals) reaches the next one: as for a user who runs each
block as a script and each command in a shell. A Python block is executed as ``__main__``; a command whose
program is a console script (``gemma-rvq``, ``accelerate``) calls that script's entry point with the
``sys.argv`` the script would see; anything else is exec'ed. The programs a step launches (``accelerate launch
x.py`` starts ``python x.py``) are real interpreters. What forking saves is each step's interpreter start and
third-party imports (about 6-7 CPU seconds each on this CPU).

Each step's stdout and stderr (its subprocesses' included) go to ``OUTPUT_DIR/step-<i>.log``; ``step-<i>.json``
records its exit status and CPU/wall seconds. The session stops at the first failing step.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from importlib.metadata import entry_points

# What a fresh interpreter would import anyway at the start of nearly every step (not gemma_rvq: it is imported
# by the step itself, in its own process). Importing is free of side effects that a step could observe.
PRELOADED = ("numpy", "torch", "soundfile", "datasets", "transformers", "transformers.modeling_utils",
             "transformers.trainer", "accelerate", "evaluate", "peft", "trl")


def _preload() -> None:
    import importlib

    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError:  # an extra that is not installed: the step that needs it says so itself
            continue


def _children_cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def _run_command(argv: list[str]) -> int:
    scripts = entry_points(group="console_scripts", name=argv[0])
    if not scripts:
        os.execvp(argv[0], argv)  # replaces the child: its exit status is the command's
    main = next(iter(scripts)).load()
    sys.argv = list(argv)
    try:
        status = main()
    except SystemExit as exit_:
        status = exit_.code
    if isinstance(status, str):  # sys.exit("message")
        print(status, file=sys.stderr)
        return 1
    return int(status or 0)


def _run_step(step: dict) -> int:
    if step["kind"] == "python":
        code = compile(step["code"], f"<README python block {step['index']}>", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        return 0
    return _run_command(step["argv"])


def _child(step: dict, log: str) -> None:
    """In the forked child: output to ``log``, run the step, exit with its status (never returns)."""
    status = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        status = _run_step(step)
    except BaseException:  # a failing block: its traceback is its output
        traceback.print_exc()
        status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main(steps_file: str, output_dir: str) -> int:
    with open(steps_file, encoding="utf-8") as handle:
        steps = json.load(handle)
    _preload()
    for i, step in enumerate(steps):
        log = os.path.join(output_dir, f"step-{i}.log")
        sys.stdout.flush()
        sys.stderr.flush()
        cpu, wall = _children_cpu(), time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _child(step, log)
        _, wait_status = os.waitpid(pid, 0)
        status = os.waitstatus_to_exitcode(wait_status)
        with open(os.path.join(output_dir, f"step-{i}.json"), "w", encoding="utf-8") as handle:
            json.dump({"status": status, "cpu": _children_cpu() - cpu, "wall": time.perf_counter() - wall}, handle)
        if status != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
