"""Model cards of the stage-2/3 LLM folders (full models, LoRA adapters, distilled students).

A card is data rendered through a template, as in sentence-transformers: :class:`LMModelCardData` is
filled from what the run knows (the recipe, the arguments, the trainer's state and log) by
:meth:`LMModelCardData.from_trainer`, and ``templates/lm_model_card.md`` (Jinja) turns it into
``README.md``; the YAML header is ``huggingface_hub.ModelCardData``. No card text is assembled here.

Everything a card (or any file of a Hub-ready folder) says about another artifact — the base model, the
training data, the stage-1 speech tokenizer, a distillation teacher — is a Hub id or a plain name, never a
local path: :func:`hub_reference` decides which. What only this machine can use (the local folder of a base
model or speech tokenizer that has no Hub id) goes to ``_gemma_rvq_local.json`` (:data:`LOCAL_PATHS_FILE`),
which is never uploaded (``_*`` files are left out by ``gemma-rvq push`` and ``Trainer.push_to_hub``), so the
folder still loads here without naming them again. :func:`write_lm_model_card` is what
``gemma_rvq.recipes.run_sft`` and ``run_distill`` call after saving.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LOCAL_PATHS_FILE",
    "MODEL_ID_KEY",
    "TEMPLATE",
    "HubReference",
    "LMModelCardData",
    "hub_reference",
    "local_path",
    "local_paths_of",
    "training_hyperparameters",
    "write_lm_model_card",
    "write_local_paths",
]

TEMPLATE = Path(__file__).parent / "templates" / "lm_model_card.md"
MODEL_ID_KEY = "model_id"  # key of a folder's own Hub id in its gemma_rvq_recipe.json
_RECIPE_FILE = "gemma_rvq_recipe.json"  # = gemma_rvq.recipes.RECIPE_FILE (not imported: that needs trl)
LOCAL_PATHS_FILE = "_gemma_rvq_local.json"  # {key: absolute local path}; a ``_*`` file: never uploaded

RECIPE_SUMMARIES = {
    "speechless": "stage 2 (Speechless): text in, the semantic-token string of the same words spoken out, so "
                  "text-only instruction data can be turned into \"speech\" without recording anyone",
    "speech_instruct": "stage 3: a spoken instruction (its semantic-token string) in, the text answer out",
    "asr": "speech recognition: a semantic-token string in, its transcript (or translation) out",
    "cpt": "continued pretraining on packed speech/text documents (transcripts, token strings, pairs and "
           "word-interleaved sequences)",
}
# training arguments never shown on a card: paths, credentials, bookkeeping, Hub plumbing
_HIDDEN_ARGUMENTS = {
    "output_dir", "logging_dir", "run_name", "resume_from_checkpoint", "hub_model_id", "hub_token", "hub_strategy",
    "hub_private_repo", "hub_always_push", "hub_revision", "push_to_hub", "report_to", "disable_tqdm",
    "gradient_checkpointing", "gradient_checkpointing_kwargs",  # deprecated mirrors of activation_checkpointing*
    "deepspeed", "fsdp_config", "chat_template_path", "trackio_space_id", "project", "overwrite_output_dir",
    "logging_first_step", "logging_strategy", "logging_steps", "save_strategy", "save_steps", "save_total_limit",
    "dataloader_num_workers", "dataset_num_proc", "use_cpu", "local_rank", "model_init_kwargs", "seed",
    "data_seed", "ddp_backend", "accelerator_config", "eval_on_start", "include_num_input_tokens_seen",
}
_LOG_KEYS = ("loss", "eval_loss", "mean_token_accuracy", "eval_mean_token_accuracy", "learning_rate")


# ---------------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class HubReference:
    """How a Hub-ready folder names another artifact: ``id`` (a Hub repo id, or ``None`` when it has none)
    and ``name`` (what a reader sees: the id, or a local folder's name; never its path)."""

    id: str | None
    name: str | None

    @property
    def local(self) -> bool:
        return self.id is None and self.name is not None


def _looks_local(name: str) -> bool:
    from .convert import looks_like_local_path

    return os.path.exists(name) or looks_like_local_path(name)


def hub_reference(name_or_path: str | os.PathLike | None, explicit: str | None = None) -> HubReference:
    """The Hub identity of ``name_or_path`` (a Hub id, or a local folder / file).

    ``explicit`` (a Hub id the user gave, e.g. ``--base_model_id``) wins. A Hub id stays as is. A local
    folder saved by gemma-rvq with a Hub id of its own (``hub_model_id`` when it was trained, kept as
    ``model_id`` in its ``gemma_rvq_recipe.json``) is named by that id; any other local path keeps only
    its folder name, as ``HubReference(None, name)``.
    """
    if explicit:
        if _looks_local(explicit):
            raise ValueError(f"{explicit!r} is a local path, not a Hub repo id (namespace/name)")
        return HubReference(explicit, explicit)
    if name_or_path is None or str(name_or_path) == "":
        return HubReference(None, None)
    text = os.fspath(name_or_path)
    if not _looks_local(text):
        return HubReference(text, text)
    recipe = Path(text) / _RECIPE_FILE
    if recipe.is_file():
        own = json.loads(recipe.read_text(encoding="utf-8")).get(MODEL_ID_KEY)
        if own:
            return HubReference(own, own)
    return HubReference(None, Path(text.rstrip("/\\")).name or text)


def local_paths_of(**sources: str | os.PathLike | None) -> dict[str, str]:
    """``{key: absolute path}`` of the ``sources`` that are local folders or files (Hub ids are left out)."""
    return {key: os.path.abspath(os.fspath(value)) for key, value in sources.items()
            if value is not None and str(value) and os.path.exists(os.fspath(value))}


def write_local_paths(folder: str | os.PathLike, paths: dict[str, str]) -> Path | None:
    """Write (or, given nothing, remove) ``folder``'s :data:`LOCAL_PATHS_FILE`: the local folders its files name
    only by Hub id or name. Returns its path, or ``None`` when there is nothing local to remember."""
    target = Path(folder) / LOCAL_PATHS_FILE
    if not paths:
        target.unlink(missing_ok=True)
        return None
    target.write_text(json.dumps(paths, indent=1) + "\n", encoding="utf-8")
    return target


def local_path(folder: str | os.PathLike, key: str) -> str | None:
    """The local path ``folder``'s :data:`LOCAL_PATHS_FILE` gives for ``key``, if it exists on this machine
    (never in a copy from the Hub: the file is not uploaded)."""
    target = Path(folder) / LOCAL_PATHS_FILE
    if not target.is_file():
        return None
    try:
        value = json.loads(target.read_text(encoding="utf-8")).get(key)
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) and os.path.exists(value) else None


# ---------------------------------------------------------------------------------------------- card data
def training_hyperparameters(args: Any) -> dict[str, Any]:
    """The training arguments that differ from their defaults, without paths and bookkeeping (a card shows
    how the model was trained, not where). ``args``: a ``TrainingArguments`` dataclass (``SFTConfig``...)."""
    shown: dict[str, Any] = {}
    for f in dataclasses.fields(args):
        if f.name in _HIDDEN_ARGUMENTS or f.name.startswith(("hub_", "push_", "_")) or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        value = getattr(args, f.name, None)
        value = getattr(value, "value", value)  # enums (IntervalStrategy, SchedulerType...) by value
        default = getattr(default, "value", default)
        if value == default or value in (None, "", [], {}):
            continue
        if isinstance(value, str) and _looks_local(value) and os.sep in value:
            continue
        shown[f.name] = value if isinstance(value, bool | int | float | str) else json.dumps(value, default=str)
    return shown


def _log_table(log_history: Sequence[dict], max_rows: int = 20) -> list[dict[str, Any]]:
    """Rows ``{step, epoch, loss, eval_loss, ...}`` of the training log, thinned to at most ``max_rows``."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "step" not in entry or not any(k in entry for k in _LOG_KEYS):
            continue
        row = rows.setdefault(int(entry["step"]), {"step": int(entry["step"]), "epoch": entry.get("epoch")})
        row.update({k: entry[k] for k in _LOG_KEYS if k in entry})
    ordered = [rows[k] for k in sorted(rows)]
    if len(ordered) > max_rows:
        stride = -(-len(ordered) // max_rows)
        ordered = [*ordered[::stride][: max_rows - 1], ordered[-1]]
    return ordered


def _results(log_history: Sequence[dict], global_step: int) -> dict[str, Any]:
    """The final numbers of a run: train loss (last logged and mean), eval loss, token accuracy, steps."""
    keys = ("train_loss", "train_runtime", "loss", "eval_loss", "mean_token_accuracy", "eval_mean_token_accuracy",
            "epoch", "num_tokens")
    results: dict[str, Any] = {"steps": global_step, **dict.fromkeys(keys)}
    for entry in log_history:
        for key in ("loss", "eval_loss", "mean_token_accuracy", "eval_mean_token_accuracy", "epoch", "num_tokens"):
            if key in entry:
                results[key] = entry[key]
        if "train_loss" in entry:
            results["train_loss"] = entry["train_loss"]
            results["train_runtime"] = entry.get("train_runtime")
    return results


def _lora_summary(model: Any) -> dict[str, Any] | None:
    """r, alpha, dropout, target module names and trainable token rows of a PEFT model's active adapter."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    config = configs.get(getattr(model, "active_adapter", "default")) or next(iter(configs.values()))
    targets = config.target_modules
    if isinstance(targets, list | set | tuple):
        targets = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    rows = {name: len(ids) for name, ids in (config.trainable_token_indices or {}).items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout, "target_modules": targets,
            "trainable_token_rows": rows, "modules_to_save": sorted(config.modules_to_save or []),
            "trainable_parameters": trainable, "parameters": total}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("gemma-rvq", "transformers", "trl", "peft", "datasets", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@dataclass
class LMModelCardData:
    """What the card of a stage-2/3 LLM folder says. Every field is data; ``templates/lm_model_card.md``
    decides the wording.

    Attributes:
        model_name: the title.
        recipe: ``speechless``, ``speech_instruct``, ``asr`` or ``cpt`` (``gemma_rvq.recipes.RECIPES``).
        model_id: this model's Hub id (``hub_model_id``); the usage snippet names it (a placeholder if unset).
        base_model: the model it was trained from (a distilled student: its teacher), see :class:`HubReference`.
        adapter: a LoRA adapter (PEFT) rather than full weights.
        dataset: the training data (a Hub id becomes the card's ``datasets`` metadata).
        speech_tokenizer: the stage-1 model whose codes the semantic tokens are.
        token_format: ``SemanticTokenFormat.to_dict()`` of the tokens the model reads or writes.
        num_new_tokens / vocab_size: tokens added to the tokenizer, and its size after.
        prompt: how inputs are rendered (template, system prompt, user template, language).
        lora: :func:`_lora_summary` of the adapter, or ``None``.
        distillation: teacher layers, layer map and loss weights of a distilled student, or ``None``.
        hyperparameters: :func:`training_hyperparameters`.
        results / log: the run's final numbers and its training log (:func:`_log_table`).
        train_rows / eval_rows: examples in the training / evaluation split.
        tags / license / versions: card metadata and the library versions used.
    """

    model_name: str
    recipe: str
    model_id: str | None = None
    base_model: HubReference = field(default_factory=lambda: HubReference(None, None))
    adapter: bool = False
    dataset: HubReference = field(default_factory=lambda: HubReference(None, None))
    speech_tokenizer: HubReference = field(default_factory=lambda: HubReference(None, None))
    token_format: dict[str, Any] = field(default_factory=dict)
    num_new_tokens: int | None = None
    vocab_size: int | None = None
    prompt: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    distillation: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    train_rows: int | None = None
    eval_rows: int | None = None
    tags: list[str] = field(default_factory=list)
    license: str | None = None
    versions: dict[str, str] = field(default_factory=_versions)

    @classmethod
    def from_trainer(cls, trainer: Any, *, model_name: str | None = None, dataset_name: str | None = None,
                     tags: Sequence[str] = ()) -> LMModelCardData:
        """The card data of a finished ``run_sft`` / ``run_distill`` trainer (its ``gemma_rvq_recipe`` record,
        arguments, state and model). ``dataset_name``: the training data as given (Hub id or local path)."""
        args = trainer.args
        recipe = getattr(trainer, "gemma_rvq_recipe", None)
        saved = Path(os.fspath(args.output_dir)) / _RECIPE_FILE
        if recipe is None and saved.is_file():  # a distilled student: the teacher's record, rewritten
            recipe = json.loads(saved.read_text(encoding="utf-8"))
        recipe = dict(recipe or {})
        distill = getattr(trainer, "gemma_rvq_distill", None)
        model_id = getattr(args, "hub_model_id", None) or recipe.get(MODEL_ID_KEY)
        output_name = Path(os.fspath(args.output_dir)).name
        model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
        base = HubReference(recipe.get("base_model"), recipe.get("base_model_name") or recipe.get("base_model"))
        distillation = None
        if distill is not None:
            distillation = {"layer_map": distill.get("layer_map"), "student_layers": distill.get("student_layers"),
                            **{k: getattr(args, k) for k in ("ce_weight", "kl_weight", "hidden_weight",
                                                              "attention_weight", "temperature") if hasattr(args, k)}}
        train, evaluation = getattr(trainer, "train_dataset", None), getattr(trainer, "eval_dataset", None)
        fmt = recipe.get("token_format") or (distill or {}).get("token_format") or {}
        recipe_name = recipe.get("recipe") or "speechless"
        return cls(
            model_name=model_name or (model_id.split("/")[-1] if model_id else output_name),
            recipe=recipe_name,
            model_id=model_id,
            base_model=base,
            adapter=_lora_summary(model) is not None,
            dataset=hub_reference(dataset_name),
            speech_tokenizer=HubReference(recipe.get("speech_tokenizer"),
                                          recipe.get("speech_tokenizer_name") or recipe.get("speech_tokenizer")),
            token_format=fmt,
            num_new_tokens=recipe.get("num_new_tokens"),
            vocab_size=recipe.get("vocab_size") or len(trainer.processing_class),
            prompt={k: recipe.get(k) for k in ("prompt_template", "system_prompt", "user_template", "language")
                    if recipe.get(k)},
            lora=_lora_summary(model),
            distillation=distillation,
            hyperparameters=training_hyperparameters(args),
            results=_results(trainer.state.log_history, trainer.state.global_step),
            log=_log_table(trainer.state.log_history),
            train_rows=len(train) if hasattr(train, "__len__") else None,
            eval_rows=len(evaluation) if hasattr(evaluation, "__len__") else None,
            tags=list(dict.fromkeys(["gemma-rvq", "semantic-tokens", "trl", "sft", recipe_name.replace("_", "-"),
                                     *(["distillation"] if distill is not None else []),
                                     *(["lora", "peft"] if _lora_summary(model) is not None else []), *tags])),
        )

    def metadata(self):
        """The YAML header (``huggingface_hub.ModelCardData``): library, pipeline, base model, datasets,
        tags and, when an evaluation ran, a model-index with its loss."""
        from huggingface_hub import EvalResult, ModelCardData

        eval_results = None
        if self.results.get("eval_loss") is not None:
            eval_results = [EvalResult(
                task_type="text-generation", dataset_type=self.dataset.id or "custom",
                dataset_name=self.dataset.name or "evaluation split", metric_type="loss",
                metric_name="eval loss", metric_value=round(float(self.results["eval_loss"]), 6))]
        return ModelCardData(
            library_name="peft" if self.adapter else "transformers",
            pipeline_tag="text-generation",
            base_model=self.base_model.id,
            base_model_relation=("adapter" if self.adapter else "finetune") if self.base_model.id else None,
            datasets=[self.dataset.id] if self.dataset.id else None,
            license=self.license,
            tags=self.tags,
            model_name=self.model_name,
            eval_results=eval_results,
        )

    def render(self) -> str:
        """The card text (YAML header + Markdown) through :data:`TEMPLATE`."""
        from huggingface_hub import ModelCard

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["recipe_summary"] = RECIPE_SUMMARIES.get(self.recipe, self.recipe)
        values["repo_id"] = self.model_id or f"your-name/{self.model_name.replace(' ', '-')}"
        values["format_name"] = self.token_format.get("name")
        values["format_json"] = repr(self.token_format)  # a Python literal for the usage snippet
        return str(ModelCard.from_template(self.metadata(), template_path=str(TEMPLATE), **values))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``README.md`` into ``folder``; returns its path."""
        path = Path(folder) / "README.md"
        path.write_text(self.render(), encoding="utf-8")
        return path


def write_lm_model_card(trainer: Any, output_dir: str | os.PathLike | None = None, *, model_name: str | None = None,
                        dataset_name: str | None = None, tags: Sequence[str] = ()) -> Path | None:
    """Write the card of ``trainer``'s saved model into ``output_dir`` (default ``trainer.args.output_dir``)
    on the main process; returns its path (``None`` on other processes)."""
    if hasattr(trainer, "is_world_process_zero") and not trainer.is_world_process_zero():
        return None
    data = LMModelCardData.from_trainer(trainer, model_name=model_name, dataset_name=dataset_name, tags=tags)
    return data.save(output_dir or trainer.args.output_dir)
