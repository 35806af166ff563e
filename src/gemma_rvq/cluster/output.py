"""Output of a tokenization run: Parquet shards that ``datasets.load_dataset(folder)`` reads.

Layout of the output folder (a Hub dataset repository's layout, so ``gemma-rvq push`` uploads it as is)::

    README.md                           dataset card
    semantic_format.json                the token format of the shards (written by the tasks)
    data/train-00000-of-00008.parquet   one shard per task: the input rows with the token columns added
    logs/                               datatrove's completion markers, stats and task logs (resume state)

The shard names follow ``push_to_hub``'s layout, which ``datasets`` finds without any configuration (so
the JSON files beside them are not taken for data). The card deliberately has no ``configs:`` YAML: for
a local folder, ``datasets`` 5.2 then caches the dataset under the folder's name and the YAML alone,
so a re-run or another folder of the same name would load stale rows; found files are cached by their
modification times.
"""

from __future__ import annotations

from typing import IO, Any

from datatrove.data import Document
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.writers.parquet import ParquetWriter

from ..transforms import SpeechTokenizer

DATA_DIR = "data"
LOGS_DIR = "logs"


def _row_adapter(self: TokenizedParquetWriter, document: Document) -> dict:
    """The row as the reader gave it (``audio_row_adapter`` keeps it whole in the metadata), less the
    audio column when that holds audio data rather than a path or URL."""
    row = dict(document.metadata)
    if self.audio_column is not None and not isinstance(row.get(self.audio_column, ""), str):
        del row[self.audio_column]
    return row


class TokenizedParquetWriter(ParquetWriter):
    """datatrove's ``ParquetWriter`` writing flat rows, with the token columns' types fixed.

    ``ParquetWriter`` infers the schema from the first row, so an error column that is ``None`` there
    (every good row) would be typed ``null`` and the first error would break the shard. This writer
    infers the schema from the first *batch* of rows and fixes the types of the tokenizer's columns:
    token string and error ``string``, frame count ``int64``, codes ``list<list<int64>>``.

    Args:
        output_folder: where the shards go (``<output>/data`` in the command-line layout).
        tokenizer: the :class:`SpeechTokenizer` whose columns are written.
        audio_column: a column left out of the written rows when it holds audio data (bytes, arrays,
            ``{"bytes", "path"}`` dicts); file paths and URLs stay. ``None``: every column is written.
        split: the split named in the file names, ``{split}-{rank:05d}-of-{tasks:05d}.parquet``.
        **kwargs: ``ParquetWriter`` options (``compression``, ``batch_size``, ``schema``...). Shards are not
            cut by size (``max_file_size=-1``): a task's output is one file, redone whole by a re-run.
    """

    name = "📒 Parquet (gemma-rvq tokens)"

    def __init__(
        self,
        output_folder: DataFolderLike,
        tokenizer: SpeechTokenizer,
        *,
        audio_column: str | None = None,
        split: str = "train",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("adapter", _row_adapter)
        kwargs.setdefault("output_filename", f"{split}-${{rank}}-of-${{world_size}}.parquet")
        kwargs.setdefault("max_file_size", -1)
        super().__init__(output_folder, **kwargs)
        self.world_size = 1
        self.audio_column = audio_column
        self.token_columns = _token_column_types(tokenizer)
        self._handles: dict[str, IO] = {}

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.world_size = world_size
        return super().run(data, rank, world_size)

    def _get_output_filename(self, document: Document, rank: int | str = 0, **kwargs: Any) -> str:
        return super()._get_output_filename(document, rank, world_size=str(self.world_size).zfill(5), **kwargs)

    def _write(self, document: dict, file_handler: IO, filename: str) -> None:
        if self.max_file_size > 0:
            filename = self._get_filename_with_file_id(filename)
        self._handles[filename] = file_handler
        self._batches[filename].append(document)
        if len(self._batches[filename]) == self.batch_size:
            self._write_batch(filename)

    def close_file(self, filename: str) -> None:
        if filename not in self._writers and self._batches.get(filename):
            self._write_batch(filename)  # its first batch is still buffered: open the Parquet writer now
        super().close_file(filename)

    def close(self) -> None:
        for filename in [f for f, rows in self._batches.items() if rows and f not in self._writers]:
            self._write_batch(filename)
        super().close()

    def _write_batch(self, filename: str) -> None:
        rows = self._batches.pop(filename, None)
        if not rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        if filename not in self._writers:
            schema = self.schema if self.schema is not None else self._schema_for(rows)
            self._writers[filename] = pq.ParquetWriter(
                self._handles.pop(filename),
                schema=schema,
                compression=self.compression,
                use_content_defined_chunking=self.use_content_defined_chunking,
                write_page_index=self.write_page_index,
            )
        writer = self._writers[filename]
        writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=writer.schema))

    def _schema_for(self, rows: list[dict]):
        import pyarrow as pa

        schema = pa.RecordBatch.from_pylist(rows).schema
        for name, kind in self.token_columns.items():
            index = schema.get_field_index(name)
            if index >= 0:
                schema = schema.set(index, pa.field(name, kind))
        return schema


def _token_column_types(tokenizer: SpeechTokenizer) -> dict:
    import pyarrow as pa

    return {
        tokenizer.output_column: pa.string(),
        tokenizer.error_column: pa.string(),
        tokenizer.num_frames_column: pa.int64(),
        tokenizer.codes_column: pa.list_(pa.list_(pa.int64())),
    }


def write_dataset_card(output_folder: DataFolderLike, tokenizer: SpeechTokenizer, *, model: str,
                       split: str = "train", source: str | None = None) -> None:
    """Write ``README.md``: what the folder holds, how it was made and how to load it."""
    from ..hub import join_card

    folder = get_datafolder(output_folder)
    columns = [tokenizer.output_column]
    if tokenizer.return_codes:
        columns.append(tokenizer.codes_column)
    if tokenizer.return_num_frames:
        columns.append(tokenizer.num_frames_column)
    if tokenizer.on_error == "skip":
        columns.append(tokenizer.error_column)
    metadata = {"tags": ["gemma-rvq", "semantic-tokens", "speech"]}
    body = "\n".join([
        "# Semantic speech tokens",
        "",
        f"Made with gemma-rvq (`gemma-rvq tokenize --executor ...`) from {source or 'an audio corpus'}.",
        f"Model: `{model}`. Token format: `semantic_format.json` (written by the tasks that made the shards).",
        "",
        "Columns added to each input row: " + ", ".join(f"`{c}`" for c in columns) + ".",
        "",
        "```python",
        "from datasets import load_dataset",
        "ds = load_dataset(\"path/to/this/folder\", split=\"" + split + "\")",
        "```",
        "",
    ])
    with folder.open("README.md", "wt") as f:
        f.write(join_card(metadata, body))
