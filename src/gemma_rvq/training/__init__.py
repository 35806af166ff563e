"""Stage 1: train the residual quantizer on frozen-encoder embeddings of real speech.

* :mod:`.config`    ``RVQTrainingConfig`` (YAML / command line)
* :mod:`.cache`     the embedding cache: sharded fp16 frames on disk, resumable writing, shuffled streaming
* :mod:`.trainer`   ``RVQTrainer`` (accelerate), data-driven init, checkpoints, plots (scores come from
                    :func:`gemma_rvq.evaluation.evaluate_frames`)
* :mod:`.run_folder` the output folder: refused when it holds another run, locked while a run writes
* :mod:`.averaging` element-wise checkpoint averaging
* :mod:`.pipeline`  ``train_rvq(config)``: everything behind ``examples/train_rvq.py``
"""

from .averaging import average_checkpoints, average_state_dicts
from .cache import (
    EmbeddingCache,
    EmbeddingCacheWriter,
    FrameStream,
    build_embedding_cache,
    example_waveform,
    finalize_cache,
)
from .config import RVQTrainingConfig, parse_args
from .pipeline import (
    TINY_ENCODER_CONFIG,
    build_model,
    load_audio_splits,
    prepare_cache,
    tiny_encoder_model_config,
    train_rvq,
)
from .run_folder import OutputDirInUseError, check_output_dir, run_lock
from .trainer import RVQTrainer, TrainResult, evaluate_frames, find_latest_checkpoint, initialize_from_sample

__all__ = [
    "TINY_ENCODER_CONFIG",
    "EmbeddingCache",
    "EmbeddingCacheWriter",
    "FrameStream",
    "OutputDirInUseError",
    "RVQTrainer",
    "RVQTrainingConfig",
    "TrainResult",
    "average_checkpoints",
    "average_state_dicts",
    "build_embedding_cache",
    "build_model",
    "check_output_dir",
    "evaluate_frames",
    "example_waveform",
    "finalize_cache",
    "find_latest_checkpoint",
    "initialize_from_sample",
    "load_audio_splits",
    "parse_args",
    "prepare_cache",
    "run_lock",
    "tiny_encoder_model_config",
    "train_rvq",
]
