"""Stage-1 trainer: fits a ``GemmaRVQModel``'s projections and codebooks on cached frame embeddings.

One optimiser step = one batch of ``batch_size`` frames per process from a :class:`FrameStream`:

* loss = ``GemmaRVQModel.forward``'s (``mse_weight * MSE + cosine_weight * (1 - cos) +
  commitment_weight * commitment``, weights from the model config);
* AdamW on the out-projection (the in-projection too when ``train_in_projection``; the codebooks when
  ``codebook_type="learnable"``), warmup + cosine decay
  (``transformers.get_scheduler``), gradient clipping; EMA codebooks update themselves inside forward
  (their statistics are all-reduced across processes by the quantizer);
* before step 1: :func:`initialize_from_sample` (identity/PCA in-projection, k-means codebooks,
  least-squares out-projection); every ``dead_code_restart_steps``: dead codes re-seeded from the
  current batch's (held-in) residuals;
* every ``eval_steps``: :func:`gemma_rvq.evaluation.evaluate_frames` on the dev cache; ``best``
  (lowest dev MSE) is saved; every ``save_steps``: a checkpoint (accelerate state + stream position +
  weights); at the end ``final`` and ``averaged`` (mean of the last ``average_last_n`` checkpoints).

Multi-GPU: run under ``accelerate launch``. Each process reads its own batches from the stream (global
batch ``i`` goes to process ``i % world_size``); k-means init runs on every process on the same sample
and rank 0's result is broadcast; dead-code restarts broadcast rank 0's codebooks; evaluation and
saving happen on the main process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

# evaluate_frames and metric_plots live in gemma_rvq.evaluation; imported here they stay importable from
# gemma_rvq.training.trainer, their old home
from ..evaluation import evaluate_frames, metric_plots
from .averaging import average_checkpoints
from .cache import EmbeddingCache, FrameStream
from .config import RVQTrainingConfig
from .run_folder import claim_output_dir

STATE_NAME = "trainer_state.json"
QUANTIZER_STATE_DIR = "quantizer_state"

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- init


def _broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every process (no-op without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def _device(model: nn.Module) -> torch.device:
    return next(model.quantizer.buffers(), model.quantizer.codebooks).device


def _reset_layer_norm(norm: nn.Module) -> None:
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        norm.weight.data.fill_(1.0)
        if norm.bias is not None:
            norm.bias.data.zero_()


@torch.no_grad()
def initialize_from_sample(model: nn.Module, sample: torch.Tensor, *, num_iters: int = 20, seed: int = 0,
                           ridge: float = 1e-4, batch_size: int | None = None,
                           seeding: str = "kmeans++") -> dict[str, float]:
    """Data-driven init of a ``GemmaRVQModel`` from a sample of frames ``[N, D]``.

    1. ``in_norm`` = plain LayerNorm (weight 1, bias 0); ``in_proj`` = identity when ``codebook_dim ==
       dim``, else the top-``Dc`` principal directions of the normalised sample (centred). The projected
       space is then the (normalised) encoder space itself, so k-means distances there are meaningful;
       a random in-projection would make the codebooks fit a random linear image of the data.
    2. ``quantizer.kmeans_init`` on the projected sample (level by level on residuals), seeded by
       ``seeding`` (``"kmeans++"`` or ``"random"``, see :func:`gemma_rvq.quantization.kmeans`).
    3. ``out_norm`` = plain LayerNorm; ``out_proj`` = the ridge least-squares map from
       ``out_norm(k-means reconstruction)`` back to the raw frames. LayerNorm discards each frame's mean
       and scale; this fit restores the average scale and offset (the "inverse scale" of step 1) and is
       the best linear read-out given the initial codes.

    Returns ``{"init_mse", "init_fvu"}`` of the initialised model on the sample (encoder space).
    """
    cfg = model.config
    x = sample.to(device=_device(model), dtype=torch.float32)
    if cfg.use_projection:
        _reset_layer_norm(model.in_norm)
        _reset_layer_norm(model.out_norm)
        h = model.in_norm(x)
        w = model.in_proj.weight
        if w.shape[0] == w.shape[1]:
            w.copy_(torch.eye(w.shape[0], dtype=w.dtype, device=w.device))
            if model.in_proj.bias is not None:
                model.in_proj.bias.zero_()
        else:
            mu = h.double().mean(0)
            cov = torch.cov((h.double() - mu).T) if h.shape[0] > 1 else torch.eye(h.shape[1], dtype=torch.float64)
            _, vecs = torch.linalg.eigh(cov.cpu())
            top = vecs[:, -w.shape[0]:].flip(-1).T.to(w.device)  # [Dc, D], largest variance first
            w.copy_(top.to(w.dtype))
            if model.in_proj.bias is not None:
                model.in_proj.bias.copy_((-(top @ mu.to(top.device))).to(w.dtype))
    z = model.project_in(x).float()
    quantizer = model.quantizer
    quantizer.kmeans_init(z, num_iters=num_iters, seed=seed, init=seeding)
    codes = quantizer.encode(z)
    if batch_size and quantizer.codebook_type == "ema":
        # Warm EMA statistics: each code's expected count per training batch (from its k-means cluster),
        # instead of 1. Otherwise every cluster size starts at the dead-code threshold and the first
        # restarts re-seed hundreds of healthy codes while the EMA is still warming up.
        quantizer.set_cluster_sizes(quantizer.code_counts(codes).float() * (batch_size / codes.shape[0]))
    zq = quantizer.decode(codes).float()
    if cfg.use_projection:
        hq = model.out_norm(zq).double().cpu()
        a = torch.cat([hq, torch.ones(hq.shape[0], 1, dtype=torch.float64)], dim=1)  # [N, Dc + 1]
        gram = a.T @ a
        gram.diagonal().add_(ridge * gram.diagonal().mean())
        sol = torch.linalg.solve(gram, a.T @ x.double().cpu())  # [Dc + 1, D]
        model.out_proj.weight.copy_(sol[:-1].T.to(model.out_proj.weight))
        if model.out_proj.bias is not None:
            model.out_proj.bias.copy_(sol[-1].to(model.out_proj.bias))
    recon = model.project_out(model.quantizer.decode(model.quantizer.encode(model.project_in(x).float())))
    err = (recon.float() - x).pow(2)
    _broadcast_module(model)
    return {"init_mse": float(err.mean()), "init_fvu": float(err.sum() / (x - x.mean(0)).pow(2).sum())}


# ---------------------------------------------------------------------------------------------- state


@dataclass
class TrainerState:
    step: int = 0
    stream: dict[str, int] = field(default_factory=dict)
    best_dev_mse: float = math.inf
    best_step: int = -1
    init_metrics: dict[str, float] = field(default_factory=dict)
    train_log: list[dict[str, float]] = field(default_factory=list)
    eval_log: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    dead_codes_restarted: int = 0

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.__dict__, f, indent=1, default=float)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> TrainerState:
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-<step>`` folder of a run (complete = has trainer_state.json)."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = [d for d in os.listdir(root) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()
            and os.path.exists(os.path.join(root, d, STATE_NAME))]
    if not done:
        return None
    return os.path.join(root, max(done, key=lambda d: int(d.split("-")[-1])))


# ---------------------------------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    """Where the exported models are and how they score (dev metrics of each folder)."""

    output_dir: str
    steps: int
    folders: dict[str, str]
    metrics: dict[str, dict[str, Any]]
    init_metrics: dict[str, float]
    completed: bool = True
    best_step: int | None = None  # the step whose weights `best` holds (the evaluation with the lowest dev MSE)


class RVQTrainer:
    """Trains ``model`` on a training :class:`EmbeddingCache`, evaluates on a dev one.

    Args:
        model: a ``GemmaRVQModel`` (its encoder, if any, is frozen and never called here).
        config: the run configuration.
        train_cache, dev_cache: finalized caches of the same encoder (dev may be None: no evaluation,
            ``best`` is then the final model).
        accelerator: an ``accelerate.Accelerator`` (built from ``config`` when None).
    """

    def __init__(self, model: nn.Module, config: RVQTrainingConfig, train_cache: EmbeddingCache,
                 dev_cache: EmbeddingCache | None = None, *, accelerator: Any | None = None) -> None:
        if train_cache.dim != model.config.dim:
            raise ValueError(f"the training cache holds {train_cache.dim}-d frames, the model expects "
                             f"dim={model.config.dim}")
        if dev_cache is not None and dev_cache.dim != train_cache.dim:
            raise ValueError(f"dev cache dim {dev_cache.dim} != train cache dim {train_cache.dim}")
        self.config = config
        self.model = model
        self.train_cache, self.dev_cache = train_cache, dev_cache
        self.accelerator = accelerator if accelerator is not None else make_accelerator(config)
        self.output_dir = config.output_dir
        self._dev_frames: torch.Tensor | None = None
        self._train_eval_frames: torch.Tensor | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def _unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        encoder = getattr(model, "encoder", None)
        frozen = {id(p) for p in encoder.parameters()} if isinstance(encoder, nn.Module) else set()
        if not self.config.train_in_projection:
            # EMA codebooks live in the in-projection's output space: moving it shifts every code at once
            frozen |= {id(p) for name in ("in_norm", "in_proj") for p in getattr(model, name).parameters()}
        params = []
        for p in model.parameters():
            if id(p) in frozen:
                p.requires_grad_(False)
            elif p.requires_grad:
                params.append(p)
        return params

    def _dev(self) -> torch.Tensor | None:
        if self.dev_cache is None:
            return None
        if self._dev_frames is None:
            self._dev_frames = self.dev_cache.sample_frames(self.config.eval_max_frames, seed=self.config.seed)
        return self._dev_frames

    def _train_eval(self) -> torch.Tensor | None:
        if self.config.eval_train_frames <= 0:
            return None
        if self._train_eval_frames is None:
            self._train_eval_frames = self.train_cache.sample_frames(self.config.eval_train_frames,
                                                                     seed=self.config.seed + 1)
        return self._train_eval_frames

    def evaluate(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Dev metrics (``dev/...``) and, with ``eval_train_frames``, held-in ones (``train/...``)."""
        model = model if model is not None else self._unwrapped
        out: dict[str, Any] = {}
        for split, frames in (("dev", self._dev()), ("train", self._train_eval())):
            if frames is not None:
                out[split] = evaluate_frames(model, frames)
        return out

    def _save_model(self, folder: str, model: nn.Module | None = None, extra: dict[str, Any] | None = None) -> None:
        model = model if model is not None else self._unwrapped
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        _write_hub_ready_config(self.config, os.path.join(folder, "training_config.yaml"))
        extra = dict(extra or {})
        metrics = extra.get("metrics") or {}
        split = "dev" if "dev" in metrics else "train" if "train" in metrics else None
        if split is not None and self.config.make_plots:
            metric_plots(folder, metrics[split])
        extra["metrics"] = _jsonable(metrics, counts=True)  # the card and the report plot these counts
        info = {"train_data": summarize_cache(self.train_cache),
                "dev_data": summarize_cache(self.dev_cache) if self.dev_cache else None, **extra}
        with open(os.path.join(folder, "training_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1, default=float)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, state: TrainerState, stream: FrameStream) -> None:
        acc = self.accelerator
        folder = os.path.join(self.output_dir, "checkpoints", f"checkpoint-{state.step}")
        acc.wait_for_everyone()
        acc.save_state(os.path.join(folder, "accelerate"))
        quantizer_state = self._unwrapped.quantizer.training_state()
        if quantizer_state:  # per process (learnable usage counts are local until a restart reduces them)
            os.makedirs(os.path.join(folder, QUANTIZER_STATE_DIR), exist_ok=True)
            save_file(quantizer_state, os.path.join(folder, QUANTIZER_STATE_DIR, f"rank-{acc.process_index}.safetensors"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._unwrapped.save_pretrained(os.path.join(folder, "model"))
            state.stream = stream.state_dict()
            if folder not in state.checkpoints:
                state.checkpoints.append(folder)
            self._rotate(state)
            state.save(os.path.join(folder, STATE_NAME))  # last: marks the checkpoint complete
        acc.wait_for_everyone()

    def _load_quantizer_state(self, ckpt: str) -> None:
        folder = os.path.join(ckpt, QUANTIZER_STATE_DIR)
        path = os.path.join(folder, f"rank-{self.accelerator.process_index}.safetensors")
        if os.path.exists(path):
            self._unwrapped.quantizer.load_training_state(load_file(path))
        elif os.path.isdir(folder):
            logger.warning(f"{folder} has no state for process {self.accelerator.process_index} (resumed with "
                           "more processes?): usage counts restart from zero")

    def _rotate(self, state: TrainerState) -> None:
        limit = self.config.save_total_limit
        if limit is None:
            return
        keep = max(limit, self.config.average_last_n)
        while len(state.checkpoints) > keep:
            old = state.checkpoints.pop(0)
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ the loop
    def train(self, *, stop_after_step: int | None = None) -> TrainResult:
        """Run (or resume) training to the end; export ``best``, ``final``, ``averaged``.

        ``stop_after_step`` ends the run right after that step, as if the job were killed there (for
        resume tests; nothing is exported).

        Raises:
            ValueError: ``output_dir`` holds another run and neither ``overwrite_output_dir`` nor
                ``resume_from_checkpoint`` is set.
            OutputDirInUseError: another process is training into ``output_dir`` (it holds the lock).
        """
        with claim_output_dir(self.config, self.accelerator):
            return self._train(stop_after_step)

    def _train(self, stop_after_step: int | None) -> TrainResult:
        from tqdm.auto import tqdm
        from transformers import get_scheduler

        cfg, acc = self.config, self.accelerator
        torch.manual_seed(cfg.seed)
        stream = FrameStream(self.train_cache, cfg.batch_size, seed=cfg.seed, shuffle_shards=cfg.shuffle_shards,
                             rank=acc.process_index, world_size=acc.num_processes)
        steps_per_epoch = stream.batches_per_epoch()
        max_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * max_steps)

        resume = cfg.resume_from_checkpoint
        ckpt = find_latest_checkpoint(self.output_dir) if resume == "latest" else resume
        state = TrainerState.load(os.path.join(ckpt, STATE_NAME)) if ckpt else TrainerState()

        model = self.model.to(acc.device)
        model.train()
        params = self._trainable_parameters(model)
        if not ckpt and cfg.init_method == "kmeans":
            sample = self.train_cache.sample_frames(cfg.kmeans_init_frames, seed=cfg.seed)
            state.init_metrics = initialize_from_sample(model, sample, num_iters=cfg.kmeans_iters, seed=cfg.seed,
                                                        batch_size=cfg.batch_size * acc.num_processes,
                                                        seeding=cfg.kmeans_seeding)
            if self._dev() is not None:
                state.init_metrics.update({f"init_dev_{k}": v for k, v in evaluate_frames(
                    model, self._dev(), per_level=False).items() if isinstance(v, float)})
            del sample
        # a model without trainable parameters (use_projection=False + EMA codebooks) still gets an
        # optimiser over an unused dummy so that the loop, scheduler and checkpoints stay uniform
        dummy = [nn.Parameter(torch.zeros(1, device=acc.device))] if not params else []
        optimizer = torch.optim.AdamW(params or dummy, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2))
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=max_steps)
        self.model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        if ckpt:
            acc.load_state(os.path.join(ckpt, "accelerate"))
            stream.load_state_dict(state.stream)
            self._load_quantizer_state(ckpt)
            acc.print(f"resumed from {ckpt} at step {state.step}")
        if acc.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
        if cfg.log_with:
            acc.init_trackers(cfg.project_name, config=_flat_config(cfg))

        restart_until = int(cfg.dead_code_restart_until * max_steps)
        # no restart inside the averaging window (its oldest checkpoint may include one): code identities
        # must be stable across the averaged checkpoints
        window_start = max_steps - (cfg.average_last_n - 1) * cfg.save_steps
        if window_start > 0 and not cfg.restart_in_averaging_window:
            restart_until = min(restart_until, window_start)
        bar = tqdm(total=max_steps, initial=state.step, desc="rvq", disable=cfg.disable_tqdm or not
                   acc.is_local_main_process, dynamic_ncols=True)
        running: dict[str, float] = {}
        t0 = time.perf_counter()
        batches = iter(stream)
        while state.step < max_steps:
            batch = next(batches).to(acc.device, non_blocking=True)
            out = self.model(embeddings=batch)
            if params:
                acc.backward(out.loss)
            if cfg.max_grad_norm and cfg.max_grad_norm > 0 and params:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            step = state.step

            for key in ("loss", "mse_loss", "cosine_loss", "commitment_loss"):
                value = getattr(out, key, None)
                if value is not None:
                    running[key] = running.get(key, 0.0) + float(value.detach())
            running["_n"] = running.get("_n", 0) + 1

            if cfg.dead_code_restart_steps and step % cfg.dead_code_restart_steps == 0 and step <= restart_until:
                unwrapped = self._unwrapped
                with torch.no_grad():
                    z = unwrapped.project_in(batch).float()
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                n_restart = unwrapped.quantizer.restart_dead_codes(z, generator=gen)
                state.dead_codes_restarted += n_restart
                running["dead_codes"] = running.get("dead_codes", 0.0) + n_restart

            if step % cfg.logging_steps == 0 or step == max_steps:
                n = running.pop("_n")
                logs = {f"train/{k}": v / n for k, v in running.items() if k != "dead_codes"}
                logs["train/dead_codes_restarted"] = running.get("dead_codes", 0.0)
                logs["train/lr"] = scheduler.get_last_lr()[0]
                logs["train/epoch"] = stream.epoch + stream.batch / max(steps_per_epoch, 1)
                logs["train/frames_per_second"] = n * cfg.batch_size * acc.num_processes / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                running = {}
                state.train_log.append({"step": step, **logs})
                acc.log(logs, step=step)
                bar.set_postfix(loss=f"{logs.get('train/loss', 0):.4f}", lr=f"{logs['train/lr']:.2e}")

            if step % cfg.eval_steps == 0 or step == max_steps:
                self._eval_and_keep_best(state, step)
            if step % cfg.save_steps == 0 or step == max_steps:
                self._checkpoint(state, stream)
            bar.update(1)
            if stop_after_step is not None and step >= stop_after_step and step < max_steps:
                bar.close()
                _finish_trackers(acc)
                return TrainResult(self.output_dir, step, {}, {}, state.init_metrics, completed=False)
        bar.close()
        result = self._finish(state)
        _finish_trackers(acc)
        return result

    def _eval_and_keep_best(self, state: TrainerState, step: int) -> None:
        acc = self.accelerator
        if acc.is_main_process and self.dev_cache is not None:
            metrics = self.evaluate()
            state.eval_log.append({"step": step, **_jsonable(metrics)})
            acc.log({f"{split}/{k}": v for split, m in metrics.items() for k, v in m.items()
                     if isinstance(v, (int, float))}, step=step)
            dev_mse = metrics["dev"]["mse"]
            if dev_mse < state.best_dev_mse:
                state.best_dev_mse, state.best_step = dev_mse, step
                self._save_model(os.path.join(self.output_dir, "best"), extra={"step": step, "metrics": metrics})
        acc.wait_for_everyone()

    def _finish(self, state: TrainerState) -> TrainResult:
        acc = self.accelerator
        cfg = self.config
        folders = {name: os.path.join(self.output_dir, name) for name in ("best", "final", "averaged")}
        metrics: dict[str, dict[str, Any]] = {}
        if acc.is_main_process:
            model = self._unwrapped
            final_metrics = self.evaluate(model)
            self._save_model(folders["final"], model, extra={"step": state.step, "metrics": final_metrics})
            if not os.path.isdir(folders["best"]):  # no dev set: best = final
                shutil.copytree(folders["final"], folders["best"])
            sources = [os.path.join(c, "model") for c in state.checkpoints[-cfg.average_last_n:]]
            summary = average_checkpoints(sources, folders["averaged"])
            from transformers import AutoModel

            averaged = AutoModel.from_pretrained(folders["averaged"]).to(acc.device)
            avg_metrics = self.evaluate(averaged)
            self._save_model(folders["averaged"], averaged, extra={"step": state.step, "metrics": avg_metrics,
                                                                  "averaging": summary})
            with open(os.path.join(folders["best"], "training_info.json"), encoding="utf-8") as f:
                best_info = json.load(f)
            metrics = {"best": best_info["metrics"], "final": _jsonable(final_metrics),
                       "averaged": _jsonable(avg_metrics)}
            results = {"steps": state.step, "best_step": state.best_step, "init": state.init_metrics,
                       "metrics": metrics, "dead_codes_restarted": state.dead_codes_restarted,
                       "train_data": summarize_cache(self.train_cache),
                       "dev_data": summarize_cache(self.dev_cache) if self.dev_cache else None}
            with open(os.path.join(self.output_dir, "results.json"), "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1, default=float)
            with open(os.path.join(self.output_dir, "history.json"), "w", encoding="utf-8") as f:
                json.dump({"train": state.train_log, "eval": state.eval_log}, f, indent=1, default=float)
            curves = plot_loss_curves(self.output_dir, state) if cfg.make_plots else None
            for name in ("best", "final", "averaged"):
                if curves:
                    shutil.copy(curves, folders[name])
            for plot in ("code_usage.png", "level_errors.png"):
                if os.path.exists(os.path.join(folders["best"], plot)):
                    shutil.copy(os.path.join(folders["best"], plot), self.output_dir)
        acc.wait_for_everyone()
        return TrainResult(self.output_dir, state.step, folders, metrics, state.init_metrics,
                           best_step=state.best_step if state.best_step >= 0 else state.step)


# ---------------------------------------------------------------------------------------------- utilities


def make_accelerator(config: RVQTrainingConfig) -> Any:
    """An ``Accelerator`` for RVQ training (trackers filtered to the installed ones)."""
    from ..extras import require

    require("accelerate", "stage-1 RVQ training")
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    log_with = _available_trackers(config.log_with)
    return Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=os.path.join(config.output_dir, "logs")),
        # the scheduler counts optimiser steps, whatever the number of processes
        step_scheduler_with_optimizer=False,
        # EMA buffers are all-reduced by the quantizer itself; DDP must not overwrite them from rank 0
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def _finish_trackers(accelerator: Any) -> None:
    """Close the trackers but keep the process group (``end_training`` would destroy it)."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()


def _available_trackers(log_with: str | None) -> list[str]:
    if not log_with:
        return []
    import importlib.util
    import warnings

    names = [n.strip() for n in log_with.split(",") if n.strip()]
    modules = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow",
               "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}
    out = []
    for n in names:
        if n == "all" or importlib.util.find_spec(modules.get(n, n)) is not None:
            out.append(n)
        else:
            warnings.warn(f"tracker {n!r} is not installed; not logging to it", stacklevel=3)
    return out


def _flat_config(cfg: RVQTrainingConfig) -> dict[str, Any]:
    out = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, (int, float, str, bool)):
            out[k] = v
        elif v is not None:
            out[k] = json.dumps(v)
    return out


def summarize_cache(cache: EmbeddingCache | None) -> dict[str, Any] | None:
    """Hours, utterances, frames and languages of a cache (for results and model cards)."""
    if cache is None:
        return None
    return {"hours": cache.seconds / 3600, "utterances": cache.num_utterances, "frames": cache.num_frames,
            "languages": cache.languages}


def _jsonable(metrics: Any, counts: bool = False) -> Any:
    """Metrics for JSON: tensors (the ``[Q, K]`` code counts) dropped, or as nested lists with ``counts``."""
    if isinstance(metrics, dict):
        return {k: v.tolist() if isinstance(v, torch.Tensor) else _jsonable(v, counts) for k, v in metrics.items()
                if counts or not isinstance(v, torch.Tensor)}
    return metrics


def plot_loss_curves(output_dir: str, state: TrainerState) -> str | None:
    """Training losses and dev/train FVU over steps -> ``<output_dir>/loss_curves.png``."""
    if not state.train_log:
        return None
    from ..extras import require

    require("matplotlib", "training plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    steps = [r["step"] for r in state.train_log]
    for key in ("train/loss", "train/mse_loss", "train/cosine_loss", "train/commitment_loss"):
        values = [r.get(key) for r in state.train_log]
        if all(v is not None and v > 0 for v in values):
            axes[0].plot(steps, values, label=key.split("/")[1])
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].set_title("training losses")
    ev = [r for r in state.eval_log if "dev" in r or "train" in r]
    for split in ("dev", "train"):
        pts = [(r["step"], r[split]["fvu"]) for r in ev if split in r]
        if pts:
            axes[1].plot(*zip(*pts), "o-", label=f"{split} FVU")
    if state.init_metrics.get("init_dev_fvu") is not None:
        axes[1].axhline(state.init_metrics["init_dev_fvu"], ls="--", c="gray", label="dev FVU at init")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=8)
    axes[1].set_title("fraction of variance unexplained")
    path = os.path.join(output_dir, "loss_curves.png")
    fig.savefig(path, dpi=100)
    return path


def _write_hub_ready_config(config: RVQTrainingConfig, path: str) -> None:
    """``training_config.yaml`` of an exported folder: the settings, with local paths (output, cache, data,
    encoder folders) named by their folder or file name, so the folder can go to the Hub as it is."""
    import yaml

    from ..cards import hub_reference

    values = config.to_dict()
    for key, value in values.items():
        if isinstance(value, str) and value and (os.path.isabs(value) or os.path.exists(value)):
            values[key] = hub_reference(value).name
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(values, handle, sort_keys=False)
