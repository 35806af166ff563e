"""Stage 2 / stage 3 recipes: data builders, prompt templates, SFT glue for TRL, semantic generation.

- :mod:`.data`        ``build_speechless_dataset``, ``build_speech_instruct_dataset``, ``build_asr_dataset``
- :mod:`.templates`   ``PromptTemplate``, ``TEMPLATES``, ``get_template``
- :mod:`.sft`         ``SemanticSFTArguments``, ``run_sft`` (``examples/sft.py``), ``load_sft_model``
- :mod:`.generation`  ``generate_semantic_tokens`` / ``generate_semantic_dataset`` (``examples/generate_semantic.py``)
"""

from __future__ import annotations

from ..extras import require

# before the submodules import trl: a missing extra is named, not a bare ModuleNotFoundError
require("trl", "gemma_rvq.recipes (stage 2/3 SFT)")
require("peft", "gemma_rvq.recipes (stage 2/3 SFT)")

from .data import (
    RECIPES,
    build_asr_dataset,
    build_recipe_dataset,
    build_speech_instruct_dataset,
    build_speechless_dataset,
)
from .generation import (
    SemanticVocabularyLogitsProcessor,
    generate_semantic_dataset,
    generate_semantic_tokens,
    semantic_token_ids,
)
from .sft import (
    RECIPE_FILE,
    SemanticSFTArguments,
    build_sft_trainer,
    drop_long_examples,
    load_raw_dataset,
    load_sft_dataset,
    load_sft_model,
    patch_trainable_tokens_head,
    prepare_semantic_tokens,
    resolve_token_format,
    run_sft,
    semantic_peft_config,
)
from .templates import TEMPLATES, PromptTemplate, get_template

__all__ = [
    "RECIPES",
    "RECIPE_FILE",
    "TEMPLATES",
    "PromptTemplate",
    "SemanticSFTArguments",
    "SemanticVocabularyLogitsProcessor",
    "build_asr_dataset",
    "build_recipe_dataset",
    "build_sft_trainer",
    "build_speech_instruct_dataset",
    "build_speechless_dataset",
    "drop_long_examples",
    "generate_semantic_dataset",
    "generate_semantic_tokens",
    "get_template",
    "load_raw_dataset",
    "load_sft_dataset",
    "load_sft_model",
    "patch_trainable_tokens_head",
    "prepare_semantic_tokens",
    "resolve_token_format",
    "run_sft",
    "semantic_peft_config",
    "semantic_token_ids",
]
