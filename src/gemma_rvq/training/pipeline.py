"""The whole stage-1 run behind ``examples/train_rvq.py``: model, audio splits, caches, training, export."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from .cache import EmbeddingCache, build_embedding_cache, finalize_cache
from .config import RVQTrainingConfig
from .run_folder import claim_output_dir
from .trainer import RVQTrainer, TrainResult, make_accelerator

logger = logging.getLogger(__name__)

_AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aiff", ".aif")


#: The random Gemma 4 audio tower bundled by ``tiny_encoder: true`` (offline smoke runs, the demo): the real
#: front end (128 mel bins, two stride-2 convolutions, 25 frames/s; the first subsampling conv keeps 128
#: channels, which the Gemma 4 code assumes) and a 2-layer body of width ``dim``.
TINY_ENCODER_CONFIG: dict[str, Any] = {"num_hidden_layers": 2, "num_attention_heads": 2,
                                       "subsampling_conv_channels": [128, 16], "output_proj_dims": 96}


def tiny_encoder_model_config(dim: int = 64, **model_config: Any) -> Any:
    """A ``GemmaRVQConfig`` bundling a tiny random Gemma 4 audio encoder of hidden size ``dim``
    (:data:`TINY_ENCODER_CONFIG`); ``model_config`` are further ``GemmaRVQConfig`` fields (2 levels of
    16 codes unless given)."""
    from transformers import Gemma4AudioConfig, Gemma4AudioFeatureExtractor

    from .. import GemmaRVQConfig

    for key in ("encoder_family", "encoder_name_or_path", "encoder_config", "feature_extractor_config"):
        model_config.pop(key, None)
    encoder = Gemma4AudioConfig(hidden_size=dim, **TINY_ENCODER_CONFIG)
    values = {"encoder_layer": None, "num_quantizers": 2, "codebook_size": 16, **model_config}
    return GemmaRVQConfig(encoder_family="gemma4_audio", encoder_name_or_path=None, dim=dim,
                          encoder_config=encoder.to_dict(),
                          feature_extractor_config=Gemma4AudioFeatureExtractor().to_dict(), **values)


def build_model(config: RVQTrainingConfig) -> Any:
    """A fresh ``GemmaRVQModel`` from ``model_config`` (+ a bundled tiny encoder with ``tiny_encoder``),
    or an existing checkpoint (``model_name_or_path``) to continue from. Fresh weights are seeded by
    ``config.seed`` (the global RNG state is left untouched)."""
    from transformers import AutoModel

    from .. import GemmaRVQConfig, GemmaRVQModel

    if config.model_name_or_path:
        if config.model_config:
            raise ValueError("set either model_name_or_path or model_config, not both")
        return AutoModel.from_pretrained(config.model_name_or_path)
    kwargs = dict(config.model_config or {})
    if config.tiny_encoder:
        model_config = tiny_encoder_model_config(int(kwargs.pop("dim", 64)), **kwargs)
    else:
        model_config = GemmaRVQConfig(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GemmaRVQModel(model_config)
    return model.eval() if config.tiny_encoder else model


def _resolve_paths(ds: Any, column: str, root: str) -> Any:
    def fix(batch: dict) -> dict:
        batch[column] = [v if not isinstance(v, str) or os.path.isabs(v) else os.path.join(root, v)
                         for v in batch[column]]
        return batch

    return ds.map(fix, batched=True, desc="resolving audio paths")


def load_audio_splits(config: RVQTrainingConfig) -> tuple[Any, Any | None]:
    """(train, dev) audio sources from ``dataset_name``.

    * a metadata ``.jsonl`` / ``.json`` / ``.csv`` file: ``audio_column`` holds file paths (relative to
      the file's folder); ``split_column`` names each row's split (e.g. ``data/corpus/metadata.jsonl``);
    * a folder of audio files without a dataset script: every file is a training utterance
      (use ``dev_fraction`` for a dev split);
    * anything else: ``datasets.load_dataset(dataset_name, dataset_config_name)`` with ``train_split`` /
      ``dev_split`` (or ``split_column``).
    """
    import datasets

    name = config.dataset_name
    if not name:
        raise ValueError("dataset_name is required (a Hub dataset, a local folder or a metadata .jsonl/.csv)")
    single = None
    if os.path.isfile(name):
        ext = os.path.splitext(name)[1].lower()
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(ext)
        if builder is None:
            raise ValueError(f"{name}: expected a .jsonl, .json or .csv metadata file")
        single = datasets.load_dataset(builder, data_files=name, split="train")
        if config.audio_column not in single.column_names:
            raise ValueError(f"{name} has no column {config.audio_column!r} (columns: {single.column_names})")
        single = _resolve_paths(single, config.audio_column, os.path.dirname(os.path.abspath(name)))
    elif os.path.isdir(name) and not any(f.endswith(".py") for f in os.listdir(name)) and any(
            f.lower().endswith(_AUDIO_EXTENSIONS) for f in os.listdir(name)):
        files = sorted(os.path.join(name, f) for f in os.listdir(name) if f.lower().endswith(_AUDIO_EXTENSIONS))
        single = datasets.Dataset.from_dict({config.audio_column: files,
                                             "id": [os.path.basename(f) for f in files]})
    if single is None:
        loaded = datasets.load_dataset(name, config.dataset_config_name)
        if config.split_column:
            single = datasets.concatenate_datasets(list(loaded.values())) if isinstance(
                loaded, datasets.DatasetDict) else loaded
        else:
            if config.train_split not in loaded:
                raise ValueError(f"{name} has no split {config.train_split!r} (splits: {list(loaded)})")
            train = loaded[config.train_split]
            dev = loaded[config.dev_split] if config.dev_split and config.dev_split in loaded else None
            return _cap_and_hold_out(train, dev, config)
    if config.split_column:
        if config.split_column not in single.column_names:
            raise ValueError(f"no split column {config.split_column!r} (columns: {single.column_names})")
        splits = single[config.split_column]
        train = single.select([i for i, s in enumerate(splits) if s == config.train_split])
        dev = single.select([i for i, s in enumerate(splits) if s == config.dev_split]) if config.dev_split else None
        if len(train) == 0:
            raise ValueError(f"no row has {config.split_column} == {config.train_split!r}")
        dev = dev if dev is not None and len(dev) else None
        return _cap_and_hold_out(train, dev, config)
    return _cap_and_hold_out(single, None, config)


def _cap_and_hold_out(train: Any, dev: Any | None, config: RVQTrainingConfig) -> tuple[Any, Any | None]:
    if dev is None and config.dev_fraction > 0:
        perm = np.random.default_rng(config.seed).permutation(len(train))
        n_dev = max(1, round(config.dev_fraction * len(train)))
        dev, train = train.select(sorted(perm[:n_dev].tolist())), train.select(sorted(perm[n_dev:].tolist()))
    if config.max_train_utterances is not None:
        train = train.select(range(min(config.max_train_utterances, len(train))))
    if dev is not None and config.max_dev_utterances is not None:
        dev = dev.select(range(min(config.max_dev_utterances, len(dev))))
    return train, dev


def prepare_cache(model: Any, source: Any, path: str, config: RVQTrainingConfig, accelerator: Any, *,
                  dtype: str = "float16") -> EmbeddingCache:
    """Build (or reuse / resume) one split's cache with every process, then finalize on the main one."""
    model = model.to(accelerator.device)
    build_embedding_cache(
        model, source, path, audio_column=config.audio_column, id_column=config.id_column,
        batch_size=config.embed_batch_size, shard_frames=config.shard_frames,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        progress=accelerator.is_local_main_process and not config.disable_tqdm, finalize=False, dtype=dtype,
        pcm_dtype=config.pcm_dtype,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finalize_cache(path, world_size=accelerator.num_processes)
    accelerator.wait_for_everyone()
    return EmbeddingCache(path)


def train_rvq(config: RVQTrainingConfig, *, stop_after_step: int | None = None) -> TrainResult:
    """Cache the embeddings of ``config``'s audio, train, export best/final/averaged (+ model cards, push)."""
    accelerator = make_accelerator(config)
    with claim_output_dir(config, accelerator):  # before the caches: they may live in output_dir
        return _train_rvq(config, accelerator, stop_after_step)


def _train_rvq(config: RVQTrainingConfig, accelerator: Any, stop_after_step: int | None) -> TrainResult:
    model = build_model(config)
    train_src, dev_src = load_audio_splits(config)
    root = config.resolved_cache_dir
    train_cache = prepare_cache(model, train_src, os.path.join(root, "train"), config, accelerator)
    # dev frames in float32: the reported scores (model cards, results.json) are then those of re-encoding the
    # dev audio (`gemma-rvq evaluate`), not of fp16-rounded frames
    dev_cache = (prepare_cache(model, dev_src, os.path.join(root, "dev"), config, accelerator, dtype="float32")
                 if dev_src else None)
    accelerator.print(f"train: {train_cache}\ndev:   {dev_cache}")
    trainer = RVQTrainer(model, config, train_cache, dev_cache, accelerator=accelerator)
    result = trainer.train(stop_after_step=stop_after_step)
    if result.completed and accelerator.is_main_process:
        write_cards(result, config)
        from ..formats import save_rvq_format

        for folder in result.folders.values():  # semantic_format.json: the format the codes are rendered in
            save_rvq_format(folder)
        if config.push_to_hub:
            from ..hub import push_model

            push_model(result.folders[config.push_variant], config.hub_model_id, private=config.hub_private)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def write_cards(result: TrainResult, config: RVQTrainingConfig) -> None:
    """A model card (README.md) in each exported folder, from what was trained."""
    try:
        from ..hub import write_model_card
    except ImportError:  # pragma: no cover - hub module not available
        logger.warning("gemma_rvq.hub.write_model_card is unavailable: no model cards written")
        return
    for variant, folder in result.folders.items():
        write_model_card(folder, variant=variant, repo_id=config.hub_model_id, dataset_name=config.dataset_name,
                         languages=config.languages)
