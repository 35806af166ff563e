"""Tokenize corpora that outgrow one machine: a datatrove pipeline step and its local, Slurm and Ray runs.

    from datatrove.pipeline.readers import JsonlReader
    from gemma_rvq import SpeechTokenizer
    from gemma_rvq.cluster import SpeechTokenizerStep, TokenizedParquetWriter, audio_row_adapter, make_executor

    tok = SpeechTokenizer("my-org/my-gemma-rvq", format="ichigo", on_error="skip")
    pipeline = [
        JsonlReader("manifests/", adapter=audio_row_adapter),
        SpeechTokenizerStep(tok, audio_root="audio/", output_folder="tokens/"),
        TokenizedParquetWriter("tokens/data", tok, audio_column=tok.audio_column),
    ]
    make_executor("local", pipeline, tasks=8, workers=2, logging_dir="tokens/logs").run()

Needs the ``cluster`` extra (``pip install 'gemma-rvq[cluster]'``; ``[ray]`` for the Ray executor).
``gemma_rvq.cluster.launch`` (the ``gemma-rvq tokenize --executor`` command) imports without it.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "SpeechTokenizerStep": "step",
    "audio_row_adapter": "step",
    "FORMAT_FILE": "step",
    "TokenizedParquetWriter": "output",
    "write_dataset_card": "output",
    "AudioDatasetReader": "readers",
    "LocalExecutor": "executors",
    "build_pipeline": "launch",
    "make_executor": "executors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    from ..extras import require

    require("datatrove", f"gemma_rvq.cluster.{name}")

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
