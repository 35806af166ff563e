"""Layer-aligned distillation of a speech-token LM into a shallower student (TinyWave, arXiv 2506.23670).

TinyWave compresses speech-text LMs about 3x by matching, layer to layer, the teacher's hidden states,
attention maps and temperature-softened next-token distributions. This module is that recipe over our
token strings, as a TRL ``SFTTrainer`` subclass, so the data side (recipes, chat templates, completion-only
labels, packing) is exactly ``examples/sft.py``'s:

- :func:`build_student` keeps every ``k``-th decoder layer of the teacher (or takes an explicit list) and
  copies its weights, embeddings and head included: the student reads the same tokenizer.
- :func:`default_layer_map` aligns student layer ``i`` with the last teacher layer of the block it replaces.
- The losses are plain torch functions (:func:`hidden_state_mse`, :func:`attention_kl`,
  :func:`softened_logit_kl`, :func:`causal_lm_cross_entropy`); :class:`LayerDistillationTrainer` weighs them
  with :class:`LayerDistillationConfig` and logs each one (``distill/ce``, ``distill/kl``, ``distill/hidden``,
  ``distill/attention``).
- A **transfer set** of unlabelled prompts (:func:`build_transfer_prompts`, :func:`generate_transfer_set`):
  the teacher answers each prompt once before training (greedy by default) and those rows join the labelled
  ones; on them the student gets the distillation terms and, weighted by ``transfer_ce_weight``, the
  cross-entropy on the teacher's own tokens (sequence-level KD), logged as ``distill/transfer_ce``.
- :func:`run_distill` (the logic of ``examples/distill.py``) loads the teacher (LoRA adapters merged), builds
  the student and the recipe's dataset, trains, and saves a plain ``AutoModelForCausalLM`` with the
  teacher's tokenizer and its gemma-rvq metadata files, so it loads and runs wherever the teacher did.

Hidden states are those transformers reports with ``output_hidden_states=True``: entry ``l + 1`` is the
output of decoder layer ``l`` (the last one after the final norm, for teacher and student alike).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from trl import SFTConfig, SFTTrainer

from ..cards import hub_reference, local_path, write_local_paths
from .sft import (
    RECIPE_FILE,
    SemanticSFTArguments,
    drop_long_examples,
    finish_hub_folder,
    load_raw_dataset,
    load_sft_dataset,
    recipe_builder_kwargs,
    resolve_token_format,
)

__all__ = [
    "CARRIED_FILES",
    "PROJECTIONS_FILE",
    "TRANSFER_COLUMN",
    "DistillArguments",
    "LayerDistillationConfig",
    "LayerDistillationTrainer",
    "attention_kl",
    "build_distill_trainer",
    "build_student",
    "build_transfer_prompts",
    "causal_lm_cross_entropy",
    "decoder_layers_name",
    "default_layer_map",
    "generate_transfer_set",
    "hidden_state_mse",
    "load_teacher",
    "run_distill",
    "save_student_metadata",
    "softened_logit_kl",
    "student_layers",
]

logger = logging.getLogger(__name__)

# gemma-rvq metadata a model folder may carry (recipe, token format): copied from the teacher to the student
CARRIED_FILES = (RECIPE_FILE, "semantic_format.json")
PROJECTIONS_FILE = "distill_projections.safetensors"
_PROJECTIONS = "distill_projections"  # attribute (and state-dict prefix) of the width projections during training
# boolean column (and batch key) marking the rows whose completion the teacher generated (the transfer set)
TRANSFER_COLUMN = "distill_transfer"


# ---------------------------------------------------------------------------------------------- losses
def _valid(mask: torch.Tensor | None, shape: tuple[int, int], device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape [B, T] = {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.bool()


def hidden_state_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                     projection: nn.Module | None = None) -> torch.Tensor:
    """Mean squared error between aligned hidden states, over valid positions and the teacher's width.

    Args:
        student: ``[B, T, Ds]`` hidden states of one student layer.
        teacher: ``[B, T, Dt]`` of the aligned teacher layer.
        mask: ``[B, T]`` (True / 1 = a real token); ``None``: every position.
        projection: maps ``Ds -> Dt`` (a learned ``nn.Linear`` when the widths differ).

    Returns:
        A scalar: ``sum over valid (b, t) of ||proj(s) - t||^2 / (n_valid * Dt)``; 0 without valid positions.
    """
    if projection is not None:
        student = projection(student)
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student.shape)} vs teacher "
                         f"{tuple(teacher.shape)} (widths differ: pass a projection)")
    valid = _valid(mask, student.shape[:2], student.device)
    squared = (student.float() - teacher.float()).pow(2).sum(-1)  # [B, T]
    count = valid.sum() * student.shape[-1]
    return (squared * valid).sum() / count.clamp(min=1)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between attention maps, per query row, averaged over valid queries and heads.

    Args:
        student: ``[B, Hs, T, T]`` attention probabilities (rows sum to 1) of one student layer.
        teacher: ``[B, Ht, T, T]`` of the aligned teacher layer. When ``Hs != Ht`` both are averaged over
            their heads first (one map per layer).
        mask: ``[B, T]`` valid tokens; padded query rows are left out (keys are masked by the models).

    Returns:
        A scalar: ``mean over (b, h, valid query q) of sum_k t log(t / s)``; key entries where the teacher
        puts no mass contribute 0.
    """
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    if student.shape != teacher.shape:
        raise ValueError(f"attention maps differ in shape: student {tuple(student.shape)} vs teacher "
                         f"{tuple(teacher.shape)}")
    student, teacher = student.float(), teacher.float()
    tiny = torch.finfo(torch.float32).tiny
    terms = torch.where(teacher > 0, teacher * (teacher.clamp_min(tiny).log() - student.clamp_min(tiny).log()),
                        torch.zeros((), device=teacher.device))
    per_query = terms.sum(-1)  # [B, H, T]
    valid = _valid(mask, (student.shape[0], student.shape[2]), student.device)[:, None, :]
    count = valid.sum() * per_query.shape[1]
    return (per_query * valid).sum() / count.clamp(min=1)


def softened_logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """Hinton's distillation term: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over valid positions.

    Args:
        student_logits / teacher_logits: ``[B, T, V]`` (the same vocabulary; extra padded rows of either are
            cut to the smaller ``V``).
        mask: ``[B, T]`` positions to count; ``None``: all.
        temperature: ``T > 0``; the ``T^2`` factor keeps gradient sizes comparable across temperatures.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student_log = F.log_softmax(student_logits[..., :vocab].float() / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits[..., :vocab].float() / temperature, dim=-1)
    per_position = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)  # [B, T]
    valid = _valid(mask, per_position.shape, per_position.device)
    return temperature**2 * (per_position * valid).sum() / valid.sum().clamp(min=1)


def causal_lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: ``logits [B, T, V]`` predict ``labels [B, T]`` shifted by one; -100 ignored.

    The mean over counted tokens (0 when there is none), as ``LlamaForCausalLM(labels=...)`` computes it.
    """
    shifted = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    counted = (shifted != -100).sum()
    total = F.cross_entropy(flat, shifted, ignore_index=-100, reduction="sum")
    return total / counted.clamp(min=1)


# ---------------------------------------------------------------------------------------------- student
def decoder_layers_name(model) -> str:
    """Dotted name of the model's decoder-layer ``nn.ModuleList`` (e.g. ``model.layers``)."""
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name.split(".")[-1] == "layers":
            return name
    raise ValueError(f"{type(model).__name__}: no ModuleList named 'layers' of num_hidden_layers={count} "
                     "decoder layers found; pass an explicit student model or config")


def student_layers(num_teacher_layers: int, stride: int) -> list[int]:
    """Teacher layers a student keeps with ``stride`` k: ``0, k, 2k, ...`` (the first layer of each block)."""
    if stride < 1 or stride > num_teacher_layers:
        raise ValueError(f"layer stride must be in [1, {num_teacher_layers}], got {stride}")
    return list(range(0, num_teacher_layers, stride))


def default_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Teacher layer aligned with each student layer: the last layer of the block student layer ``i`` replaces.

    ``round((i + 1) * L / S) - 1``: with ``L = k * S`` that is ``(i + 1) * k - 1``, and the last student layer
    always meets the last teacher layer (both after the final norm). Returns ``S`` teacher indices.
    """
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise ValueError(f"a student of {num_student_layers} layers cannot be aligned with {num_teacher_layers} "
                         "teacher layers")
    return [round((i + 1) * num_teacher_layers / num_student_layers) - 1 for i in range(num_student_layers)]


def build_student(teacher, *, layer_stride: int | None = 3, layers: list[int] | None = None):
    """A shallower copy of ``teacher`` keeping the decoder layers ``layers`` (default: every ``layer_stride``-th).

    The config is the teacher's with ``num_hidden_layers`` and every per-layer list (``layer_types``, ...)
    cut to the kept layers; embeddings, final norm, head and the kept layers' weights are copied. Returns a
    new model of the teacher's class, in the teacher's dtype, in train mode.
    """
    text_config = teacher.config.get_text_config()
    total = text_config.num_hidden_layers
    if layers is None:
        if layer_stride is None:
            raise ValueError("pass layer_stride or layers")
        layers = student_layers(total, layer_stride)
    layers = [int(i) for i in layers]
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= total:
        raise ValueError(f"layers must be increasing teacher layer indices in [0, {total}), got {layers}")
    prefix = decoder_layers_name(teacher)
    config = copy.deepcopy(teacher.config)
    student_text = config.get_text_config()
    for key, value in list(vars(student_text).items()):
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(student_text, key, [value[i] for i in layers])
    student_text.num_hidden_layers = len(layers)
    student = type(teacher)(config).to(teacher.dtype)

    position = {t: s for s, t in enumerate(layers)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for key, value in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in position:
            state[f"{prefix}.{position[int(match.group(1))]}.{match.group(2)}"] = value
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.train()


# ---------------------------------------------------------------------------------------------- config
@dataclass
class LayerDistillationConfig(SFTConfig):
    """``trl.SFTConfig`` plus the distillation weights (each loss is also logged unweighted).

    ``loss = ce_weight * CE + kl_weight * KL_T + hidden_weight * MSE + attention_weight * KL_attn``, plus
    ``transfer_ce_weight * CE_transfer`` when the data has transfer rows (then CE counts the labelled rows only,
    CE_transfer the teacher-written completions; each is the mean over its own tokens in the batch, 0 without).
    """

    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the usual next-token cross-entropy."})
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of the softened-logit KL (times T^2)."})
    hidden_weight: float = field(default=1.0, metadata={"help": "Weight of the hidden-state MSE on aligned layers."})
    attention_weight: float = field(
        default=1.0, metadata={"help": "Weight of the attention-map KL on aligned layers (needs eager attention)."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T of the logit KL."})
    distill_completion_only: bool = field(
        default=False,
        metadata={"help": "Compute the KL / hidden / attention terms only where the labels count (the completion). "
                          "Default: every real token, prompts included (the teacher knows them too)."})
    transfer_ce_weight: float = field(
        default=1.0,
        metadata={"help": "Transfer set: weight of the cross-entropy on the teacher's own completions of the "
                          "unlabelled prompts (sequence-level KD); 0: those rows get the distillation terms only."})
    transfer_max_new_tokens: int = field(
        default=128, metadata={"help": "Transfer set: the most tokens the teacher writes per prompt."})
    transfer_batch_size: int = field(
        default=16, metadata={"help": "Transfer set: prompts per teacher generate() call."})
    transfer_do_sample: bool = field(
        default=False, metadata={"help": "Transfer set: sample the teacher's answers (its generation_config) "
                                         "instead of greedy decoding."})

    def __post_init__(self):
        super().__post_init__()
        if self.transfer_max_new_tokens < 1 or self.transfer_batch_size < 1:
            raise ValueError("transfer_max_new_tokens and transfer_batch_size must be >= 1, got "
                             f"{self.transfer_max_new_tokens} and {self.transfer_batch_size}")
        for name in ("ce_weight", "kl_weight", "hidden_weight", "attention_weight", "transfer_ce_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


# ---------------------------------------------------------------------------------------------- trainer
class _TransferFlagCollator:
    """Wraps TRL's collator: adds ``distill_transfer`` (``[B]`` bool, False for rows without the column)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        flags = [bool(example.get(TRANSFER_COLUMN, False)) for example in examples]
        batch = self.collator([{k: v for k, v in example.items() if k != TRANSFER_COLUMN} for example in examples])
        batch[TRANSFER_COLUMN] = torch.tensor(flags, dtype=torch.bool)
        return batch


class LayerDistillationTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the weighted sum of CE, softened-logit KL, hidden MSE and attention KL.

    Args:
        model: the student (a ``PreTrainedModel``; trained in full).
        teacher_model: the teacher (frozen, eval mode; prepared on the same device / DeepSpeed engine).
        layer_map: teacher layer index for each student layer (default :func:`default_layer_map`).
        Everything else as ``trl.SFTTrainer``; ``args`` is a :class:`LayerDistillationConfig`.

    When the hidden widths differ, one learned ``nn.Linear(Ds, Dt)`` per aligned layer is trained with the
    student (attached as ``model.distill_projections``); it is saved beside the student as
    ``distill_projections.safetensors``, never inside it.
    """

    def __init__(self, model, teacher_model, args: LayerDistillationConfig, *, layer_map: list[int] | None = None,
                 **kwargs: Any):
        if not isinstance(args, LayerDistillationConfig):
            raise ValueError(f"args must be a LayerDistillationConfig, got {type(args).__name__}")
        if isinstance(model, str) or isinstance(teacher_model, str):
            raise ValueError("pass loaded models (see gemma_rvq.recipes.distill.load_teacher / build_student)")
        student_text = model.config.get_text_config()
        teacher_text = teacher_model.config.get_text_config()
        s_layers, t_layers = student_text.num_hidden_layers, teacher_text.num_hidden_layers
        self.layer_map = list(layer_map) if layer_map is not None else default_layer_map(s_layers, t_layers)
        if len(self.layer_map) != s_layers or not all(0 <= t < t_layers for t in self.layer_map):
            raise ValueError(f"layer_map must give one teacher layer in [0, {t_layers}) for each of the {s_layers} "
                             f"student layers, got {self.layer_map}")
        s_vocab, t_vocab = model.get_output_embeddings().weight.shape[0], \
            teacher_model.get_output_embeddings().weight.shape[0]
        tokenizer = kwargs.get("processing_class")
        if tokenizer is not None and min(s_vocab, t_vocab) < len(tokenizer):
            raise ValueError(f"the student ({s_vocab}) and teacher ({t_vocab}) heads must both cover the tokenizer's "
                             f"{len(tokenizer)} tokens")
        if args.attention_weight > 0:
            for which, net in (("student", model), ("teacher", teacher_model)):
                if net.config._attn_implementation != "eager":
                    logger.info("attention-map distillation: switching the %s to eager attention", which)
                    net.set_attn_implementation("eager")
        if args.hidden_weight > 0 and student_text.hidden_size != teacher_text.hidden_size:
            setattr(model, _PROJECTIONS, nn.ModuleList(
                nn.Linear(student_text.hidden_size, teacher_text.hidden_size, bias=False) for _ in self.layer_map
            ).to(dtype=next(model.parameters()).dtype))
        train_dataset = kwargs.get("train_dataset")
        columns = getattr(train_dataset, "column_names", None) or []
        self.has_transfer_rows = TRANSFER_COLUMN in columns
        if self.has_transfer_rows and (args.packing or args.padding_free):
            raise ValueError("a transfer set cannot be packed (packing / padding_free): packed sequences lose the "
                             f"{TRANSFER_COLUMN!r} flag that keeps the teacher's completions apart")
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: the Trainer averages accumulation
        if self.has_transfer_rows:
            self.data_collator = _TransferFlagCollator(self.data_collator)
        teacher_model.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if TRANSFER_COLUMN not in self._signature_columns:  # kept through remove_unused_columns
            self._signature_columns = [*self._signature_columns, TRANSFER_COLUMN]

    # ------------------------------------------------------------------ loss
    def _log_mean(self, mode: str, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        """Log ``sum(total) / sum(count)`` over processes; nothing when no process counted a token."""
        gathered = self.accelerator.gather(torch.stack([total.detach().float(), count.float()])[None])
        gathered = gathered.reshape(-1, 2).sum(0)
        if gathered[1] > 0:
            self._metrics[mode][f"distill/{name}"].append((gathered[0] / gathered[1]).item())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        want = {"use_cache": False, "output_hidden_states": args.hidden_weight > 0,
                "output_attentions": args.attention_weight > 0}
        outputs = model(**model_inputs, **want)
        if args.kl_weight > 0 or args.hidden_weight > 0 or args.attention_weight > 0:
            with torch.no_grad():
                teacher = self.teacher_model(**model_inputs, **want)
        # else: cross-entropy only (a baseline, or fine-tuning the teacher itself): no teacher forward pass

        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
        mask = mask.bool()
        if args.distill_completion_only:
            # position t predicts token t + 1: count it when that token is a label
            mask = mask & F.pad(labels[:, 1:] != -100, (0, 1), value=False)

        token_means: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # CE terms: (mean, counted tokens)
        if self.has_transfer_rows:
            transfer = inputs.get(TRANSFER_COLUMN)
            transfer = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device) if transfer is None \
                else transfer.bool()
            for name, rows in (("ce", ~transfer), ("transfer_ce", transfer)):
                token_means[name] = (causal_lm_cross_entropy(outputs.logits[rows], labels[rows]),
                                     (labels[rows][:, 1:] != -100).sum())
            parts = {name: mean for name, (mean, _) in token_means.items()}
        else:
            parts = {"ce": causal_lm_cross_entropy(outputs.logits, labels)}
        if args.kl_weight > 0:
            parts["kl"] = softened_logit_kl(outputs.logits, teacher.logits, mask, args.temperature)
        if args.hidden_weight > 0:
            projections = getattr(self.accelerator.unwrap_model(model), _PROJECTIONS, None)
            parts["hidden"] = torch.stack([
                hidden_state_mse(outputs.hidden_states[s + 1], teacher.hidden_states[t + 1], mask,
                                 projections[s] if projections is not None else None)
                for s, t in enumerate(self.layer_map)
            ]).mean()
        if args.attention_weight > 0:
            parts["attention"] = torch.stack([
                attention_kl(outputs.attentions[s], teacher.attentions[t], mask)
                for s, t in enumerate(self.layer_map)
            ]).mean()
        weights = {"ce": args.ce_weight, "kl": args.kl_weight, "hidden": args.hidden_weight,
                   "attention": args.attention_weight, "transfer_ce": args.transfer_ce_weight}
        loss = sum(weights[name] * value for name, value in parts.items())
        for name, value in parts.items():
            if name in token_means:  # a mean over the tokens of its rows, which a batch may lack
                mean, count = token_means[name]
                self._log_mean(mode, name, mean * count, count)
            else:
                self._metrics[mode][f"distill/{name}"].append(self.accelerator.gather_for_metrics(
                    value.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict=None):
        """Save the student as a plain model (the width projections go to their own file)."""
        output_dir = output_dir or self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        projections = {k[len(_PROJECTIONS) + 1:]: v for k, v in state_dict.items() if k.startswith(_PROJECTIONS + ".")}
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_PROJECTIONS + ".")}
        super()._save(output_dir, state_dict=state_dict)
        if projections and self.args.should_save:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in projections.items()},
                      os.path.join(output_dir, PROJECTIONS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJECTIONS_FILE)
        projections = getattr(self.accelerator.unwrap_model(model or self.model), _PROJECTIONS, None)
        if projections is not None and os.path.isfile(path):
            from safetensors.torch import load_file

            projections.load_state_dict(load_file(path))


# ---------------------------------------------------------------------------------------------- script
@dataclass
class DistillArguments(SemanticSFTArguments):
    """Script arguments of ``examples/distill.py``: the teacher, the student, and the data (as ``examples/sft.py``)."""

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher: a causal LM folder / Hub id with the semantic tokens, e.g. a "
                                        "stage-2/3 model; a LoRA adapter folder saved by examples/sft.py is merged."})
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "An existing student model (same tokenizer). Default: built from the "
                                        "teacher (layer_stride / student_layers)."})
    student_config: str | None = field(
        default=None, metadata={"help": "A config.json (folder or file) for a randomly initialised student of any "
                                        "width/depth (same vocabulary)."})
    layer_stride: int = field(default=3, metadata={"help": "Keep every k-th teacher layer (0, k, 2k, ...)."})
    student_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit teacher layers to keep (overrides layer_stride)."})
    layer_map: list[int] | None = field(
        default=None, metadata={"help": "Teacher layer aligned with each student layer (default: the last layer "
                                        "of the block each student layer replaces)."})
    transfer_dataset_name: str | None = field(
        default=None,
        metadata={"help": "A transfer set of unlabelled prompts (Hub id, save_to_disk folder or data file) that the "
                          "teacher answers before training: rows in the recipe's form without the answer column "
                          "(e.g. only semantic_tokens for speech_instruct), or a TRL prompt-only 'prompt' column."})
    transfer_dataset_config: str | None = field(
        default=None, metadata={"help": "The transfer dataset's config name (load_dataset's name)."})
    transfer_split: str = field(default="train", metadata={"help": "The transfer dataset's split."})
    max_transfer_samples: int | None = field(
        default=None, metadata={"help": "Use the first N transfer prompts."})


def load_teacher(path: str, **from_pretrained_kwargs: Any):
    """``(model, tokenizer)`` of a teacher folder; a LoRA adapter saved by ``examples/sft.py`` is merged."""
    from .sft import load_sft_model

    model, tokenizer = load_sft_model(path, **from_pretrained_kwargs)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def _teacher_format(script_args: DistillArguments):
    """The teacher folder's own format (``semantic_format.json`` or the recipe file), else the arguments'."""
    folder = script_args.teacher_model_name_or_path
    for name, key in (("semantic_format.json", None), (RECIPE_FILE, "token_format")):
        path = os.path.join(folder, name) if folder and os.path.isdir(folder) else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            data = data.get(key) if key else data.get("token_format", data)
            if isinstance(data, dict):
                try:
                    return resolve_token_format(data)
                except (TypeError, ValueError) as err:
                    logger.warning("%s: cannot read a token format (%s); trying the next source", path, err)
    return resolve_token_format(script_args.token_format, script_args.codebook_size, script_args.num_levels)


def _load_student(script_args: DistillArguments, teacher, tokenizer, training_args):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"dtype": teacher.dtype}
    if training_args.attention_weight > 0:
        kwargs["attn_implementation"] = "eager"
    if script_args.student_model_name_or_path:
        student = AutoModelForCausalLM.from_pretrained(script_args.student_model_name_or_path, **kwargs)
    elif script_args.student_config:
        config = AutoConfig.from_pretrained(script_args.student_config)
        student = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        return build_student(teacher, layer_stride=script_args.layer_stride, layers=script_args.student_layers)
    rows = student.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ValueError(f"the student's embeddings have {rows} rows, the teacher's tokenizer {len(tokenizer)} "
                         "tokens: the student must share the teacher's vocabulary")
    return student


# ---------------------------------------------------------------------------------------------- transfer set
# the column a recipe's builder turns into the completion: the one a transfer row does not need
_ANSWER_ARGUMENT = {"speech_instruct": "response_column", "asr": "text_column", "speechless": "tokens_column"}
_PLACEHOLDER = "<transfer prompt: the teacher writes the answer>"


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def build_transfer_prompts(script_args: DistillArguments, dataset, token_format=None):
    """The prompts of a transfer set, as a ``datasets.Dataset`` with one TRL prompt-only ``prompt`` column.

    ``dataset`` (a ``Dataset``, or a ``DatasetDict`` holding ``script_args.transfer_split``) holds either a
    ``prompt`` column (TRL prompt-only form: a list of chat messages or a plain string) or the recipe's input
    columns without the answer (``speech_instruct``: the ``tokens_column``; ``asr``: the tokens;
    ``speechless``: the text), from which the recipe builds exactly the prompts of its labelled rows (system
    prompt, user template, chat). An answer column, if present, is ignored: the teacher writes the answers.

    Raises ``ValueError`` for an empty set and, naming the row, for a prompt that is empty or already holds an
    assistant turn.
    """
    from datasets import Dataset, DatasetDict

    from .data import build_recipe_dataset

    if isinstance(dataset, DatasetDict):
        if script_args.transfer_split not in dataset:
            raise ValueError(f"transfer split {script_args.transfer_split!r} not found; available: {list(dataset)}")
        dataset = dataset[script_args.transfer_split]
    if not isinstance(dataset, Dataset):
        raise ValueError(f"the transfer set must be a datasets.Dataset (not streamed), got {type(dataset).__name__}")
    if script_args.max_transfer_samples is not None:
        dataset = dataset.select(range(min(script_args.max_transfer_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"the transfer set {script_args.transfer_dataset_name or ''!r} has no rows: give unlabelled "
                         "prompts, or leave transfer_dataset_name unset")
    if "prompt" in dataset.column_names or "messages" in dataset.column_names:
        column = "prompt" if "prompt" in dataset.column_names else "messages"
        prompts = dataset[column]
    else:
        if script_args.recipe not in _ANSWER_ARGUMENT:
            raise ValueError(f"the {script_args.recipe!r} recipe has no prompts to answer: give the transfer set a "
                             "'prompt' column")
        answer = getattr(script_args, _ANSWER_ARGUMENT[script_args.recipe])
        if answer in dataset.column_names:
            logger.warning("transfer set: its %r column is ignored; the teacher writes the answers", answer)
            dataset = dataset.remove_columns(answer)
        dataset = dataset.add_column(answer, [_PLACEHOLDER] * len(dataset))
        kwargs = recipe_builder_kwargs(script_args, token_format)
        if script_args.recipe == "speechless":
            kwargs["token_format"] = None  # the placeholder is the (missing) token string: nothing to parse
        built = build_recipe_dataset(script_args.recipe, dataset, **kwargs)
        prompts = built["prompt"] if "prompt" in built.column_names else [m[:-1] for m in built["messages"]]
        column = "prompt"
    for index, prompt in enumerate(prompts):
        if _is_conversation(prompt):
            roles = [message["role"] for message in prompt]
            if "assistant" in roles:
                raise ValueError(f"transfer row {index}: its {column!r} already holds an assistant turn (roles "
                                 f"{roles}); a transfer prompt ends before the answer, which the teacher writes")
            if not prompt:
                raise ValueError(f"transfer row {index}: its {column!r} is an empty conversation")
        elif not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"transfer row {index}: {column!r} must be a non-empty string or a list of chat "
                             f"messages, got {prompt!r}")
    return Dataset.from_dict({"prompt": prompts})


def _prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as TRL tokenises it (chat template with the generation prompt, or plain text)."""
    if _is_conversation(prompt):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


@torch.no_grad()
def generate_transfer_set(teacher, tokenizer, prompts, *, max_new_tokens: int = 128, batch_size: int = 16,
                          max_length: int | None = None, do_sample: bool = False, show_progress: bool = True):
    """The teacher's answers to ``prompts``: a ``Dataset`` of ``prompt``, ``completion`` and ``distill_transfer``.

    Args:
        teacher: a causal LM (run in eval mode, without gradients, on its own device).
        prompts: a ``Dataset`` with a ``prompt`` column (:func:`build_transfer_prompts`) or a list of prompts
            (chat message lists or strings).
        max_new_tokens: the most tokens generated per prompt; an answer cut there is kept and counted in a
            warning (raise it if that happens often).
        batch_size: prompts per ``generate`` call (left-padded).
        max_length: the training ``max_length``: a prompt of that many tokens or more is an error naming the row.
        do_sample: sample (with the teacher's ``generation_config``) instead of greedy decoding.

    Each completion is the decoded text of the generated tokens up to the end of turn (special tokens dropped,
    stripped), as a chat ``assistant`` message for chat prompts or a string for plain ones; an empty answer (the
    teacher ends its turn at once) is kept and counted in a warning. ``distill_transfer`` is True on every row,
    in the order of ``prompts``.
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    prompts = list(prompts["prompt"]) if isinstance(prompts, Dataset) else list(prompts)
    if not prompts:
        raise ValueError("the transfer set has no prompts")
    encoded = [_prompt_ids(tokenizer, prompt) for prompt in prompts]
    if max_length is not None:
        for index, ids in enumerate(encoded):
            if len(ids) >= max_length:
                raise ValueError(f"transfer row {index}: its prompt is {len(ids)} tokens, max_length is {max_length}: "
                                 "no room for an answer (shorten the prompt or raise max_length)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    completions: list[str] = []
    cut = 0
    progress = tqdm(total=len(prompts), desc="Teacher answering the transfer prompts", disable=not show_progress)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, row in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[b, width - len(row):] = torch.tensor(row)
            mask[b, width - len(row):] = 1
        output = teacher.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=do_sample,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad)
        new = output[:, width:].cpu()
        stops = teacher.generation_config.eos_token_id
        stops = set(stops if isinstance(stops, list) else [stops] if stops is not None else [tokenizer.eos_token_id])
        for row in new.tolist():
            cut += len(row) == max_new_tokens and not stops & set(row)
            completions.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        progress.update(len(chunk))
    progress.close()
    teacher.train(was_training)
    if cut:
        logger.warning("transfer set: %d of %d teacher answers reached transfer_max_new_tokens=%d without ending",
                       cut, len(prompts), max_new_tokens)
    empty = sum(not c for c in completions)
    if empty:
        logger.warning("transfer set: the teacher ended its turn at once on %d of %d prompts (an empty answer is "
                       "kept: it is what the teacher does)", empty, len(prompts))
    return Dataset.from_dict({
        "prompt": prompts,
        "completion": [[{"role": "assistant", "content": c}] if _is_conversation(p) else c
                       for p, c in zip(prompts, completions, strict=True)],
        TRANSFER_COLUMN: [True] * len(prompts)})


def _join_transfer_rows(train, transfer):
    """The labelled rows (``distill_transfer`` False) followed by the transfer rows, in the labelled rows' form."""
    from datasets import Dataset, concatenate_datasets

    if not isinstance(train, Dataset):
        raise ValueError("a transfer set needs a labelled dataset that is not streamed (dataset_streaming: false)")
    columns = set(train.column_names)
    if "messages" in columns:
        joined = {"messages": [p + c for p, c in zip(transfer["prompt"], transfer["completion"], strict=True)]}
        if not _is_conversation(joined["messages"][0]):
            raise ValueError("the labelled rows are chat 'messages' but the transfer prompts are plain text")
        transfer = Dataset.from_dict({**joined, TRANSFER_COLUMN: transfer[TRANSFER_COLUMN]})
    elif "prompt" in columns:
        if _is_conversation(train[0]["prompt"]) != _is_conversation(transfer[0]["prompt"]):
            raise ValueError("the labelled prompts and the transfer prompts differ in kind (chat messages vs plain "
                             "text): build both with the same recipe")
    else:
        raise ValueError(f"a transfer set needs prompt/completion or messages rows; the labelled rows have {columns}")
    keep = [c for c in train.column_names if c in transfer.column_names]
    train = train.select_columns(keep).add_column(TRANSFER_COLUMN, [False] * len(train))
    transfer = transfer.select_columns([*keep, TRANSFER_COLUMN]).cast(train.features)
    return concatenate_datasets([train, transfer])


def build_distill_trainer(script_args: DistillArguments, training_args: LayerDistillationConfig, *,
                          teacher=None, tokenizer=None, student=None, train_dataset=None, eval_dataset=None,
                          transfer_dataset=None):
    """Everything up to ``trainer.train()``: the teacher, the student, the recipe's data, the trainer.

    ``transfer_dataset`` (or ``script_args.transfer_dataset_name``): unlabelled prompts
    (:func:`build_transfer_prompts`) that the teacher answers now (:func:`generate_transfer_set`); those rows
    are appended to the labelled training rows and shuffled with them.
    """
    if teacher is None:
        if not script_args.teacher_model_name_or_path:
            raise ValueError("teacher_model_name_or_path is required")
        kwargs = {"attn_implementation": "eager"} if training_args.attention_weight > 0 else {}
        teacher, tokenizer = load_teacher(script_args.teacher_model_name_or_path, **kwargs)
    elif tokenizer is None:
        raise ValueError("pass the teacher's tokenizer with the teacher")
    fmt = _teacher_format(script_args)
    missing = [t for t in fmt.vocabulary() if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"the teacher's tokenizer lacks {len(missing)} of the {len(fmt.vocabulary())} tokens of "
                         f"format {fmt.name!r} (e.g. {missing[0]!r}): distil a model trained on this format")
    if student is None:
        student = _load_student(script_args, teacher, tokenizer, training_args)
    training_args.model_init_kwargs = None
    if train_dataset is None:
        train_dataset, loaded_eval = load_sft_dataset(script_args, fmt)
        eval_dataset = eval_dataset if eval_dataset is not None else loaded_eval
    if training_args.eval_strategy == "no":
        eval_dataset = None
    if transfer_dataset is None and script_args.transfer_dataset_name:
        transfer_dataset = load_raw_dataset(script_args.transfer_dataset_name,
                                            dataset_config=script_args.transfer_dataset_config)
    transfer_rows = 0
    if transfer_dataset is not None:
        prompts = build_transfer_prompts(script_args, transfer_dataset, fmt)
        if not getattr(teacher, "hf_device_map", None):
            teacher.to(training_args.device)
        generated = generate_transfer_set(
            teacher, tokenizer, prompts, max_new_tokens=training_args.transfer_max_new_tokens,
            batch_size=training_args.transfer_batch_size, max_length=training_args.max_length,
            do_sample=training_args.transfer_do_sample,
            show_progress=not training_args.disable_tqdm and training_args.process_index == 0)
        transfer_rows = len(generated)
        train_dataset = _join_transfer_rows(train_dataset, generated)
    if script_args.drop_long_examples and training_args.max_length is not None and not training_args.packing:
        train_dataset = drop_long_examples(train_dataset, tokenizer, training_args.max_length)
        if eval_dataset is not None:
            eval_dataset = drop_long_examples(eval_dataset, tokenizer, training_args.max_length)
    if script_args.recipe == "speech_instruct" and script_args.instruct_output == "messages":
        training_args.assistant_only_loss = True
    trainer = LayerDistillationTrainer(student, teacher, training_args, layer_map=script_args.layer_map,
                                       train_dataset=train_dataset, eval_dataset=eval_dataset,
                                       processing_class=tokenizer)
    trainer.gemma_rvq_distill = {"teacher": script_args.teacher_model_name_or_path, "layer_map": trainer.layer_map,
                                 "student_layers": script_args.student_layers or (
                                     None if script_args.student_model_name_or_path or script_args.student_config
                                     else student_layers(teacher.config.get_text_config().num_hidden_layers,
                                                         script_args.layer_stride)),
                                 "token_format": fmt.to_dict(),
                                 "transfer_set": script_args.transfer_dataset_name, "transfer_rows": transfer_rows}
    return trainer


def save_student_metadata(trainer, output_dir: str) -> None:
    """Copy the teacher folder's gemma-rvq files next to the student (the recipe file rewritten for a full model)."""
    if not trainer.accelerator.is_main_process:
        return
    info = trainer.gemma_rvq_distill
    teacher_dir = info["teacher"]
    os.makedirs(output_dir, exist_ok=True)
    for name in CARRIED_FILES:
        source = os.path.join(teacher_dir, name) if teacher_dir and os.path.isdir(teacher_dir) else None
        if source and os.path.isfile(source) and name != RECIPE_FILE:
            shutil.copyfile(source, os.path.join(output_dir, name))
    recipe: dict[str, Any] = {}
    source = os.path.join(teacher_dir, RECIPE_FILE) if teacher_dir and os.path.isdir(teacher_dir) else None
    if source and os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            recipe = json.load(handle)
    tokenizer = trainer.processing_class
    teacher = hub_reference(teacher_dir)  # the card and recipe name the teacher by Hub id or name, never by path
    recipe.update({"token_format": info["token_format"], "peft": False, "vocab_size": len(tokenizer),
                   "embedding_rows": trainer.accelerator.unwrap_model(trainer.model).get_input_embeddings()
                   .num_embeddings, "base_model": teacher.id, "base_model_name": teacher.name,
                   "model_id": trainer.args.hub_model_id,
                   "distillation": {"teacher": teacher.name, "layer_map": info["layer_map"],
                                    "student_layers": info["student_layers"],
                                    **({"transfer_set": hub_reference(info["transfer_set"]).name
                                        if info["transfer_set"] else None, "transfer_rows": info["transfer_rows"]}
                                       if info["transfer_rows"] else {})}})
    with open(os.path.join(output_dir, RECIPE_FILE), "w", encoding="utf-8") as handle:
        json.dump(recipe, handle, indent=2)
    local = {"base_model": os.path.abspath(teacher_dir)} if teacher.id is None and os.path.isdir(teacher_dir) else {}
    speech = local_path(teacher_dir, "speech_tokenizer") if teacher_dir and os.path.isdir(teacher_dir) else None
    write_local_paths(output_dir, {**local, **({"speech_tokenizer": speech} if speech else {})})


def run_distill(script_args: DistillArguments, training_args: LayerDistillationConfig, **kwargs: Any):
    """Build the trainer, train, save the student (plain model + tokenizer + metadata files). Returns the trainer."""
    trainer = build_distill_trainer(script_args, training_args, **kwargs)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    save_student_metadata(trainer, training_args.output_dir)
    finish_hub_folder(trainer, training_args.output_dir, dataset_name=script_args.dataset_name)  # card, push
    return trainer
