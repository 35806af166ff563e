"""``RVQTrainingConfig``: every knob of stage-1 training, as a YAML-loadable dataclass.

The same dataclass drives ``examples/train_rvq.py`` (``--config file.yaml`` plus ``--key value``
overrides, through ``transformers.HfArgumentParser``) and the library entry point
:func:`gemma_rvq.training.train_rvq`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass
class RVQTrainingConfig:
    """Configuration of a stage-1 RVQ training run (embedding cache + trainer + export).

    Sizes are in *frames* (one encoder output frame = one training example; 25 frames/s for Gemma 4).
    """

    # ---------------------------------------------------------------- model
    output_dir: str = field(default="rvq-output", metadata={"help": "Run folder: checkpoints, best/final/averaged, plots."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run already in a non-empty output_dir (its checkpoints, exports, logs and "
                          "results are removed; the embedding cache is kept). Without it (or a resume) such a "
                          "folder is refused."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from an existing gemma-rvq checkpoint (folder or Hub id) instead of a fresh config."},
    )
    model_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "GemmaRVQConfig keyword arguments (dict in YAML, JSON string on the command line), e.g. "
            '{"encoder_name_or_path": "google/gemma-4-E2B", "num_quantizers": 8, "codebook_size": 2048}.'
        },
    )
    tiny_encoder: bool = field(
        default=False,
        metadata={"help": "Bundle a tiny random Gemma 4 audio encoder (gemma_rvq.training.pipeline.TINY_ENCODER_CONFIG, width "
                          "model_config['dim']): offline smoke runs."},
    )

    # ---------------------------------------------------------------- data
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Audio source: a Hub dataset id, a local dataset folder, or a metadata .jsonl/.csv whose "
            "`audio_column` holds file paths (relative to the metadata file)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split (or value of `split_column`) for training."})
    dev_split: str | None = field(default="dev", metadata={"help": "Held-out split for evaluation."})
    split_column: str | None = field(
        default=None, metadata={"help": "Column naming the split of each row (metadata files with one table)."}
    )
    dev_fraction: float = field(
        default=0.0, metadata={"help": "If > 0 and there is no dev split: hold out this fraction of utterances."}
    )
    audio_column: str = field(default="audio", metadata={"help": "Column holding the audio."})
    pcm_dtype: str | None = field(
        default=None,
        metadata={"help": "Width of integer PCM samples in the audio column (int8, int16, int32, uint8): needed for "
                          "int64 / Python-int samples, which carry no width (see gemma_rvq.audio)."},
    )
    id_column: str | None = field(default=None, metadata={"help": "Column with utterance ids (default: row index)."})
    max_train_utterances: int | None = field(default=None, metadata={"help": "Cap the number of training utterances."})
    max_dev_utterances: int | None = field(default=None, metadata={"help": "Cap the number of dev utterances."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Embedding cache folder (default: <output_dir>/embedding-cache)."}
    )
    shard_frames: int = field(default=65536, metadata={"help": "Frames per cache shard (fp16 .npy)."})
    embed_batch_size: int = field(
        default=8, metadata={"help": "Utterances per encoder call while caching (measure per device)."}
    )

    # ---------------------------------------------------------------- optimisation
    seed: int = 0
    batch_size: int = field(default=4096, metadata={"help": "Frames per optimiser step and process."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the cached training frames."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0: total optimiser steps (overrides epochs)."})
    learning_rate: float = 1e-5
    train_in_projection: bool = field(
        default=False,
        metadata={"help": "Also train the in-projection (LayerNorm + Linear). Off by default: the EMA codebooks live "
                          "in its output space, and training it raised dev FVU at D = 1024 even at lr 1e-6 "
                          "(docs/stage1-training.md); the out-projection (and learnable codebooks) always train."},
    )
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_scheduler_type: str = field(default="cosine", metadata={"help": f"One of {_SCHEDULERS}."})
    warmup_ratio: float = 0.05
    warmup_steps: int = field(default=0, metadata={"help": "If > 0, overrides warmup_ratio."})
    max_grad_norm: float = 1.0
    mixed_precision: str = field(default="no", metadata={"help": "accelerate mixed precision: no, fp16, bf16."})
    shuffle_shards: int = field(
        default=2, metadata={"help": "Cache shards mixed in the shuffling buffer (peak RAM = this x shard size)."}
    )

    # ---------------------------------------------------------------- codebooks
    init_method: str = field(
        default="kmeans",
        metadata={"help": "kmeans: identity/PCA projections + k-means codebooks + least-squares out-proj; none."},
    )
    kmeans_init_frames: int = field(default=65536, metadata={"help": "Frames sampled for the k-means init."})
    kmeans_iters: int = field(default=20, metadata={"help": "Lloyd iterations per level at init."})
    kmeans_seeding: str = field(
        default="kmeans++",
        metadata={"help": "k-means seeding: kmeans++ (spread out, favours outliers) or random (frames drawn "
                  "uniformly: codes follow the data density, usage is more even)."},
    )
    dead_code_restart_steps: int = field(
        default=50, metadata={"help": "Restart dead codes every N steps (0 = never), from held-in residuals."}
    )
    restart_in_averaging_window: bool = field(
        default=False,
        metadata={"help": "Keep restarting inside the averaging window (restarted codes are then taken from the "
                  "newest checkpoint by the averaging guard). Needed with fast EMA decays, where codes die fast."},
    )
    dead_code_restart_until: float = field(
        default=0.9, metadata={"help": "No restarts after this fraction of training, nor inside the averaging window."}
    )

    # ---------------------------------------------------------------- evaluation, checkpoints, logging
    eval_steps: int = field(default=500, metadata={"help": "Evaluate on the dev cache every N steps."})
    eval_max_frames: int = field(default=200_000, metadata={"help": "Frames of the dev cache used per evaluation."})
    eval_train_frames: int = field(
        default=0, metadata={"help": "Also evaluate on this many training frames (held-in metrics)."}
    )
    save_steps: int = field(default=500, metadata={"help": "Checkpoint (accelerate state + weights) every N steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep at most this many checkpoints."})
    average_last_n: int = field(default=5, metadata={"help": "`averaged` = element-wise mean of the last N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder of this run."}
    )
    logging_steps: int = 10
    log_with: str | None = field(
        default="tensorboard", metadata={"help": "accelerate trackers (comma separated: tensorboard, trackio, ...)."}
    )
    project_name: str = "gemma-rvq"
    make_plots: bool = field(default=True, metadata={"help": "Write loss-curve, code-usage and level-error PNGs."})
    disable_tqdm: bool = False

    # ---------------------------------------------------------------- export
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    push_variant: str = field(default="best", metadata={"help": "Folder pushed to the Hub: best, averaged or final."})
    languages: list[str] | None = field(default=None, metadata={"help": "Languages of the data, for the model card."})

    def __post_init__(self) -> None:
        if isinstance(self.model_config, str):
            try:
                self.model_config = json.loads(self.model_config)
            except json.JSONDecodeError as err:
                raise ValueError(f"model_config must be a JSON object string, got {self.model_config!r}") from err
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise ValueError(f"model_config must be a dict, got {type(self.model_config).__name__}")
        from ..audio import check_pcm_dtype

        self.pcm_dtype = check_pcm_dtype(self.pcm_dtype)
        if self.lr_scheduler_type not in _SCHEDULERS:
            raise ValueError(f"lr_scheduler_type must be one of {_SCHEDULERS}, got {self.lr_scheduler_type!r}")
        if self.init_method not in ("kmeans", "none"):
            raise ValueError(f"init_method must be 'kmeans' or 'none', got {self.init_method!r}")
        if self.kmeans_seeding not in ("kmeans++", "random"):
            raise ValueError(f"kmeans_seeding must be 'kmeans++' or 'random', got {self.kmeans_seeding!r}")
        if self.push_variant not in ("best", "averaged", "final"):
            raise ValueError(f"push_variant must be best, averaged or final, got {self.push_variant!r}")
        for name in ("batch_size", "shard_frames", "embed_batch_size", "shuffle_shards", "eval_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction must be in [0, 1), got {self.dev_fraction}")
        if self.average_last_n < 1:
            raise ValueError(f"average_last_n must be >= 1, got {self.average_last_n}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub=True needs hub_model_id")

    # ---------------------------------------------------------------- (de)serialisation
    @property
    def resolved_cache_dir(self) -> str:
        return self.cache_dir or os.path.join(self.output_dir, "embedding-cache")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RVQTrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown RVQTrainingConfig keys: {unknown}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> RVQTrainingConfig:
        """Load a YAML file (a flat mapping of field names), then apply keyword overrides."""
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of RVQTrainingConfig fields at the top level")
        values.update(overrides)
        return cls.from_dict(values)


def parse_args(argv: list[str] | None = None) -> RVQTrainingConfig:
    """Parse ``--config file.yaml`` and ``--field value`` overrides (command line wins over the file), with
    the parser ``gemma-rvq train`` and ``examples/train_rvq.py`` use."""
    from ..commands.train import make_parser

    return make_parser().parse_args_and_config(argv)[0]
