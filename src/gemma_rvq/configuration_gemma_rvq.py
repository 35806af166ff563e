"""Configuration of the gemma-rvq speech tokenizer.

This file is copied next to saved checkpoints (remote code): it imports only transformers at module level.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig

#: encoder family -> ``model_type`` of its transformers config.
ENCODER_MODEL_TYPES: dict[str, str] = {
    "gemma4_audio": "gemma4_audio",
    "hubert": "hubert",
    "wav2vec2": "wav2vec2",
    "whisper": "whisper",
}
CODEBOOK_TYPES = ("ema", "learnable")
#: Whisper's encoder only takes fixed 30 s windows (3000 mel frames).
WHISPER_WINDOW_SECONDS = 30.0


class GemmaRVQConfig(PreTrainedConfig):
    r"""Configuration of [`GemmaRVQModel`]: a frozen speech encoder followed by a residual vector quantizer.

    The defaults reproduce the seed model: the Gemma 4 audio encoder (`rnagabh/gemma4-audio-encoder`) read
    before its `output_proj` (1024-d, 25 frames per second), LayerNorm -> Linear(1024, 1024) into an 8-level
    residual quantizer with 2048 codes per level, then LayerNorm -> Linear(1024, 1024) back to the encoder space.

    Args:
        encoder_family (`str`, defaults to `"gemma4_audio"`):
            One of `"gemma4_audio"`, `"hubert"`, `"wav2vec2"`, `"whisper"`.
        encoder_name_or_path (`str`, *optional*, defaults to `"rnagabh/gemma4-audio-encoder"`):
            Hub id or local directory of the encoder, loaded lazily on the first call to `embed` when the
            encoder is not bundled. A checkpoint that only references its encoder stays quantizer-only.
        encoder_revision (`str`, *optional*):
            Revision of `encoder_name_or_path` to load.
        encoder_config (`dict`, *optional*):
            The encoder's own config (`to_dict()` of a `Gemma4AudioConfig`, `HubertConfig`, `Wav2Vec2Config`
            or `WhisperConfig`). When set, the encoder is built from it and its weights are saved in the same
            safetensors file as the quantizer (`encoder.*` keys).
        encoder_layer (`int`, *optional*):
            Which hidden state of the encoder to quantize: the raw output of layer k (0 = the input of the
            first layer), i.e. `hidden_states[k]` with `tie_last_hidden_states=False` (no final LayerNorm).
            `None` = the encoder's final output (`last_hidden_state`; for Gemma 4 the input of
            `output_proj`). Layers above it are never run.
        feature_extractor_config (`dict`, *optional*):
            `to_dict()` of the encoder's feature extractor. `None`: loaded from `encoder_name_or_path`, or the
            family's default feature extractor.
        dim (`int`, defaults to 1024): size D of the encoder embeddings (the encoder's hidden size).
        codebook_dim (`int`, *optional*): size Dc of the quantized space; `None` -> `dim`.
        num_quantizers (`int`, defaults to 8): number Q of residual levels.
        codebook_size (`int`, defaults to 2048): number K of codes per level.
        use_projection (`bool`, defaults to `True`):
            LayerNorm + Linear(D, Dc) before the quantizer and LayerNorm + Linear(Dc, D) after it. With `False`
            both are identities and `codebook_dim` must equal `dim`.
        codebook_type (`str`, defaults to `"ema"`): `"ema"` (codebooks are buffers updated by exponential
            moving averages) or `"learnable"` (codebooks are parameters trained by gradient).
        ema_decay (`float`, defaults to 0.99): decay of the EMA codebook statistics.
        commitment_weight (`float`, defaults to 0.25): weight of the commitment loss in `forward`.
        mse_weight (`float`, defaults to 0.5): weight of the reconstruction MSE in `forward`.
        cosine_weight (`float`, defaults to 0.5): weight of the reconstruction `1 - cosine` in `forward`.
        dead_code_threshold (`float`, defaults to 1.0): EMA cluster size below which a code counts as dead.
        balance_weight (`float`, defaults to 0.0): usage-balanced EMA statistics in training (EMA codebooks
            only; 0 = plain nearest-code EMA, as vector-quantize-pytorch). Each training frame updates
            `argmin_k |r - c_k|^2 + balance_weight * D_l * log(K p_k)` (`p_k` the code's EMA usage share,
            `D_l` the level's mean squared error), which evens out code usage; inference is unaffected.
            In `benchmarks/bench_train.py`, 1.0 raised held-out utilization and perplexity on levels 1-3
            (deep levels unchanged within noise, dev FVU unchanged); with 4x more codes, on every level.
        search_chunk_size (`int`, defaults to 1024): rows per chunk of the nearest-code search.
        max_chunk_seconds (`float`, defaults to 30.0): audio longer than this is encoded in overlapping
            windows and stitched by frame position (Whisper: at most 30).
        chunk_overlap_seconds (`float`, defaults to 4.0): overlap between consecutive windows (at least 4
            frames). Seams sit in the middle of each overlap, or for Gemma 4 (whose layers only look back)
            near the end of the earlier window, so frames keep as much context as possible.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the projection LayerNorms.
        initializer_range (`float`, defaults to 0.02): std of the random init of the projections.
    """

    model_type = "gemma_rvq"

    encoder_family: str = "gemma4_audio"
    encoder_name_or_path: str | None = "rnagabh/gemma4-audio-encoder"
    encoder_revision: str | None = None
    encoder_config: dict | None = None
    encoder_layer: int | None = None
    feature_extractor_config: dict | None = None
    dim: int = 1024
    codebook_dim: int | None = None
    num_quantizers: int = 8
    codebook_size: int = 2048
    use_projection: bool = True
    codebook_type: str = "ema"
    ema_decay: float = 0.99
    commitment_weight: float = 0.25
    mse_weight: float = 0.5
    cosine_weight: float = 0.5
    dead_code_threshold: float = 1.0
    balance_weight: float = 0.0
    search_chunk_size: int = 1024
    max_chunk_seconds: float = 30.0
    chunk_overlap_seconds: float = 4.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        if self.encoder_config is not None and not isinstance(self.encoder_config, dict):
            if hasattr(self.encoder_config, "to_dict"):  # a transformers config object
                self.encoder_config = self.encoder_config.to_dict()
            else:
                raise ValueError(
                    f"encoder_config must be a dict or a transformers config, got {type(self.encoder_config)}"
                )
        if self.feature_extractor_config is not None:
            fe = self.feature_extractor_config
            if not isinstance(fe, dict):
                if not hasattr(fe, "to_dict"):
                    raise ValueError("feature_extractor_config must be a dict or a feature extractor")
                fe = fe.to_dict()
            # Derived arrays (mel filters, windows) are recomputed by the feature extractor: keep JSON only.
            self.feature_extractor_config = {
                k: v for k, v in fe.items() if not hasattr(v, "shape") and k not in ("mel_filters", "window")
            }
        if self.codebook_dim is None:
            self.codebook_dim = self.dim
        super().__post_init__(**kwargs)
        self.check()

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Raise ``ValueError`` naming the first invalid field (also run after every construction)."""
        if self.encoder_family not in ENCODER_MODEL_TYPES:
            raise ValueError(
                f"encoder_family must be one of {sorted(ENCODER_MODEL_TYPES)}, got {self.encoder_family!r}"
            )
        if self.encoder_config is not None:
            model_type = self.encoder_config.get("model_type")
            expected = ENCODER_MODEL_TYPES[self.encoder_family]
            if model_type != expected:
                raise ValueError(
                    f"encoder_config has model_type {model_type!r} but encoder_family {self.encoder_family!r} "
                    f"needs {expected!r}"
                )
            hidden = self.encoder_hidden_size
            if hidden is not None and hidden != self.dim:
                raise ValueError(
                    f"dim={self.dim} does not match the encoder's hidden size {hidden} (encoder_config)"
                )
        for name in ("dim", "codebook_dim", "num_quantizers", "search_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.codebook_size, int) or self.codebook_size < 2:
            raise ValueError(f"codebook_size must be an int >= 2, got {self.codebook_size!r}")
        if not self.use_projection and self.codebook_dim != self.dim:
            raise ValueError(
                f"use_projection=False needs codebook_dim == dim, got codebook_dim={self.codebook_dim}, "
                f"dim={self.dim}"
            )
        if self.codebook_type not in CODEBOOK_TYPES:
            raise ValueError(f"codebook_type must be one of {CODEBOOK_TYPES}, got {self.codebook_type!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        for name in ("commitment_weight", "mse_weight", "cosine_weight", "dead_code_threshold", "balance_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.balance_weight > 0 and self.codebook_type != "ema":
            raise ValueError(f"balance_weight applies to EMA codebooks only, got codebook_type={self.codebook_type!r}")
        if self.mse_weight + self.cosine_weight <= 0:
            raise ValueError("mse_weight + cosine_weight must be > 0 (the loss would ignore reconstruction)")
        if self.encoder_layer is not None:
            if not isinstance(self.encoder_layer, int) or self.encoder_layer < 0:
                raise ValueError(f"encoder_layer must be None or an int >= 0, got {self.encoder_layer!r}")
            layers = self.encoder_num_layers
            if layers is not None and self.encoder_layer > layers:
                raise ValueError(f"encoder_layer={self.encoder_layer} but the encoder has only {layers} layers")
        if not math.isfinite(self.max_chunk_seconds) or self.max_chunk_seconds <= 0:
            raise ValueError(f"max_chunk_seconds must be > 0, got {self.max_chunk_seconds}")
        if self.encoder_family == "whisper" and self.max_chunk_seconds > WHISPER_WINDOW_SECONDS:
            raise ValueError(
                f"max_chunk_seconds={self.max_chunk_seconds} exceeds Whisper's fixed {WHISPER_WINDOW_SECONDS} s window"
            )
        if not 0 <= self.chunk_overlap_seconds <= self.max_chunk_seconds / 2:
            raise ValueError(
                f"chunk_overlap_seconds must be in [0, max_chunk_seconds / 2], got {self.chunk_overlap_seconds}"
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    # ------------------------------------------------------------------ derived properties
    @property
    def bundles_encoder(self) -> bool:
        """True when the encoder's weights live in this checkpoint (``encoder_config`` is set)."""
        return self.encoder_config is not None

    @property
    def encoder_hidden_size(self) -> int | None:
        """Hidden size of the encoder described by ``encoder_config`` (``None`` when not bundled)."""
        if self.encoder_config is None:
            return None
        key = "d_model" if self.encoder_family == "whisper" else "hidden_size"
        return self.encoder_config.get(key)

    @property
    def encoder_num_layers(self) -> int | None:
        """Number of encoder layers described by ``encoder_config`` (``None`` when not bundled)."""
        if self.encoder_config is None:
            return None
        key = "encoder_layers" if self.encoder_family == "whisper" else "num_hidden_layers"
        return self.encoder_config.get(key)

    @property
    def sampling_rate(self) -> int:
        """Sampling rate (Hz) the encoder expects: 16000 for every supported family."""
        if self.feature_extractor_config and "sampling_rate" in self.feature_extractor_config:
            return int(self.feature_extractor_config["sampling_rate"])
        return 16000

    @property
    def samples_per_frame(self) -> int:
        """Input samples per output frame (the encoder's total stride).

        Gemma 4 audio: 10 ms mel hop x 4 (two stride-2 convolutions) = 640 samples at 16 kHz.
        HuBERT / wav2vec2: product of ``conv_stride`` (5*2*2*2*2*2*2 = 320). Whisper: 10 ms hop x 2 = 320.
        """
        hop = round(self.sampling_rate / 100)  # 10 ms mel hop of the Gemma 4 and Whisper front ends
        if self.encoder_family == "gemma4_audio":
            return hop * 4
        if self.encoder_family == "whisper":
            return hop * 2
        strides = (self.encoder_config or {}).get("conv_stride", (5, 2, 2, 2, 2, 2, 2))
        return int(math.prod(strides))

    @property
    def min_samples(self) -> int:
        """Fewest input samples (at `sampling_rate`) that give one output frame; shorter audio is rejected.

        Gemma 4 / Whisper: one frame's worth (`samples_per_frame`). HuBERT / wav2vec2: the receptive field
        of the convolutional front end (400 samples = 25 ms with the standard kernels).
        """
        if self.encoder_family in ("gemma4_audio", "whisper"):
            return self.samples_per_frame
        enc = self.encoder_config or {}
        kernels = enc.get("conv_kernel", (10, 3, 3, 3, 3, 2, 2))
        strides = enc.get("conv_stride", (5, 2, 2, 2, 2, 2, 2))
        field = 1
        for kernel, stride in zip(reversed(kernels), reversed(strides)):
            field = (field - 1) * stride + kernel
        return int(field)

    @property
    def frame_rate(self) -> float:
        """Output frames per second: 25 for Gemma 4 audio, 50 for HuBERT / wav2vec2 / Whisper."""
        return self.sampling_rate / self.samples_per_frame


__all__ = ["GemmaRVQConfig"]
