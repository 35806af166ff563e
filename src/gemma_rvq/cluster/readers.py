"""A datatrove reader for Hugging Face datasets with an audio column."""

from __future__ import annotations

from typing import Any

from datatrove.pipeline.readers import HuggingFaceDatasetReader
from datatrove.pipeline.readers.base import BaseReader

from .step import audio_row_adapter


class AudioDatasetReader(HuggingFaceDatasetReader):
    """datatrove's ``HuggingFaceDatasetReader`` for speech datasets.

    - The ``Audio`` column is cast to ``Audio(decode=False)``: rows carry the encoded bytes (and path),
      which ``SpeechTokenizerStep`` decodes with soundfile. ``datasets``' own decoding needs torchcodec.
    - A ``Dataset`` is cut into contiguous shards (datatrove interleaves rows), so the tasks' output
      files, read in order, keep the dataset's row order.
    - Rows stay whole in ``Document.metadata`` (:func:`audio_row_adapter`), without the ``dataset``
      key the base reader adds.

    Args:
        dataset: Hub id, or a ``save_to_disk`` folder with ``load_from_disk=True`` (a ``DatasetDict``
            folder: its ``split`` subfolder is read).
        audio_column: the column to keep undecoded.
        split: the split of a ``DatasetDict`` saved to disk (Hub datasets take ``dataset_options={"split":
            ...}``).
        **kwargs: ``HuggingFaceDatasetReader`` options.
    """

    name = "🤗 HuggingFace (audio)"

    def __init__(self, dataset: str, *, audio_column: str = "audio", split: str = "train", **kwargs: Any) -> None:
        kwargs.setdefault("adapter", audio_row_adapter)
        if kwargs.get("load_from_disk"):
            import os

            if os.path.isfile(os.path.join(dataset, "dataset_dict.json")):
                if not os.path.isdir(os.path.join(dataset, split)):
                    raise ValueError(f"no split {split!r} in the DatasetDict saved at {dataset}")
                dataset = os.path.join(dataset, split)
        super().__init__(dataset, **kwargs)
        self.audio_column = audio_column

    get_document_from_dict = BaseReader.get_document_from_dict

    def _get_dataset_shard(self, dst, rank: int, world_size: int):
        from datasets import Audio, Dataset

        features = getattr(dst, "features", None)
        if features is not None and isinstance(features.get(self.audio_column), Audio):
            dst = dst.cast_column(self.audio_column, Audio(decode=False))
        if isinstance(dst, Dataset):
            return dst.shard(world_size, rank, contiguous=True)
        return super()._get_dataset_shard(dst, rank, world_size)
