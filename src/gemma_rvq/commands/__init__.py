"""One parser per task, shared by the ``gemma-rvq`` subcommand and the example script.

Each task module (``tokenize``, ``evaluate``, ``train``, ``sft``, ``generate``) has ``make_parser(subparsers=None,
prog=None)`` and ``main(...)`` (anchor: ``trl/scripts/sft.py``):

- with ``subparsers`` (the ``gemma-rvq`` command) it adds its subcommand there;
- without, it returns a standalone parser (the example scripts: ``examples/train_rvq.py``,
  ``examples/sft.py``, ``examples/tokenize_dataset.py``).

Tasks configured by dataclasses (``train``: ``RVQTrainingConfig``; ``sft``: TRL's dataclasses) parse
with ``transformers.HfArgumentParser`` and a ``--config file.yaml``. Their subcommand forwards the rest
of the command line to that same parser (built only when the subcommand runs, so ``gemma-rvq --help``
imports no optional extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from transformers import HfArgumentParser


class TaskParser(HfArgumentParser):
    """``HfArgumentParser`` over ``dataclass_types`` plus ``--config`` / ``-c``: a YAML file whose keys
    are field names (they become defaults; flags on the command line win). Unknown keys are refused,
    naming the file; mappings become JSON text (fields such as ``model_config``)."""

    def __init__(self, dataclass_types: Any, **kwargs: Any) -> None:
        super().__init__(dataclass_types, **kwargs)
        names = ", ".join(t.__name__ for t in self.dataclass_types)
        self.add_argument("--config", "-c", default=None, help=f"YAML file of {names} fields (flags override it)")

    def _config_defaults(self, path: str) -> dict[str, Any]:
        import yaml

        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        names = " / ".join(t.__name__ for t in self.dataclass_types)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of {names} fields, got {type(values).__name__}")
        fields = {f.name for t in self.dataclass_types for f in dataclasses.fields(t)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{path}: unknown {names} keys: {unknown}")
        return {k: json.dumps(v) if isinstance(v, dict) else v for k, v in values.items()}

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple:
        """The dataclass instances, from ``--config`` (if given) and the command line (which wins)."""
        args = list(sys.argv[1:] if args is None else args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", "-c", default=None)
        known, _ = pre.parse_known_args(args)
        if known.config is not None:
            defaults = self._config_defaults(known.config)
            self.set_defaults(**defaults)
            for action in self._actions:  # a required field the file sets is no longer required on the command line
                if action.dest in defaults:
                    action.required = False
        outputs = self.parse_args_into_dataclasses(args=args)
        return tuple(o for o in outputs if not isinstance(o, argparse.Namespace))  # drops --config itself


def task_parser(
    name: str, help: str, description: str, subparsers: argparse._SubParsersAction | None = None,
    prog: str | None = None,
) -> argparse.ArgumentParser:
    """The parser of an argparse-configured task: the ``gemma-rvq <name>`` subcommand when ``subparsers`` is
    given, else a standalone parser named ``prog`` (the example script)."""
    if subparsers is not None:
        return subparsers.add_parser(name, help=help, description=description)
    return argparse.ArgumentParser(prog=prog, description=description)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model`` / ``-m``: the gemma-rvq checkpoint a task runs."""
    parser.add_argument(
        "--model",
        "-m",
        required=True,
        help="gemma-rvq checkpoint: a local folder or Hub id (seed-format rvq_*.pt folders are converted on the fly)",
    )


def load_model(name_or_path: str, device: str | None = None):
    """The checkpoint ``--model`` names, in eval mode (a mistyped local path fails at once, never tried as
    a Hub id; an uncached Hub id fails within seconds offline: see ``gemma_rvq.convert.load_any``)."""
    from ..convert import load_any

    model = load_any(name_or_path)
    if device:
        model.to(device)
    return model.eval()


def add_forwarding_subparser(
    subparsers: argparse._SubParsersAction, name: str, help: str, run: Callable[[Sequence[str], str], Any]
) -> argparse.ArgumentParser:
    """The ``gemma-rvq <name>`` entry of a dataclass-configured task: it takes the rest of the command
    line and hands it to ``run(argv, prog)``, which parses it with the task's own parser."""
    parser = subparsers.add_parser(name, help=help, description=help, add_help=False)
    parser.add_argument(
        "arguments", nargs=argparse.REMAINDER,
        help=f"the task's own options (gemma-rvq {name} --help lists them; --config file.yaml)",
    )  # fmt: skip
    parser.set_defaults(forward=run)
    return parser


__all__ = ["TaskParser", "add_forwarding_subparser", "add_model_argument", "load_model", "task_parser"]
