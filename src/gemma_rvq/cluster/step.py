"""The datatrove pipeline step: documents that name or carry audio in, semantic token strings out.

One implementation, two front ends: the step hands batches of documents to a
:class:`~gemma_rvq.transforms.SpeechTokenizer`, the very object ``dataset.map`` calls, so decoding,
resampling, length-sorted minibatching, the model, the token format and the ``on_error`` rule are the
transform's. The step only moves values between datatrove ``Document`` objects and the transform's
columns, and reports counts in datatrove's stats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from datatrove.data import Document, DocumentsPipeline, MediaType
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep

from ..transforms import SpeechTokenizer

FORMAT_FILE = "semantic_format.json"
"""Name of the token-format file written beside the tokenized shards."""

LOCAL_RANK_ENV = "GEMMA_RVQ_LOCAL_RANK"
"""Set by :class:`gemma_rvq.cluster.LocalExecutor` to the worker slot running a task, so that the tasks
running at one time on one machine sit on different GPUs."""

_COUNTERS = ("audio_seconds", "padded_seconds", "encode_seconds")


def audio_row_adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
    """A datatrove *reader* adapter that keeps every column of the row in ``Document.metadata``.

    datatrove readers drop rows without text and move the text and id columns out of the metadata; audio
    rows often have no text at all. With this adapter (``JsonlReader(..., adapter=audio_row_adapter)``)
    the whole row stays in ``metadata``, so the writer gets it back unchanged, and ``Document.text``
    holds the row's text (``text_key``) or, when it has none, the document id (a placeholder: the step
    never reads it). ``Document.id`` is the row's ``id_key`` column, else ``"<file>/<line>"``.
    """
    doc_id = data.get(self.id_key)
    doc_id = str(doc_id) if doc_id is not None else f"{path}/{id_in_file}"
    text = data.get(self.text_key)
    return {"text": text if isinstance(text, str) and text else doc_id, "id": doc_id, "metadata": dict(data)}


class SpeechTokenizerStep(PipelineStep):
    """Encode the audio of each document into semantic tokens with a gemma-rvq model.

    Documents come from any datatrove reader (jsonl, csv, parquet, Hugging Face datasets). The audio of a
    document is ``metadata[audio_column]`` (a file path or URL, encoded bytes, a ``{"bytes", "path"}``
    dict as ``Audio(decode=False)`` stores it, or ``{"array", "sampling_rate"}``); a document without
    that key may carry it as an audio ``Media`` (``media_bytes`` or ``path``/``url``).

    Results go into ``metadata`` under the transform's column names: the token string
    (``output_column``), and as asked the codes (``[Q][T]`` lists of ints), the frame count and, with
    ``on_error="skip"``, the error message (``None`` on good rows). ``on_error="raise"`` fails the task
    with the transform's message naming the document id (datatrove then leaves the task incomplete, so a
    re-run redoes it); with ``"skip"`` the row is kept with an empty token string and counted under
    ``errors`` in the stats.

    Args:
        tokenizer: a :class:`~gemma_rvq.transforms.SpeechTokenizer`, or what its first argument takes (a
            checkpoint folder or Hub id), in which case ``tokenizer_kwargs`` build one. It travels to
            each task in its pickled form (model identity, format, options: never the weights) and loads
            the model once per task process, on the task's GPU when there is one. A model given as an
            object cannot reach other processes: save it and pass the folder.
        batch_size: documents per tokenizer call, as ``map(batch_size=...)``: each call sorts its clips by
            length and cuts them into encoder minibatches (``SpeechTokenizer(batch_size=...,
            batch_seconds=..., max_padding=...)``), so larger values pad less.
        audio_root: folder (local or any fsspec URL: ``s3://...``, ``hf://datasets/...``) that relative
            audio paths are read from; ``None``: relative to the task's working directory.
        output_folder: folder of the tokenized dataset: each task writes the token format it used there
            as ``semantic_format.json``, or checks that the one there is the same (a re-run with another
            model or format into the same folder is refused).
        **tokenizer_kwargs: :class:`SpeechTokenizer` options when ``tokenizer`` is not one already.

    Stats: ``documents``, ``errors``, ``audio_seconds``, ``padded_seconds``, ``encode_seconds``,
    ``frames``, and the step's time per batch.
    """

    name = "🗣 gemma-rvq speech tokens"
    type = "🔢 - TOKENIZER"

    def __init__(
        self,
        tokenizer: SpeechTokenizer | str | os.PathLike | None = None,
        *,
        batch_size: int = 1000,
        audio_root: DataFolderLike | None = None,
        output_folder: DataFolderLike | None = None,
        **tokenizer_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(tokenizer, SpeechTokenizer):
            if tokenizer_kwargs:
                raise TypeError(
                    f"options {sorted(tokenizer_kwargs)} go to SpeechTokenizer(...), not beside an existing one"
                )
        else:
            tokenizer = SpeechTokenizer(tokenizer, **tokenizer_kwargs)
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.audio_root = get_datafolder(audio_root) if audio_root is not None else None
        self.output_folder = get_datafolder(output_folder) if output_folder is not None else None
        self._format_checked = False

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data is None:
            return
        device_rank = int(os.environ.get(LOCAL_RANK_ENV, rank))
        batch: list[Document] = []
        for document in data:
            batch.append(document)
            if len(batch) == self.batch_size:
                yield from self._tokenize(batch, device_rank)
                batch = []
        if batch:
            yield from self._tokenize(batch, device_rank)

    # ------------------------------------------------------------------ internals
    def _tokenize(self, documents: list[Document], device_rank: int) -> Iterator[Document]:
        tok = self.tokenizer
        if self.output_folder is not None and not self._format_checked:
            self._check_format_file(device_rank)
        columns: dict[str, list] = {tok.audio_column: [self._audio_of(d) for d in documents]}
        if tok.sampling_rate_column is not None:
            columns[tok.sampling_rate_column] = [d.metadata.get(tok.sampling_rate_column) for d in documents]
        before = {k: tok.stats[k] for k in _COUNTERS}
        with self.track_time("batch"):
            # the map front end's own call: (batch, indices, rank); indices name rows in error messages
            out = tok(columns, [d.id for d in documents], device_rank)
        self.stat_update("documents", value=len(documents), unit="batch")
        for key in _COUNTERS:
            self.stat_update(key, value=tok.stats[key] - before[key], unit="batch")
        if tok.on_error == "skip":
            self.stat_update("errors", value=sum(e is not None for e in out[tok.error_column]), unit="batch")
        if tok.return_num_frames:
            self.stat_update("frames", value=sum(out[tok.num_frames_column]), unit="batch")
        if tok.return_codes:
            out[tok.codes_column] = [codes.tolist() for codes in out[tok.codes_column]]
        for i, document in enumerate(documents):
            for key, values in out.items():
                document.metadata[key] = values[i]
            yield document

    def _audio_of(self, document: Document) -> Any:
        """The audio value of a document, in a form ``SpeechTokenizer`` reads (``None`` if it has none)."""
        value = document.metadata.get(self.tokenizer.audio_column)
        if value is None:
            media = [m for m in document.media if m.type == MediaType.AUDIO] or document.media
            if media:
                value = media[0].media_bytes if media[0].media_bytes is not None else media[0].path or media[0].url
        if isinstance(value, Mapping) and value.get("bytes") is None and value.get("path"):
            value = value["path"]
        if isinstance(value, str):
            value = self._locate(value)
        return value

    def _locate(self, path: str) -> str | bytes:
        """A local path for the tokenizer to read, or the bytes of a remote file. A file that cannot be read
        is passed on as its path, so the tokenizer reports it against its row under the ``on_error`` rule."""
        root = self.audio_root
        if "://" not in path and (os.path.isabs(path) or root is None):
            return path
        if "://" not in path and root.is_local():
            return root.resolve_paths(path)
        try:
            if "://" in path:
                import fsspec

                with fsspec.open(path, "rb") as f:
                    return f.read()
            with root.open(path, "rb") as f:
                return f.read()
        except Exception:  # reported by the tokenizer, which cannot decode it either
            return path if "://" in path else root.resolve_paths(path)

    def _check_format_file(self, device_rank: int) -> None:
        """Write ``semantic_format.json`` to ``output_folder``, or check that the one there matches."""
        tok = self.tokenizer
        fmt = tok._format_for(tok.get_model(device_rank)).to_dict()
        folder = self.output_folder
        if folder.isfile(FORMAT_FILE):
            with folder.open(FORMAT_FILE, "rt") as f:
                found = json.load(f)
            if found != fmt:
                raise ValueError(
                    f"{folder.resolve_paths(FORMAT_FILE)} holds another token format than this run's model and "
                    f"format give ({found.get('name')!r} with {found.get('num_levels')} levels of "
                    f"{found.get('codebook_size')} vs {fmt.get('name')!r} with {fmt.get('num_levels')} of "
                    f"{fmt.get('codebook_size')}): write into a new output folder"
                )
        else:
            # Written under a task-unique name and renamed into place: a task starting meanwhile must never read
            # a half-written file (it did, with 2 local workers: an empty file, a JSONDecodeError).
            partial = f"{FORMAT_FILE}.{os.getpid()}-{device_rank}.partial"
            with folder.open(partial, "wt") as f:
                f.write(json.dumps(fmt, indent=2, sort_keys=True) + "\n")
            folder.mv(partial, FORMAT_FILE)
        self._format_checked = True
