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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "METRIC_SPACE_GRADIO_VERSION",
    "PUSH_IGNORE_PATTERNS",
    "UploadPlan",
    "find_local_paths",
    "join_card",
    "plan_upload",
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


def _check_upload(folder: str | os.PathLike, repo_id: str, repo_type: str) -> Path:
    """``folder`` as a Path, once it is a folder, ``repo_type`` is known and ``repo_id`` well formed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if repo_type not in _REPO_TYPES:
        raise ValueError(f"repo_type must be one of {_REPO_TYPES}, got {repo_type!r}")
    _check_repo_id(repo_id)
    return folder


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


# Never uploaded (as ``Trainer.push_to_hub``): intermediate checkpoints and private ``_*`` entries; on top of
# huggingface_hub's own ``.git`` / ``.cache/huggingface`` rules.
PUSH_IGNORE_PATTERNS = ("checkpoint-*", "_*")
# an absolute POSIX path inside text: two components or more, not part of a URL (``https://host/x``)
_ABSOLUTE_PATH = re.compile(rb"(?<![\w.:/~-])(/[\w.@+-]+(?:/[\w.@+-]+)+)")
_SCAN_BYTES = 8 << 20  # of each file: model cards, configs and pickles are small; weights are skipped past this


def find_local_paths(folder: PathLike, *, extra: Sequence[str] = ()) -> dict[str, list[str]]:
    """Absolute paths of this machine written into the files of ``folder``: ``{relative file: [paths]}``.

    A path counts when it exists here (so a Hub id, a URL or prose never does), or when it starts with one
    of ``extra`` (e.g. a temporary folder that is gone). Files are read as bytes (up to 8 MiB each), so
    JSON, YAML, Markdown and pickles (``training_args.bin``) are all searched. A Hub-ready folder has none:
    on another machine they point nowhere, and they show the uploader's directory layout.
    """
    folder = Path(folder)
    extra_bytes = [os.fsencode(e) for e in extra if e and e != "/"]
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        with open(path, "rb") as handle:
            data = handle.read(_SCAN_BYTES)
        hits = {m.decode("utf-8", "replace") for m in _ABSOLUTE_PATH.findall(data)
                if any(m.startswith(e) for e in extra_bytes) or _exists_here(os.fsdecode(m))}
        if hits:
            found[path.relative_to(folder).as_posix()] = sorted(hits)
    return found


def _exists_here(path: str) -> bool:
    """``path``, or its parent when that still has two components (a pickle may glue a byte to the end),
    exists on this machine."""
    parent = os.path.dirname(path)
    return os.path.exists(path) or (parent.count("/") >= 2 and os.path.isdir(parent))


@dataclass
class UploadPlan:
    """What :func:`push_folder` would upload: the target and every file with its size, nothing sent.

    Attributes:
        folder: the local folder.
        repo_id / repo_type: the target repository (``namespace/name``; a bare name goes to the token's
            namespace) and its type (model, dataset, space).
        url: the repository's address on the Hub endpoint in use.
        files: ``(path in the repo, bytes)`` of each file to upload, sorted.
        ignored: files of the folder left out (intermediate checkpoints, ``_*``, ``.git``...).
        local_paths: files that contain an absolute local path (see :func:`find_local_paths`).
    """

    folder: Path
    repo_id: str
    repo_type: str
    url: str
    files: list[tuple[str, int]]
    ignored: list[str] = field(default_factory=list)
    local_paths: dict[str, list[str]] = field(default_factory=dict)
    private: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        """A human-readable listing (what ``gemma-rvq push --dry-run`` prints)."""
        lines = [f"Would upload {len(self.files)} files ({_human_size(self.total_bytes)}) from {self.folder}",
                 f"  to the {'private ' if self.private else ''}{self.repo_type} repository {self.repo_id} "
                 f"({self.url}):"]
        width = max((len(name) for name, _ in self.files), default=0)
        lines += [f"    {name:<{width}}  {_human_size(size):>9}" for name, size in self.files]
        if self.ignored:
            lines.append(f"  left out ({len(self.ignored)}): " + ", ".join(self.ignored[:8])
                         + (" ..." if len(self.ignored) > 8 else ""))
        for name, paths in self.local_paths.items():
            lines.append(f"  WARNING: {name} contains local path(s) {', '.join(paths[:3])}")
        lines.append("Nothing was uploaded (dry run).")
        return "\n".join(lines)


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # unreachable


def _repo_url(repo_id: str, repo_type: str) -> str:
    from huggingface_hub import constants

    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    name = repo_id if "/" in repo_id else f"<your-namespace>/{repo_id}"
    return f"{constants.ENDPOINT.rstrip('/')}/{prefix}{name}"


def plan_upload(folder: PathLike, repo_id: str, *, repo_type: str = "model", private: bool = False,
                ignore_patterns: Sequence[str] = PUSH_IGNORE_PATTERNS) -> UploadPlan:
    """The :class:`UploadPlan` of ``push_folder(folder, repo_id, repo_type=...)``, without any network call.

    The files are chosen as ``HfApi.upload_folder`` chooses them (its default ignore rules plus
    ``ignore_patterns``).
    """
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    folder = _check_upload(folder, repo_id, repo_type)
    every = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    kept = list(filter_repo_objects(every, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, *ignore_patterns]))
    return UploadPlan(
        folder=folder, repo_id=repo_id, repo_type=repo_type, url=_repo_url(repo_id, repo_type),
        files=[(name, every[name].stat().st_size) for name in kept],
        ignored=[name for name in every if name not in set(kept)],
        local_paths={k: v for k, v in find_local_paths(folder).items() if k in set(kept)}, private=private,
    )


def _unreachable(repo_id: str, err: Exception | None = None) -> ConnectionError:
    """The error of a push that cannot reach the Hub, naming the repository (raised before any retry loop)."""
    if err is None:
        why = "HF_HUB_OFFLINE is set"
        hint = "Unset HF_HUB_OFFLINE to upload"
    else:
        why = f"the Hugging Face Hub is unreachable ({type(err).__name__}: {err})"
        hint = "Check the network (HF_ENDPOINT, proxies) or unset HF_HUB_OFFLINE if it is set"
    return ConnectionError(f"cannot push to {repo_id!r}: {why}. {hint}; `gemma-rvq push --dry-run` shows what "
                           "would be uploaded without a network.")


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
    folder = _check_upload(folder, repo_id, repo_type)
    if repo_type == "space" and space_sdk is None:
        readme = folder / "README.md"
        meta = split_card(readme.read_text(encoding="utf-8"))[0] if readme.exists() else {}
        space_sdk = meta.get("sdk")
    if repo_type == "space" and space_sdk not in _SPACE_SDKS:
        raise ValueError(f"a Space needs space_sdk in {_SPACE_SDKS} (or sdk: in its README header)")

    from huggingface_hub import HfApi, is_offline_mode
    from huggingface_hub.errors import HfHubHTTPError

    if is_offline_mode():
        raise _unreachable(repo_id)
    api = HfApi(token=token)
    try:
        url = api.create_repo(
            repo_id,
            repo_type=repo_type,
            private=private,
            exist_ok=True,
            **({"space_sdk": space_sdk} if repo_type == "space" else {}),
        )
    except HfHubHTTPError:  # the Hub answered (401, 403...): its message says why
        raise
    except Exception as err:  # no answer: DNS, refused connection, timeout (httpx / httpx2 transport errors)
        if isinstance(err, OSError) or type(err).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
            raise _unreachable(repo_id, err) from err
        raise
    api.upload_folder(
        repo_id=url.repo_id,
        folder_path=str(folder),
        repo_type=repo_type,
        revision=revision,
        commit_message=commit_message or f"Upload {folder.name} with gemma-rvq",
        ignore_patterns=list(PUSH_IGNORE_PATTERNS),
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


# --------------------------------------------------------------------------------------------------
# trained RVQ models (stage 1): model cards and pushing

MODEL_CARD_TAGS = ("gemma-rvq", "speech-tokenizer", "residual-vector-quantization", "audio", "semantic-tokens")
# the seed card's table, then the extra metrics (key in the metric dicts -> row name)
_CARD_METRICS = (
    ("mse", "Reconstruction MSE", "{:.4f}"),
    ("cosine_similarity", "Cosine Similarity", "{:.4f}"),
    ("codebook_utilization", "Codebook Utilization", "{:.1%}"),
    ("codebook_perplexity", "Codebook Perplexity", "{:.0f}"),
    ("nmse", "Normalised MSE (NMSE)", "{:.4f}"),
    ("fvu", "Fraction of Variance Unexplained (FVU)", "{:.4f}"),
    ("centred_cosine_similarity", "Centred Cosine Similarity", "{:.4f}"),
    ("pooled_perplexity", "Pooled Perplexity (all levels)", "{:.0f}"),
)
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _data_name(dataset_name: str | None) -> str:
    """How a card names training data: a Hub id as is, a local file or folder by its name (never its path)."""
    from .cards import hub_reference

    return hub_reference(dataset_name).name or "dev"


def _read_json(path: Path) -> dict[str, Any]:
    import json

    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _model_card_body(name: str, repo_id: str | None, cfg: Mapping[str, Any], info: Mapping[str, Any],
                     training: Mapping[str, Any], variant: str | None, folder: Path) -> str:
    import math

    from .configuration_gemma_rvq import GemmaRVQConfig

    q, k = cfg.get("num_quantizers"), cfg.get("codebook_size")
    family = cfg.get("encoder_family", "gemma4_audio")
    fps = GemmaRVQConfig.from_dict(dict(cfg), name_or_path=str(folder)).frame_rate  # the config's frame arithmetic
    encoder = cfg.get("encoder_name_or_path") or f"bundled {family} encoder (weights in this checkpoint)"
    layer = cfg.get("encoder_layer")
    lines = [
        f"# {name}",
        "",
        "A [gemma-rvq](https://github.com/gemma-rvq/gemma-rvq) speech tokenizer: a frozen speech encoder "
        "followed by a residual vector quantizer (RVQ) that turns speech into discrete semantic tokens an "
        "LLM can learn from.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| Encoder | `{encoder}` ({family}, {'last layer' if layer is None else f'layer {layer}'}) |",
        f"| Embedding size D | {cfg.get('dim')} |",
        f"| Codebook dim Dc | {cfg.get('codebook_dim')} |",
        f"| Levels Q x codes K | {q} x {k} |",
        f"| Codebooks | {cfg.get('codebook_type')} (EMA decay {cfg.get('ema_decay')}) |",
        f"| Frame rate | {fps:g} frames/s |",
    ]
    if q and k:
        lines.append(f"| Bitrate | {q * math.log2(k) * fps:.0f} bit/s |")
    if variant:
        what = {"best": "the checkpoint with the lowest dev MSE",
                "averaged": "the element-wise mean of the last checkpoints' weights",
                "final": "the weights at the last training step"}.get(variant, variant)
        lines.append(f"| Weights | `{variant}`: {what} (step {info.get('step', '?')}) |")
    data = info.get("train_data") or {}
    dev = info.get("dev_data") or {}
    if data:
        langs = ", ".join(f"{lang} ({n})" for lang, n in (data.get("languages") or {}).items()) or "n/a"
        lines += ["", "## Training data", "",
                  "| split | hours | utterances | frames | languages (utterances) |", "|---|---|---|---|---|",
                  f"| train | {data.get('hours', 0):.2f} | {data.get('utterances')} | {data.get('frames')} | {langs} |"]
        if dev:
            dlangs = ", ".join(f"{lang} ({n})" for lang, n in (dev.get("languages") or {}).items()) or "n/a"
            lines.append(f"| dev | {dev.get('hours', 0):.2f} | {dev.get('utterances')} | {dev.get('frames')} | "
                         f"{dlangs} |")
    metrics = info.get("metrics") or {}
    if metrics:
        splits = [s for s in ("dev", "train") if s in metrics]
        lines += ["", "## Evaluation", "",
                  "| Metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
        for key, label, fmt in _CARD_METRICS:
            if all(key in metrics[s] for s in splits):
                lines.append(f"| {label} | " + " | ".join(fmt.format(metrics[s][key]) for s in splits) + " |")
        first = metrics[splits[0]]
        if "codebook_utilization_per_level" in first:
            lines += ["", f"Per level ({splits[0]}):", "",
                      "| level | utilization | perplexity | MSE with levels 1..k | FVU with levels 1..k |",
                      "|---|---|---|---|---|"]
            errors = first.get("level_errors") or {}
            for i, (u, p) in enumerate(zip(first["codebook_utilization_per_level"],
                                           first["codebook_perplexity_per_level"])):
                cells = [f"{errors[m][i]:.4f}" if i < len(errors.get(m, [])) else "" for m in ("mse", "fvu")]
                lines.append(f"| {i + 1} | {u:.1%} | {p:.0f} | {cells[0]} | {cells[1]} |")
        lines += ["", "Definitions (gemma_rvq.metrics): MSE per element in the encoder space; NMSE = error / "
                  "target energy; FVU = error / variance around the mean frame; cosine = mean per-frame cosine "
                  "(centred: both sides minus the mean frame). Utilization = fraction of a codebook's codes used "
                  "at least once over the whole evaluation set, perplexity = exp(entropy) of its code histogram "
                  "over the same set; both per codebook, then averaged over levels."]
    hub_id = repo_id or "path/to/this/folder"
    lines += [
        "", "## Usage", "", "```python",
        "import gemma_rvq  # registers GemmaRVQModel with the transformers Auto classes",
        "from transformers import AutoModel", "",
        f'model = AutoModel.from_pretrained("{hub_id}")',
        "# waveform: 1-D float array at any sampling rate (resampled to 16 kHz)",
        "out = model.encode([waveform], sampling_rate=sr)",
        "codes, mask = out.audio_codes, out.codes_mask  # [B, Q, T] long, [B, T] bool",
        "embeddings = model.decode(codes, mask).embeddings  # [B, T, D] reconstruction",
        "```", "",
        "Token strings for an LLM: `gemma_rvq.SpeechTokenizer(model)` as a `datasets.map` transform. "
        "Without gemma-rvq installed: `AutoModel.from_pretrained(..., trust_remote_code=True)`.",
    ]
    if training:
        keys = ("batch_size", "max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_ratio",
                "max_grad_norm", "kmeans_init_frames", "dead_code_restart_steps", "average_last_n", "seed")
        lines += ["", "## Training", "",
                  "Trained with `examples/train_rvq.py` (gemma-rvq): k-means initialisation of every codebook, "
                  "EMA codebooks with dead-code restarts, AdamW on the projections, loss = mse_weight x MSE + "
                  "cosine_weight x (1 - cos) + commitment_weight x commitment.", "",
                  "| setting | value |", "|---|---|"]
        lines += [f"| {key} | {training[key]} |" for key in keys if key in training]
        lines += [f"| {key} | {cfg.get(key)} |" for key in ("mse_weight", "cosine_weight", "commitment_weight")]
    plots = [(p, t) for p, t in (("code_usage.png", "Code usage per level"),
                                 ("level_errors.png", "Error after the first k levels"),
                                 ("loss_curves.png", "Training curves")) if (folder / p).exists()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{t}]({p})" for p, t in plots]
    return "\n".join(lines) + "\n"


def write_model_card(
    folder: PathLike,
    *,
    variant: str | None = None,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    languages: Sequence[str] | None = None,
    license: str = "apache-2.0",
    model_name: str | None = None,
) -> Path:
    """Write ``README.md`` (YAML metadata + Markdown) into a trained ``save_pretrained`` folder.

    Reads what the trainer left there: ``config.json`` (model), ``training_info.json`` (metrics,
    data summary, step), ``training_config.yaml`` (training settings) and the PNG plots. The metadata
    holds ``library_name: gemma-rvq``, tags, ``datasets`` (when ``dataset_name`` is a Hub id),
    ``language``, ``base_model`` (the encoder's Hub id) and a ``model-index`` with the dev metrics.

    Returns:
        the path of the README.
    """
    from huggingface_hub import EvalResult, ModelCardData

    folder = Path(folder)
    cfg = _read_json(folder / "config.json")
    if not cfg:
        raise ValueError(f"{folder} has no config.json: not a save_pretrained folder")
    info = _read_json(folder / "training_info.json")
    training: dict[str, Any] = {}
    if (folder / "training_config.yaml").exists():
        training = yaml.safe_load((folder / "training_config.yaml").read_text(encoding="utf-8")) or {}
    dataset_name = dataset_name or training.get("dataset_name")
    if languages is None:
        languages = training.get("languages") or list((info.get("train_data") or {}).get("languages") or {})
    if repo_id is not None:
        _check_repo_id(repo_id)
    name = model_name or (repo_id.split("/")[-1] if repo_id else f"gemma-rvq-{folder.name}")
    hub_dataset = dataset_name if dataset_name and _HUB_DATASET_ID.match(dataset_name) and not os.path.exists(
        dataset_name) else None
    dev = (info.get("metrics") or {}).get("dev") or {}
    eval_results = [
        EvalResult(task_type="feature-extraction", task_name="Speech tokenization (embedding reconstruction)",
                   dataset_type=hub_dataset or "custom", dataset_name=f"{_data_name(dataset_name)} (dev split)",
                   dataset_split="dev", metric_type=key, metric_name=label, metric_value=round(float(dev[key]), 6))
        for key, label, _ in _CARD_METRICS if key in dev
    ]
    encoder_id = cfg.get("encoder_name_or_path")
    data = ModelCardData(
        library_name="gemma-rvq",
        license=license,
        tags=list(MODEL_CARD_TAGS),
        datasets=[hub_dataset] if hub_dataset else None,
        language=list(languages) or None,
        base_model=encoder_id if encoder_id and _HUB_DATASET_ID.match(encoder_id) else None,
        metrics=[key for key, _, _ in _CARD_METRICS if key in dev] or None,
        model_name=name,
        eval_results=eval_results or None,
    )
    body = _model_card_body(name, repo_id, cfg, info, training, variant, folder)
    path = folder / "README.md"
    path.write_text(f"---\n{data.to_yaml()}\n---\n\n{body}", encoding="utf-8")
    return path


def push_model(
    folder: PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    dry_run: bool = False,
) -> str | list[str]:
    """Push a trained model folder (``best`` / ``averaged`` / ``final``) to the Hub model repo ``repo_id``.

    The folder is checked first: it must load with ``AutoModel.from_pretrained`` and hold a model card
    (written with :func:`write_model_card` when missing).

    Returns:
        the repo URL, or with ``dry_run`` the sorted relative paths that would be uploaded (no network).
    """
    from transformers import AutoModel

    from . import GemmaRVQModel

    folder = Path(folder)
    _check_repo_id(repo_id)
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} has no config.json: not a save_pretrained folder")
    model = AutoModel.from_pretrained(folder)
    if not isinstance(model, GemmaRVQModel):
        raise ValueError(f"{folder} holds a {type(model).__name__}, not a GemmaRVQModel")
    del model
    if not (folder / "README.md").exists():
        write_model_card(folder, repo_id=repo_id)
    if dry_run:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return push_folder(folder, repo_id, repo_type="model", token=token, private=private,
                       commit_message=commit_message or f"Upload {folder.name} gemma-rvq model", revision=revision)


__all__ += ["MODEL_CARD_TAGS", "push_model", "write_model_card"]
