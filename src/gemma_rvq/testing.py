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
