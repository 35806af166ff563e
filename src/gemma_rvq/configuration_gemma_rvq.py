"""Configuration of the gemma-rvq speech tokenizer, and the frame arithmetic of each encoder family.

This file is copied next to saved checkpoints (remote code): at module level it imports only its flat
sibling ``bounds``, transformers and huggingface_hub (a dependency of transformers).

Frame arithmetic (one source: `ENCODER_FAMILIES` below, resolved by `encoder_frames`), at 16 kHz:

| family | samples per frame | frame rate | minimum samples | lookahead |
|---|---|---|---|---|
| `gemma4_audio` | 640 | 25 /s | 640 (one frame) | 4 frames (+ `attention_context_right` per layer) |
| `hubert`, `wav2vec2` | 320 (product of `conv_stride`) | 50 /s | 400 (receptive field of the convolutions) | bidirectional |
| `whisper` | 320 | 50 /s | 320 (one frame) | bidirectional (30 s windows) |
"""

import math
import os
from dataclasses import dataclass
from typing import Any

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassError
from transformers import FeatureExtractionMixin, PreTrainedConfig

from .bounds import CODEBOOK_TYPES, check_codebook_type, validator


@dataclass(frozen=True)
class EncoderFamily:
    """How an encoder family turns samples into frames (one row of `ENCODER_FAMILIES`).

    Args:
        model_type: ``model_type`` of the encoder's transformers config.
        front_end: ``"mel"``: mel frames every ``mel_hop_seconds``, mel frame ``i`` valid when
            ``i * hop < samples - mel_lead_seconds * sampling_rate``, then ``subsampling`` mel frames per output
            frame (stride-2 convolutions over a prefix mask: a ceiling). ``"conv"``: a convolutional feature
            encoder (``conv_kernel`` / ``conv_stride``; a bundled encoder config's own values win).
        lookahead_frames: frames after a frame that it depends on; ``None``: bidirectional (the whole window).
        lookahead_per_layer: encoder config key adding right context (in frames) per kept layer.
        window_seconds: the fixed input window of the encoder (Whisper: 30 s); ``None``: any length.
    """

    model_type: str
    front_end: str
    mel_hop_seconds: float = 0.01
    mel_lead_seconds: float = 0.0
    subsampling: int = 1
    conv_kernel: tuple[int, ...] = ()
    conv_stride: tuple[int, ...] = ()
    lookahead_frames: int | None = None
    lookahead_per_layer: str | None = None
    window_seconds: float | None = None


_W2V_CONV = {"conv_kernel": (10, 3, 3, 3, 3, 2, 2), "conv_stride": (5, 2, 2, 2, 2, 2, 2)}

#: encoder family -> frame arithmetic. Gemma 4: 20 ms STFT frames, semicausal padding (a mel frame needs
#: 10 ms of audio after its start), 10 ms hop, two stride-2 convolutions (3x3, padding 1: 4 mel frames of
#: lookahead), causal conformer (`attention_context_right` extra frames per layer, 0 by default).
#: Whisper: centred 10 ms mel frames, one stride-2 convolution, fixed 30 s windows.
ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    "gemma4_audio": EncoderFamily(
        "gemma4_audio", "mel", mel_lead_seconds=0.01, subsampling=4, lookahead_frames=4,
        lookahead_per_layer="attention_context_right",
    ),
    "hubert": EncoderFamily("hubert", "conv", **_W2V_CONV),
    "wav2vec2": EncoderFamily("wav2vec2", "conv", **_W2V_CONV),
    "whisper": EncoderFamily("whisper", "mel", subsampling=2, window_seconds=30.0),
}
#: encoder family -> ``model_type`` of its transformers config.
ENCODER_MODEL_TYPES: dict[str, str] = {family: spec.model_type for family, spec in ENCODER_FAMILIES.items()}
#: Whisper's encoder only takes fixed 30 s windows (3000 mel frames).
WHISPER_WINDOW_SECONDS = ENCODER_FAMILIES["whisper"].window_seconds


def _ceil_div(a: Any, b: int) -> Any:
    """``ceil(a / b)`` for ints and integer tensors alike (floor division only: traceable, no branches)."""
    return -((-a) // b)


def _clamp_min0(x: Any) -> Any:
    return x.clamp(min=0) if hasattr(x, "clamp") else max(x, 0)


@dataclass(frozen=True)
class EncoderFrames:
    """The frame arithmetic of one encoder, resolved at its sampling rate (see `encoder_frames`).

    Attributes:
        family: the encoder family.
        sampling_rate: input samples per second.
        samples_per_frame: input samples per output frame (the encoder's total stride).
        min_samples: fewest input samples accepted (shorter audio is refused).
        lookahead_frames: output frames after a frame that it depends on; ``None``: bidirectional.
        window_samples: the encoder's fixed input window in samples (Whisper), ``None``: any length.
    """

    family: str
    sampling_rate: int
    samples_per_frame: int
    min_samples: int
    lookahead_frames: int | None
    window_samples: int | None
    _hop: int = 0
    _lead: int = 0
    _subsampling: int = 1
    _conv: tuple[tuple[int, int], ...] = ()

    @property
    def frame_rate(self) -> float:
        """Output frames per second."""
        return self.sampling_rate / self.samples_per_frame

    def get_encoded_length(self, num_samples: Any) -> Any:
        """Number of output frames for ``num_samples`` input samples (an int, or an integer tensor of any
        shape, computed element-wise). Long audio windowed by the encoder adapter gives the same count."""
        if self._conv:
            length = num_samples
            for kernel, stride in self._conv:
                length = (length - kernel) // stride + 1
            return _clamp_min0(length)
        valid_mel = _clamp_min0(_ceil_div(num_samples - self._lead, self._hop))
        return _ceil_div(valid_mel, self._subsampling)


def encoder_frames(
    family: str, sampling_rate: int = 16000, encoder_config: dict[str, Any] | None = None,
    num_layers: int | None = None,
) -> EncoderFrames:
    """Resolve the frame arithmetic of ``family`` at ``sampling_rate``.

    Args:
        encoder_config: the encoder's config dict, when known (its ``conv_kernel`` / ``conv_stride`` and
            per-layer lookahead are used).
        num_layers: encoder layers actually run (for the per-layer lookahead); default: all of them.
    """
    if family not in ENCODER_FAMILIES:
        raise ValueError(f"encoder_family must be one of {sorted(ENCODER_FAMILIES)}, got {family!r}")
    spec = ENCODER_FAMILIES[family]
    enc = encoder_config or {}
    window = None if spec.window_seconds is None else round(spec.window_seconds * sampling_rate)
    if spec.front_end == "conv":
        kernels = tuple(enc.get("conv_kernel") or spec.conv_kernel)
        strides = tuple(enc.get("conv_stride") or spec.conv_stride)
        field = 1
        for kernel, stride in zip(reversed(kernels), reversed(strides)):
            field = (field - 1) * stride + kernel
        return EncoderFrames(
            family, sampling_rate, math.prod(strides), field, spec.lookahead_frames, window,
            _conv=tuple(zip(kernels, strides)),
        )
    hop = round(sampling_rate * spec.mel_hop_seconds)
    lookahead = spec.lookahead_frames
    if lookahead is not None and spec.lookahead_per_layer:
        layers = num_layers if num_layers is not None else enc.get("num_hidden_layers", 0)
        lookahead += int(enc.get(spec.lookahead_per_layer) or 0) * int(layers or 0)
    spf = hop * spec.subsampling
    return EncoderFrames(
        family, sampling_rate, spf, spf, lookahead, window,
        _hop=hop, _lead=round(sampling_rate * spec.mel_lead_seconds), _subsampling=spec.subsampling,
    )


def _check_family(value: Any) -> None:
    if value not in ENCODER_FAMILIES:
        raise ValueError(f"encoder_family must be one of {sorted(ENCODER_FAMILIES)}, got {value!r}")


def _bounded(name: str, default: Any) -> Any:
    """A config field checked against `bounds.BOUNDS[name]` whenever it is set."""
    return validated_field(validator(name), default=default)


@strict
class GemmaRVQConfig(PreTrainedConfig):
    r"""Configuration of [`GemmaRVQModel`]: a frozen speech encoder followed by a residual vector quantizer.

    The defaults reproduce the seed model: the Gemma 4 audio encoder (`rnagabh/gemma4-audio-encoder`) read
    before its `output_proj` (1024-d, 25 frames per second), LayerNorm -> Linear(1024, 1024) into an 8-level
    residual quantizer with 2048 codes per level, then LayerNorm -> Linear(1024, 1024) back to the encoder space.

    Validation follows transformers' `@strict` configs: every field is type-checked and range-checked
    (`bounds.BOUNDS`, the same table `ResidualQuantizer` checks) whenever it is set, and `validate_architecture`
    checks the fields against each other after construction and before saving. Errors name the field
    (`huggingface_hub.errors.StrictDataclassError`); loading a config.json (`from_pretrained`, `from_dict`,
    `from_json_file`) raises a `ValueError` that also names the file.

    Args:
        encoder_family (`str`, defaults to `"gemma4_audio"`):
            One of `"gemma4_audio"`, `"hubert"`, `"wav2vec2"`, `"whisper"` (see `ENCODER_FAMILIES`).
        encoder_name_or_path (`str`, *optional*, defaults to `"rnagabh/gemma4-audio-encoder"`):
            Hub id or local directory of the encoder, loaded lazily on the first call to `embed` when the
            encoder is not bundled. A checkpoint that only references its encoder stays quantizer-only.
        encoder_revision (`str`, *optional*):
            Revision of `encoder_name_or_path` to load.
        encoder_config (`dict`, *optional*):
            The encoder's own config (`to_dict()` of a `Gemma4AudioConfig`, `HubertConfig`, `Wav2Vec2Config`
            or `WhisperConfig`; a config object is converted). When set, the encoder is built from it and its
            weights are saved in the same safetensors file as the quantizer (`encoder.*` keys).
        encoder_layer (`int`, *optional*):
            Which hidden state of the encoder to quantize: the raw output of layer k (0 = the input of the
            first layer), i.e. `hidden_states[k]` with `tie_last_hidden_states=False` (no final LayerNorm).
            `None` = the encoder's final output (`last_hidden_state`; for Gemma 4 the input of
            `output_proj`). Layers above it are never run.
        feature_extractor_config (`dict`, *optional*):
            `to_dict()` of the encoder's feature extractor (an object is converted). `None`: loaded from
            `encoder_name_or_path`, or the family's default feature extractor.
        dim (`int`, defaults to 1024): size D of the encoder embeddings (the encoder's hidden size).
        codebook_dim (`int`, *optional*): size Dc of the quantized space; `None` -> `dim`.
        num_quantizers (`int`, defaults to 8): number Q of residual levels.
        codebook_size (`int`, defaults to 2048): number K of codes per level (at least 2).
        use_projection (`bool`, defaults to `True`):
            LayerNorm + Linear(D, Dc) before the quantizer and LayerNorm + Linear(Dc, D) after it. With `False`
            both are identities and `codebook_dim` must equal `dim`.
        codebook_type (`str`, defaults to `"ema"`): `"ema"` (codebooks are buffers updated by exponential
            moving averages) or `"learnable"` (codebooks are parameters trained by gradient).
        ema_decay (`float`, defaults to 0.99): decay of the EMA codebook statistics, in [0, 1).
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

    encoder_family: str = validated_field(_check_family, default="gemma4_audio")
    encoder_name_or_path: str | None = "rnagabh/gemma4-audio-encoder"
    encoder_revision: str | None = None
    encoder_config: dict | PreTrainedConfig | None = None
    encoder_layer: int | None = _bounded("encoder_layer", None)
    feature_extractor_config: dict | FeatureExtractionMixin | None = None
    dim: int = _bounded("dim", 1024)
    codebook_dim: int | None = _bounded("codebook_dim", None)
    num_quantizers: int = _bounded("num_quantizers", 8)
    codebook_size: int = _bounded("codebook_size", 2048)
    use_projection: bool = True
    codebook_type: str = validated_field(check_codebook_type, default="ema")
    ema_decay: float | int = _bounded("ema_decay", 0.99)
    commitment_weight: float | int = _bounded("commitment_weight", 0.25)
    mse_weight: float | int = _bounded("mse_weight", 0.5)
    cosine_weight: float | int = _bounded("cosine_weight", 0.5)
    dead_code_threshold: float | int = _bounded("dead_code_threshold", 1.0)
    balance_weight: float | int = _bounded("balance_weight", 0.0)
    search_chunk_size: int = _bounded("search_chunk_size", 1024)
    max_chunk_seconds: float | int = _bounded("max_chunk_seconds", 30.0)
    chunk_overlap_seconds: float | int = _bounded("chunk_overlap_seconds", 4.0)
    layer_norm_eps: float | int = _bounded("layer_norm_eps", 1e-5)
    initializer_range: float | int = _bounded("initializer_range", 0.02)

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.encoder_config, PreTrainedConfig):
            self.encoder_config = self.encoder_config.to_dict()
        if self.feature_extractor_config is not None:
            fe = self.feature_extractor_config
            if not isinstance(fe, dict):
                fe = fe.to_dict()
            # Derived arrays (mel filters, windows) are recomputed by the feature extractor: keep JSON only.
            self.feature_extractor_config = {
                k: v for k, v in fe.items() if not hasattr(v, "shape") and k not in ("mel_filters", "window")
            }
        if self.codebook_dim is None:
            self.codebook_dim = self.dim
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------ validation (@strict)
    def validate_architecture(self) -> None:
        """Part of `@strict` validation: the fields against each other (each field's own range is checked
        when it is set)."""
        super().validate_architecture()
        if self.encoder_config is not None:
            model_type = self.encoder_config.get("model_type")
            expected = ENCODER_MODEL_TYPES[self.encoder_family]
            if model_type != expected:
                raise ValueError(f"encoder_config has model_type {model_type!r} but encoder_family "
                                 f"{self.encoder_family!r} needs {expected!r}")
            if self.encoder_hidden_size is not None and self.encoder_hidden_size != self.dim:
                raise ValueError(f"dim={self.dim} does not match the encoder's hidden size {self.encoder_hidden_size} "
                                 "(encoder_config)")
            layers = self.encoder_num_layers
            if self.encoder_layer is not None and layers is not None and self.encoder_layer > layers:
                raise ValueError(f"encoder_layer={self.encoder_layer} but the encoder has only {layers} layers")
        if not self.use_projection and self.codebook_dim != self.dim:
            raise ValueError(f"use_projection=False needs codebook_dim == dim, got codebook_dim={self.codebook_dim}, "
                             f"dim={self.dim}")
        if self.balance_weight > 0 and self.codebook_type != "ema":
            raise ValueError(f"balance_weight applies to EMA codebooks only, got codebook_type={self.codebook_type!r}")
        if self.mse_weight + self.cosine_weight <= 0:
            raise ValueError("mse_weight + cosine_weight must be > 0 (the loss would ignore reconstruction)")
        window = ENCODER_FAMILIES[self.encoder_family].window_seconds
        if window is not None and self.max_chunk_seconds > window:
            raise ValueError(f"max_chunk_seconds={self.max_chunk_seconds} exceeds the {self.encoder_family} encoder's "
                             f"fixed {window:g} s window")
        if self.chunk_overlap_seconds > self.max_chunk_seconds / 2:
            raise ValueError(f"chunk_overlap_seconds must be in [0, max_chunk_seconds / 2], got "
                             f"{self.chunk_overlap_seconds}")

    def check(self) -> None:
        """Run every check again (fields and `validate_architecture`); kept for code written before `@strict`."""
        for name in self.__dataclass_fields__:
            for field_validator in self.__validators__.get(name, ()):
                field_validator(getattr(self, name))
        self.validate()

    # ------------------------------------------------------------------ loading: errors name the file
    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        config_dict = super()._dict_from_json_file(json_file)
        if not isinstance(config_dict, dict):
            raise ValueError(f"{json_file}: a gemma-rvq config.json must hold a JSON object of fields, got a "
                             f"{type(config_dict).__name__}")
        return config_dict

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        source = kwargs.pop("_config_source", None) or kwargs.get("name_or_path")  # (AutoConfig passes the latter)
        if not isinstance(config_dict, dict):
            raise ValueError(f"{_describe(source)}: a gemma-rvq config must be a mapping of fields, got a "
                             f"{type(config_dict).__name__}")
        try:
            return super().from_dict(config_dict, **kwargs)
        except (StrictDataclassError, TypeError, ValueError) as err:
            raise ValueError(f"{_describe(source)}: {_one_line(err)}") from err

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> "GemmaRVQConfig":
        config_dict = cls._dict_from_json_file(json_file)
        try:
            return cls(**config_dict)
        except (StrictDataclassError, TypeError, ValueError) as err:
            raise ValueError(f"{json_file}: {_one_line(err)}") from err

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        # travels through get_config_dict's unused kwargs to `from_dict`, which names the file in its errors
        kwargs["_config_source"] = str(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

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
    def frames(self) -> EncoderFrames:
        """The encoder's frame arithmetic (`ENCODER_FAMILIES` at `sampling_rate`, with `encoder_config`)."""
        layers = self.encoder_layer if self.encoder_layer is not None else self.encoder_num_layers
        return encoder_frames(self.encoder_family, self.sampling_rate, self.encoder_config, layers)

    @property
    def samples_per_frame(self) -> int:
        """Input samples per output frame (the encoder's total stride): 640 for Gemma 4, 320 for the others."""
        return self.frames.samples_per_frame

    @property
    def min_samples(self) -> int:
        """Fewest input samples (at `sampling_rate`) accepted; shorter audio is refused.

        Gemma 4 / Whisper: one frame's worth (`samples_per_frame`). HuBERT / wav2vec2: the receptive field
        of the convolutional front end (400 samples = 25 ms with the standard kernels).
        """
        return self.frames.min_samples

    @property
    def frame_rate(self) -> float:
        """Output frames per second: 25 for Gemma 4 audio, 50 for HuBERT / wav2vec2 / Whisper."""
        return self.frames.frame_rate

    def get_encoded_length(self, num_samples: Any) -> Any:
        """Frames the encoder gives for ``num_samples`` samples at `sampling_rate` (int or integer tensor)."""
        return self.frames.get_encoded_length(num_samples)


def _describe(source: Any) -> str:
    """``<folder>/config.json`` for a folder, the path or Hub id otherwise, or a generic name."""
    if source is None or source == "":
        return "gemma-rvq config"
    if os.path.isdir(str(source)):
        return os.path.join(str(source), "config.json")
    return f"{source} (config.json)" if not str(source).endswith(".json") else str(source)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


__all__ = ["CODEBOOK_TYPES", "ENCODER_FAMILIES", "ENCODER_MODEL_TYPES", "EncoderFamily", "EncoderFrames", "GemmaRVQConfig", "encoder_frames"]
