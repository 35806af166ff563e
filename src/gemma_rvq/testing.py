"""Tiny random configurations of the real transformers classes.

Used by the test suite, the offline demo and the benchmarks: nothing here downloads anything. The
models are the real ``transformers`` classes with small sizes and random weights, so every code path
that loads a real checkpoint is exercised on them.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma4AudioConfig,
    HubertConfig,
    Wav2Vec2Config,
    WhisperConfig,
)


def tiny_gemma4_audio_config(hidden_size: int = 64, num_hidden_layers: int = 2, **kwargs) -> Gemma4AudioConfig:
    """A small ``Gemma4AudioConfig``: same front end (128 mel, 4x subsampling, 25 fps), small body.

    ``subsampling_conv_channels[0]`` stays 128: the Gemma 4 audio code assumes it.
    """
    defaults = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        subsampling_conv_channels=[128, 16],
        output_proj_dims=96,
    )
    defaults.update(kwargs)
    return Gemma4AudioConfig(**defaults)


def tiny_hubert_config(hidden_size: int = 32, num_hidden_layers: int = 3, **kwargs) -> HubertConfig:
    """A small ``HubertConfig`` (same 320x conv downsampling: 50 fps at 16 kHz)."""
    defaults = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    defaults.update(kwargs)
    return HubertConfig(**defaults)


def tiny_wav2vec2_config(hidden_size: int = 32, num_hidden_layers: int = 3, **kwargs) -> Wav2Vec2Config:
    """A small ``Wav2Vec2Config`` (50 fps at 16 kHz)."""
    defaults = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    defaults.update(kwargs)
    return Wav2Vec2Config(**defaults)


def tiny_whisper_config(d_model: int = 32, encoder_layers: int = 2, **kwargs) -> WhisperConfig:
    """A small ``WhisperConfig`` (80 mel bins, 30 s windows of 3000 mel frames -> 1500 frames, 50 fps)."""
    defaults = dict(
        d_model=d_model,
        encoder_layers=encoder_layers,
        encoder_attention_heads=2,
        encoder_ffn_dim=2 * d_model,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=2 * d_model,
        num_mel_bins=80,
        max_source_positions=1500,
    )
    defaults.update(kwargs)
    return WhisperConfig(**defaults)


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator, for reproducible random weights and inputs in tests."""
    return torch.Generator().manual_seed(seed)


# --- tiny LLMs and tokenizers built in-process (recipes) -------------------------------------------------

#: A small English/Swahili text used to train the in-process test tokenizers.
TINY_CORPUS: tuple[str, ...] = (
    "Hello, how are you today?",
    "I am fine, thank you. And you?",
    "The weather is warm and the sky is clear.",
    "Please tell me the time of the next train to Mombasa.",
    "The train leaves at seven in the morning.",
    "What is the capital city of Kenya?",
    "Nairobi is the capital city of Kenya.",
    "Translate this sentence into Swahili.",
    "Count from one to ten: one two three four five six seven eight nine ten.",
    "Habari za asubuhi? Nzuri sana, asante.",
    "Jina langu ni Amina na ninatoka Tanzania.",
    "Mji mkuu wa Kenya ni Nairobi.",
    "Leo hali ya hewa ni nzuri na jua linawaka.",
    "Tafadhali niambie saa ngapi treni inaondoka.",
    "Treni inaondoka saa moja asubuhi.",
    "Moja, mbili, tatu, nne, tano, sita, saba, nane, tisa, kumi.",
    "Ninapenda kusoma vitabu na kusikiliza muziki.",
    "She reads a book while he listens to music.",
    "Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] ? ! . , ; :",
)

_LLAMA3_STYLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_GEMMA_STYLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<end_of_turn>\n{% endgeneration %}"
    "{% else %}{{ message['content'] }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def byte_level_bpe_tokenizer(vocab_size: int = 512, extra_texts: list[str] | tuple[str, ...] = ()):
    """A Llama 3 / Qwen style byte-level BPE tokenizer, trained in-process on :data:`TINY_CORPUS`.

    Special tokens ``<|begin_of_text|>`` (bos, prepended by the post-processor), ``<|end_of_text|>``,
    ``<|eot_id|>`` (eos), ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|pad|>`` (pad), left
    padding, and a Llama 3 style chat template with ``{% generation %}`` markers around assistant turns
    (so TRL's ``assistant_only_loss`` works). Returns a ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|pad|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*TINY_CORPUS, *extra_texts], trainer)
    bos_id = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        padding_side="left",
        chat_template=_LLAMA3_STYLE_CHAT_TEMPLATE,
    )
    return tokenizer


def sentencepiece_tokenizer(vocab_size: int = 512, extra_texts: list[str] | tuple[str, ...] = ()):
    """A Gemma style SentencePiece BPE tokenizer (byte fallback), trained in-process on :data:`TINY_CORPUS`.

    The ``.model`` file is written to a temporary directory and loaded with transformers'
    ``GemmaTokenizer`` (which converts it, as for a real Gemma checkpoint): ids ``<pad>`` 0, ``<eos>`` 1,
    ``<bos>`` 2 (prepended), ``<unk>`` 3, ``<mask>`` 4, plus ``<start_of_turn>`` / ``<end_of_turn>`` and
    a Gemma style chat template with ``{% generation %}`` markers. ``vocab_size`` must be >= 300 (the 256
    byte-fallback pieces are part of it).
    """
    import os
    import tempfile

    import sentencepiece as spm
    from transformers import GemmaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([*TINY_CORPUS, *extra_texts] * 4),
            model_prefix=os.path.join(folder, "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
            add_dummy_prefix=False,
            split_by_whitespace=False,
            remove_extra_whitespaces=False,
            hard_vocab_limit=False,
            minloglevel=2,
            num_threads=1,
        )
        tokenizer = GemmaTokenizer.from_pretrained(
            folder, add_bos_token=True, padding_side="left", chat_template=_GEMMA_STYLE_CHAT_TEMPLATE
        )
    return tokenizer


def tiny_llama(tokenizer, hidden_size: int = 64, num_hidden_layers: int = 2, *, tie_word_embeddings: bool = False,
               seed: int = 0, **kwargs):
    """A random ``LlamaForCausalLM`` sized for ``tokenizer`` (special token ids copied into the config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    defaults = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    defaults.update(kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**defaults))
    _sync_generation_config(model, tokenizer)
    return model


def tiny_gemma_lm(tokenizer, hidden_size: int = 64, num_hidden_layers: int = 2, *, seed: int = 0, **kwargs):
    """A random Gemma 3 style ``Gemma3ForCausalLM`` (tied, scaled embeddings, sliding + full attention)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    defaults = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * (num_hidden_layers // 2)
        + ["sliding_attention"] * (num_hidden_layers % 2),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    defaults.update(kwargs)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**defaults))
    _sync_generation_config(model, tokenizer)
    return model


def _sync_generation_config(model, tokenizer) -> None:
    generation_config = model.generation_config
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id


def tiny_rvq_model(
    encoder_family: str = "gemma4_audio",
    num_quantizers: int = 2,
    codebook_size: int = 16,
    seed: int = 0,
    bundle_encoder: bool = True,
    *,
    encoder_path: str | None = None,
    encoder_layer: int | None = None,
    encoder_kwargs: dict | None = None,
    **config_kwargs,
):
    """A ``GemmaRVQModel`` over a tiny random encoder of ``encoder_family``, ready for ``encode``.

    ``dim`` (optional keyword) is the encoder's hidden size (default: the tiny config's). With
    ``bundle_encoder=True`` the encoder is built from an embedded ``encoder_config`` (saved with the RVQ); with ``False`` the tiny encoder and its feature
    extractor are saved to ``encoder_path`` (required) and referenced by path, to be loaded lazily.
    Weights (encoder, projections, codebooks) are seeded by ``seed``.
    """
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Wav2Vec2FeatureExtractor,
        WhisperFeatureExtractor,
    )

    from .configuration_gemma_rvq import GemmaRVQConfig
    from .encoders import build_encoder
    from .modeling_gemma_rvq import GemmaRVQModel

    makers = {
        "gemma4_audio": (tiny_gemma4_audio_config, Gemma4AudioFeatureExtractor, "hidden_size"),
        "hubert": (tiny_hubert_config, Wav2Vec2FeatureExtractor, "hidden_size"),
        "wav2vec2": (tiny_wav2vec2_config, Wav2Vec2FeatureExtractor, "hidden_size"),
        "whisper": (tiny_whisper_config, WhisperFeatureExtractor, "d_model"),
    }
    if encoder_family not in makers:
        raise ValueError(f"unknown encoder family {encoder_family!r}; expected one of {sorted(makers)}")
    make_config, fe_cls, hidden_key = makers[encoder_family]
    encoder_kwargs = dict(encoder_kwargs or {})
    if "dim" in config_kwargs:  # dim is the encoder's hidden size
        encoder_kwargs.setdefault("d_model" if encoder_family == "whisper" else "hidden_size",
                                  config_kwargs.pop("dim"))
    encoder_config = make_config(**encoder_kwargs)
    feature_extractor = fe_cls(feature_size=80) if encoder_family == "whisper" else fe_cls()
    kwargs = dict(
        encoder_family=encoder_family,
        encoder_layer=encoder_layer,
        dim=getattr(encoder_config, hidden_key),
        num_quantizers=num_quantizers,
        codebook_size=codebook_size,
    )
    kwargs.update(config_kwargs)
    if not bundle_encoder and encoder_path is None:
        raise ValueError("bundle_encoder=False needs encoder_path: a directory to save the tiny encoder to")
    with torch.random.fork_rng(devices=[]):  # seeded weights, global RNG state left untouched
        torch.manual_seed(seed)
        if bundle_encoder:
            config = GemmaRVQConfig(
                encoder_name_or_path=None,
                encoder_config=encoder_config.to_dict(),
                feature_extractor_config=feature_extractor.to_dict(),
                **kwargs,
            )
            return GemmaRVQModel(config).eval()
        encoder = build_encoder(encoder_family, encoder_config.to_dict())
        encoder.save_pretrained(encoder_path)
        feature_extractor.save_pretrained(encoder_path)
        config = GemmaRVQConfig(encoder_name_or_path=str(encoder_path), **kwargs)
        return GemmaRVQModel(config).eval()


def toy_semantic_pairs(token_format="gemma_rvq", num_rows: int = 20, *, min_frames: int = 3, max_frames: int = 6,
                       seed: int = 0, texts: list[str] | tuple[str, ...] | None = None):
    """A ``datasets.Dataset`` of ``num_rows`` (``text``, ``semantic_tokens``) pairs: a fixed random mapping.

    Each text of :data:`TINY_CORPUS` (cycled) gets random codes ``[Q, T]`` (``Q`` = the format's
    ``num_levels``, ``T`` in ``[min_frames, max_frames]``, codes below ``codebook_size``) rendered with
    ``token_format``: what ``tokenize_speech`` would emit, without audio; the dataset carries the format
    (``gemma_rvq.formats.attach_format``). For recipe tests and demos.
    """
    import numpy as np
    from datasets import Dataset

    from .tokens import get_format

    fmt = get_format(token_format)
    rng = np.random.default_rng(seed)
    source = list(texts or TINY_CORPUS)
    rows_text, rows_tokens = [], []
    for index in range(num_rows):
        frames = int(rng.integers(min_frames, max_frames + 1))
        codes = rng.integers(0, fmt.codebook_size, size=(fmt.num_levels or 1, frames))
        rows_text.append(source[index % len(source)] if index < len(source) else f"{source[index % len(source)]} ({index})")
        rows_tokens.append(fmt.render(codes))
    from .formats import attach_format

    return attach_format(Dataset.from_dict({"text": rows_text, "semantic_tokens": rows_tokens}), fmt)


def tiny_gemma4_multimodal(tokenizer=None, hidden_size: int = 64, num_hidden_layers: int = 2, *,
                           audio_config=None, audio_hidden_size: int = 64, hidden_size_per_layer_input: int = 16,
                           seed: int = 0, **text_kwargs):
    """A random ``Gemma4ForConditionalGeneration`` with a tiny audio tower and no vision tower.

    The text model is sized for ``tokenizer`` (``len(tokenizer)`` rows, special ids copied; 512 rows and
    Gemma's ids 0/1/2 without one), has tied, ``sqrt(hidden_size)``-scaled embeddings and per-layer
    embeddings (PLE, ``hidden_size_per_layer_input`` per layer), like the real Gemma 4. The audio tower is
    ``audio_config`` (e.g. a tiny RVQ's ``Gemma4AudioConfig``) or :func:`tiny_gemma4_audio_config` with
    ``audio_hidden_size``: the size of the frames the RVQ quantizes (the input of ``output_proj``).
    """
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    vocab_size = len(tokenizer) if tokenizer is not None else 512
    special = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if tokenizer is not None:
        special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    text_defaults = dict(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        global_head_dim=32,
        hidden_size_per_layer_input=hidden_size_per_layer_input,
        sliding_window=64,
        layer_types=["sliding_attention"] * (num_hidden_layers - 1) + ["full_attention"],
        max_position_embeddings=2048,
        **special,
    )
    text_defaults.update(text_kwargs)
    if audio_config is None:
        audio_config = tiny_gemma4_audio_config(hidden_size=audio_hidden_size)
    elif isinstance(audio_config, dict):
        audio_config = Gemma4AudioConfig(**{k: v for k, v in audio_config.items() if k != "model_type"})
    config = Gemma4Config(text_config=Gemma4TextConfig(**text_defaults), audio_config=audio_config,
                          vision_config=None)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()
    if tokenizer is not None:
        _sync_generation_config(model, tokenizer)
    return model
