"""gemma-rvq: speech -> discrete semantic tokens for LLMs, as a Hugging Face plugin.

Importing the package registers ``GemmaRVQConfig`` / ``GemmaRVQModel`` with the transformers Auto
classes, so ``AutoModel.from_pretrained(<gemma-rvq checkpoint>)`` works. Everything else is imported
lazily on first attribute access, to keep ``import gemma_rvq`` cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from transformers import AutoConfig, AutoModel

from .configuration_gemma_rvq import GemmaRVQConfig
from .modeling_gemma_rvq import GemmaRVQModel

__version__ = "0.1.0"

AutoConfig.register(GemmaRVQConfig.model_type, GemmaRVQConfig, exist_ok=True)
AutoModel.register(GemmaRVQConfig, GemmaRVQModel, exist_ok=True)
# save_pretrained then copies the modeling files and writes auto_map, so checkpoints also load with
# trust_remote_code=True where gemma-rvq is not installed.
GemmaRVQConfig.register_for_auto_class()
GemmaRVQModel.register_for_auto_class("AutoModel")


def _register_pipelines() -> None:
    # pipeline("speech-instruct", model=stage3_dir): speech in, the stage-3 LLM's answer out
    from .pipelines import register

    register()


_register_pipelines()

# public name -> submodule that defines it
_LAZY = {
    "ResidualQuantizer": "quantization",
    "SemanticTokenFormat": "tokens",
    "ParsedTokens": "tokens",
    "get_format": "tokens",
    "tokenize_speech": "transforms",
    "SpeechTokenizer": "transforms",
    "add_semantic_tokens": "llm",
    "audio_code_embeddings": "llm",
    "load_any": "convert",
    "build_interleaved_dataset": "recipes.interleave",
    "SemanticGrammarLogitsProcessor": "grammar",
    "SpeechInstructPipeline": "pipelines",
    "resolve_format": "formats",
}

__all__ = ["GemmaRVQConfig", "GemmaRVQModel", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'gemma_rvq' has no attribute {name!r}")
