"""Hugging Face Hub helpers: pushing folders, Space folders, the metric Spaces.

Sections (add new artifact kinds as new sections that reuse the generic helpers):

* generic: :func:`push_folder` (create the repo if needed, upload a folder), :func:`split_card` /
  :func:`join_card` (YAML metadata header + Markdown body), :func:`write_space_folder`.
* metric Spaces: :func:`write_metric_space`, :func:`push_metric`.

evaluate's own ``evaluate-cli`` cannot push with huggingface_hub 2.x; metrics live on the Hub as gradio
Spaces, created here with ``HfApi.create_repo(repo_type="space")`` and ``upload_folder``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "METRIC_SPACE_GRADIO_VERSION",
    "join_card",
    "push_folder",
    "push_metric",
    "self_contained_module_source",
    "split_card",
    "write_metric_space",
    "write_space_folder",
]

PathLike = str | os.PathLike

_REPO_TYPES = ("model", "dataset", "space")
_SPACE_SDKS = ("gradio", "docker", "static")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# --------------------------------------------------------------------------------------------------
# generic


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected 'name' or 'namespace/name'")


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """Split a card (README.md) into its YAML metadata header (``{}`` if none) and its Markdown body."""
    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, flags=re.DOTALL)
    if not match:
        return {}, text
    meta = yaml.safe_load(match.group(1)) or {}
    if not isinstance(meta, dict):
        raise ValueError("the card's YAML header must be a mapping")
    return meta, text[match.end() :]


def join_card(metadata: Mapping[str, Any], body: str) -> str:
    """A card: ``---`` YAML metadata ``---`` then the Markdown body."""
    header = yaml.safe_dump(dict(metadata), sort_keys=False, allow_unicode=True).strip()
    return f"---\n{header}\n---\n\n{body.lstrip()}"


def write_space_folder(
    folder: PathLike,
    *,
    metadata: Mapping[str, Any],
    readme_body: str,
    files: Mapping[str, str | bytes | PathLike] | None = None,
    requirements: Sequence[str] = (),
) -> Path:
    """Write the files of a Hub Space into ``folder`` (created if needed) and return its path.

    Args:
        metadata: the Space's README YAML header; ``sdk`` is required and, for gradio, ``app_file``
            (default ``app.py``) must be one of ``files``.
        readme_body: Markdown below the header.
        files: relative path -> text, bytes, or a ``Path`` to copy (``str`` is always text).
        requirements: lines of ``requirements.txt`` (written only if given).
    """
    meta = dict(metadata)
    if meta.get("sdk") not in _SPACE_SDKS:
        raise ValueError(f"Space metadata needs sdk in {_SPACE_SDKS}, got {meta.get('sdk')!r}")
    files = dict(files or {})
    if meta["sdk"] == "gradio":
        meta.setdefault("app_file", "app.py")
        if meta["app_file"] not in files:
            raise ValueError(f"app_file {meta['app_file']!r} is not among the Space files {sorted(files)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        target = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"Space file paths must be relative and inside the folder, got {rel!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        elif isinstance(content, str):
            target.write_text(content, encoding="utf-8")
        else:
            shutil.copyfile(content, target)
    if requirements:
        (folder / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(join_card(meta, readme_body), encoding="utf-8")
    return folder


def push_folder(
    folder: PathLike,
    repo_id: str,
    *,
    repo_type: str = "model",
    token: str | None = None,
    private: bool = False,
    space_sdk: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` on the Hub if needed and upload ``folder`` to it; returns the repo URL.

    For ``repo_type="space"`` the SDK is taken from ``space_sdk`` or else the folder's README header.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if repo_type not in _REPO_TYPES:
        raise ValueError(f"repo_type must be one of {_REPO_TYPES}, got {repo_type!r}")
    _check_repo_id(repo_id)
    if repo_type == "space" and space_sdk is None:
        readme = folder / "README.md"
        meta = split_card(readme.read_text(encoding="utf-8"))[0] if readme.exists() else {}
        space_sdk = meta.get("sdk")
    if repo_type == "space" and space_sdk not in _SPACE_SDKS:
        raise ValueError(f"a Space needs space_sdk in {_SPACE_SDKS} (or sdk: in its README header)")

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(
        repo_id,
        repo_type=repo_type,
        private=private,
        exist_ok=True,
        **({"space_sdk": space_sdk} if repo_type == "space" else {}),
    )
    api.upload_folder(
        repo_id=url.repo_id,
        folder_path=str(folder),
        repo_type=repo_type,
        revision=revision,
        commit_message=commit_message or f"Upload {folder.name} with gemma-rvq",
    )
    return str(url)


# --------------------------------------------------------------------------------------------------
# metric Spaces

# evaluate.utils.launch_gradio_widget uses the gradio 3 API (gr.inputs / gr.outputs), as do the
# evaluate-metric Spaces.
METRIC_SPACE_GRADIO_VERSION = "3.19.1"
METRIC_SPACE_REQUIREMENTS = ("evaluate>=0.4.6", "datasets>=2.14", "numpy", "torch")
_VENDORED_FUNCTIONAL = "rvq_functional"  # must differ from every metric name
_PACKAGE_IMPORT = "from gemma_rvq.metrics.functional import"
_VENDORED_IMPORT = f"from .{_VENDORED_FUNCTIONAL} import"
# options the widget needs (it passes only the features): the gemma-rvq default codebook
_WIDGET_OPTIONS = {
    "codebook_utilization": {"codebook_size": 2048},
    "codebook_perplexity": {"codebook_size": 2048},
    "rvq_quality": {"codebook_size": 2048},
}

_APP_TEMPLATE = """\
import os

import evaluate
from evaluate.utils import launch_gradio_widget

# Load the module file beside this app (the Space folder need not be named after the metric).
module = evaluate.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "{name}.py"){options})
launch_gradio_widget(module)
"""


def self_contained_module_source(name: str) -> str:
    """The source of metric ``name`` with its import of ``gemma_rvq.metrics.functional`` turned into a
    flat import of the vendored ``rvq_functional.py`` (evaluate copies flat siblings along)."""
    from .metrics import module_path

    source = Path(module_path(name), f"{name}.py").read_text(encoding="utf-8")
    if source.count(_PACKAGE_IMPORT) != 1:
        raise ValueError(f"{name}.py must import the math exactly once as `{_PACKAGE_IMPORT} ...`")
    source = source.replace(_PACKAGE_IMPORT, _VENDORED_IMPORT)
    leftover = [line for line in source.splitlines() if re.match(r"^\s*(from|import)\s+gemma_rvq\b", line)]
    if leftover:
        raise ValueError(f"{name}.py still imports gemma_rvq after vendoring: {leftover}")
    return source


def write_metric_space(name: str, folder: PathLike) -> Path:
    """Write a self-contained evaluate metric Space for ``name`` into ``folder``; returns the folder.

    Files: ``<name>.py`` (importing the vendored math), ``rvq_functional.py`` (a copy of
    ``gemma_rvq.metrics.functional``, torch only), ``app.py`` (``launch_gradio_widget``), ``README.md``
    (the metric card with the Space header) and ``requirements.txt``. ``evaluate.load(folder)`` works
    where gemma-rvq is not installed when the folder is named ``name``; ``evaluate.load(folder /
    f"{name}.py")`` always does.
    """
    from .metrics import functional, module_path

    names = {f"{name}.py", f"{_VENDORED_FUNCTIONAL}.py", "app.py", "README.md", "requirements.txt"}
    stray = (
        sorted(p.name for p in Path(folder).iterdir() if p.name not in names) if Path(folder).is_dir() else []
    )
    if stray:  # they would be uploaded with the Space
        raise ValueError(f"{folder} holds files that are not part of the {name} Space: {stray}")
    meta, body = split_card(Path(module_path(name), "README.md").read_text(encoding="utf-8"))
    meta = {
        "title": name.replace("_", " ").title(),
        **meta,
        "sdk": "gradio",
        "sdk_version": meta.get("sdk_version", METRIC_SPACE_GRADIO_VERSION),
        "app_file": "app.py",
    }
    meta["tags"] = list(dict.fromkeys([*meta.get("tags", []), "evaluate", "metric"]))
    options = "".join(f", {k}={v!r}" for k, v in _WIDGET_OPTIONS.get(name, {}).items())
    return write_space_folder(
        folder,
        metadata=meta,
        readme_body=body,
        files={
            f"{name}.py": self_contained_module_source(name),
            f"{_VENDORED_FUNCTIONAL}.py": Path(functional.__file__),
            "app.py": _APP_TEMPLATE.format(name=name, options=options),
        },
        requirements=METRIC_SPACE_REQUIREMENTS,
    )


def push_metric(
    name: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    folder: PathLike | None = None,
    dry_run: bool = False,
) -> str:
    """Publish metric ``name`` as a Hub Space ``repo_id`` (``evaluate.load(repo_id)`` then works).

    Args:
        name: one of ``gemma_rvq.metrics.METRICS``.
        repo_id: ``namespace/space_name``.
        folder: where to write the Space files (default: a fresh temporary folder ``.../<name>``).
        dry_run: write the folder and return its path without any network call.

    Returns:
        The folder path (dry run) or the Space URL.
    """
    from .metrics import METRICS

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
    _check_repo_id(repo_id)
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="gemma_rvq_space_")) / name
    path = write_metric_space(name, folder)
    if dry_run:
        return str(path)
    return push_folder(
        path,
        repo_id,
        repo_type="space",
        token=token,
        private=private,
        space_sdk="gradio",
        commit_message=f"Upload the {name} metric (gemma-rvq)",
    )
