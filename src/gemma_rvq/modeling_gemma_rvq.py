"""GemmaRVQModel: frozen speech encoder -> residual vector quantizer -> discrete codes ``[B, Q, T]``.

Shapes: ``B`` batch, ``S`` samples, ``T`` frames, ``D`` encoder dim (``config.dim``), ``Dc`` code dim
(``config.codebook_dim``), ``Q`` levels, ``K`` codes per level. Masks are ``BoolTensor`` with True = valid.

This file is copied next to saved checkpoints (remote code): at module level it imports only its flat
siblings, torch, numpy and transformers.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from dataclasses import dataclass
from typing import Any

try:  # Python >= 3.11
    from typing import Unpack
except ImportError:  # pragma: no cover - Python 3.10: a transformers dependency
    from typing_extensions import Unpack

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import PreTrainedAudioTokenizerBase
from transformers.utils import ModelOutput, TransformersKwargs

from .audio import prepare_batch
from .configuration_gemma_rvq import EncoderFrames, GemmaRVQConfig
from .encoders import (
    EncoderAdapter,
    build_encoder,
    build_feature_extractor,
    load_encoder,
    prepare_encoder,
    supports_sdpa,
)
from .quantization import ResidualQuantizer


@dataclass
class GemmaRVQEncoderOutput(ModelOutput):
    """Output of [`GemmaRVQModel.encode`].

    Args:
        audio_codes (`torch.LongTensor` of shape `[B, Q, T]`): codes; padded frames hold 0 and must be
            ignored through `codes_mask`.
        codes_mask (`torch.BoolTensor` of shape `[B, T]`): True on valid frames.
        embeddings (`torch.FloatTensor` of shape `[B, T, D]`): the encoder embeddings that were quantized
            (padded frames hold 0).
    """

    audio_codes: torch.LongTensor | None = None
    codes_mask: torch.BoolTensor | None = None
    embeddings: torch.FloatTensor | None = None


@dataclass
class GemmaRVQQuantizerOutput(ModelOutput):
    """Output of [`GemmaRVQModel.quantize`].

    Args:
        audio_codes (`torch.LongTensor` of shape `[B, Q, T]`): codes (0 on padded frames).
        codes_mask (`torch.BoolTensor` of shape `[B, T]`): True on valid frames.
        quantized (`torch.FloatTensor` of shape `[B, T, D]`): reconstruction in the encoder space
            (0 on padded frames).
    """

    audio_codes: torch.LongTensor | None = None
    codes_mask: torch.BoolTensor | None = None
    quantized: torch.FloatTensor | None = None


@dataclass
class GemmaRVQDecoderOutput(ModelOutput):
    """Output of [`GemmaRVQModel.decode`].

    Args:
        embeddings (`torch.FloatTensor` of shape `[B, T, D]`): reconstructed encoder embeddings from the
            first levels of the codes (0 on padded frames).
        codes_mask (`torch.BoolTensor` of shape `[B, T]`): True on valid frames.
    """

    embeddings: torch.FloatTensor | None = None
    codes_mask: torch.BoolTensor | None = None


@dataclass
class GemmaRVQOutput(ModelOutput):
    """Output of [`GemmaRVQModel.forward`] (training).

    Args:
        loss (`torch.FloatTensor` scalar): `mse_weight * mse_loss + cosine_weight * cosine_loss +
            commitment_weight * commitment_loss + codebook_loss`.
        mse_loss (`torch.FloatTensor` scalar): mean squared error over valid frames and dimensions.
        cosine_loss (`torch.FloatTensor` scalar): mean of `1 - cos(reconstruction, embedding)` over valid frames.
        commitment_loss (`torch.FloatTensor` scalar): the quantizer's commitment loss (averaged over levels).
        codebook_loss (`torch.FloatTensor` scalar): the quantizer's codebook loss (zero for EMA codebooks).
        quantized (`torch.FloatTensor` of shape `[B, T, D]`): straight-through reconstruction.
        audio_codes (`torch.LongTensor` of shape `[B, Q, T]`): codes (0 on padded frames).
        codes_mask (`torch.LongTensor` of shape `[B, T]`): 1 on valid frames, 0 on padding. An integer mask, as
            transformers' attention masks and the codec feature extractors' `padding_mask`, so outputs compare
            numerically (`encode` / `quantize` / `decode` return `BoolTensor` masks; `.bool()` converts).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the encoder's hidden states (its kept layers),
            with `output_hidden_states=True` and audio input.
        attentions (`tuple(torch.FloatTensor)`, *optional*): the encoder's attention weights, with
            `output_attentions=True`, audio input and an encoder that returns them (eager attention).
    """

    loss: torch.FloatTensor | None = None
    mse_loss: torch.FloatTensor | None = None
    cosine_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    quantized: torch.FloatTensor | None = None
    audio_codes: torch.LongTensor | None = None
    codes_mask: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _tracing() -> bool:
    """True under `torch.compile` / `torch.export`: masks are then applied arithmetically (no data-dependent
    shapes or branches) and value checks that need a host sync are left out."""
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    return bool(compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)())


def _gather(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, ...]`` + mask ``[B, T]`` -> valid rows ``[N, ...]`` (a view when every frame is valid)."""
    if bool(mask.all()):
        return x.reshape(-1, *x.shape[2:])
    return x[mask]


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Valid rows ``[N, ...]`` + mask ``[B, T]`` -> ``[B, T, ...]`` with zeros on padded frames."""
    shape = (*mask.shape, *values.shape[1:])
    if values.shape[0] == mask.numel():
        return values.reshape(shape)
    out = values.new_zeros(shape)
    out[mask] = values
    return out


# ---------------------------------------------------------------------------------------------- checkpoints
_PROJECTION_PREFIXES = ("in_norm.", "in_proj.", "out_norm.", "out_proj.")


def _checkpoint_files(name_or_path: Any, kwargs: dict[str, Any]) -> list[str]:
    """The safetensors file(s) `from_pretrained` just read (a folder or the Hub cache; no new download)."""
    import json

    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    common = {
        "cache_dir": kwargs.get("cache_dir"), "revision": kwargs.get("revision"), "token": kwargs.get("token"),
        "subfolder": kwargs.get("subfolder") or "", "local_files_only": True,
        "_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False,
    }
    single = cached_file(str(name_or_path), SAFE_WEIGHTS_NAME, **common)
    if single is not None:
        return [single]
    index = cached_file(str(name_or_path), SAFE_WEIGHTS_INDEX_NAME, **common)
    if index is None:
        return []
    with open(index, encoding="utf-8") as f:
        shards = sorted(set(json.load(f).get("weight_map", {}).values()))
    return [path for path in (cached_file(str(name_or_path), shard, **common) for shard in shards) if path]


def _name_keys(keys: Any, limit: int = 12) -> str:
    """Sorted keys, at most ``limit`` of them named, plus how many more (grouped by top-level module)."""
    keys = sorted(keys)
    named = ", ".join(keys[:limit])
    if len(keys) > limit:
        groups: dict[str, int] = {}
        for key in keys:
            groups[key.split(".")[0]] = groups.get(key.split(".")[0], 0) + 1
        named += f", ... ({len(keys)} in all: " + ", ".join(f"{n} under {g}.*" for g, n in groups.items()) + ")"
    return named


def check_loaded_checkpoint(
    model: GemmaRVQModel, loading_info: dict[str, Any], files: list[str], *, source: str,
    allow_missing_keys: bool = False,
) -> None:
    """Refuse a loaded checkpoint whose tensors cannot give the codes it was saved with.

    Args:
        model: the model `from_pretrained` built.
        loading_info: its `output_loading_info` (`missing_keys`, `unexpected_keys`, `mismatched_keys`).
        files: the safetensors files it was read from (for the stored dtypes).
        source: the folder or Hub id, for the messages.
        allow_missing_keys: accept missing / mismatched tensors (they were initialised randomly).

    Raises:
        ValueError: naming the tensors and the reason.
    """
    config = model.config
    missing = set(loading_info.get("missing_keys") or ())
    mismatched = {k[0] if isinstance(k, (tuple, list)) else k for k in loading_info.get("mismatched_keys") or ()}
    unexpected = set(loading_info.get("unexpected_keys") or ())
    expected_projection = {k for k in model.state_dict() if k.startswith(_PROJECTION_PREFIXES)}
    if config.use_projection and expected_projection and expected_projection <= missing:
        raise ValueError(f"{source}: config.json says use_projection: true, but the checkpoint holds none of the "
                         "projection tensors (in_norm, in_proj, out_norm, out_proj): the flag contradicts the weights")
    stray_projection = {k for k in unexpected if k.startswith(_PROJECTION_PREFIXES)}
    if not config.use_projection and stray_projection:
        raise ValueError(f"{source}: config.json says use_projection: false, but the checkpoint holds projection "
                         f"tensors ({_name_keys(stray_projection)}): the flag contradicts the weights")
    if unexpected:
        raise ValueError(f"{source}: the checkpoint holds tensors this config does not describe "
                         f"({_name_keys(unexpected)}); config.json does not match the weights (e.g. codebook_type, "
                         "encoder_config or the sizes)")
    if (missing or mismatched) and not allow_missing_keys:
        what = "is missing tensors" if missing else "has tensors of the wrong shape"
        raise ValueError(
            f"{source}: the checkpoint {what} that define its codes: {_name_keys(missing | mismatched)}. Loading it "
            "would initialise them randomly and every code would be wrong. Pass allow_missing_keys=True to "
            "initialise them anyway (e.g. to train them)."
        )
    state = model.state_dict()
    if files:
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if key in state and state[key].is_floating_point():
                        dtype = f.get_slice(key).get_dtype()
                        if not dtype.startswith(("F", "BF")):
                            raise ValueError(f"{source}: {key} is stored as {dtype} in {os.path.basename(path)}; "
                                             "it must be floating point (integer values would be cast silently)")
    for key, tensor in state.items():
        if tensor.is_floating_point() and key not in missing | mismatched:
            # Encoders may hold infinite values on purpose (Gemma 4's clipping bounds): only NaN is refused there.
            finite = not key.startswith("encoder.")
            bad = int((~torch.isfinite(tensor) if finite else torch.isnan(tensor)).sum())
            if bad:
                what = "NaN or infinite" if finite else "NaN"
                raise ValueError(f"{source}: {key} holds {bad} {what} values; with them every code would be wrong")


class GemmaRVQModel(PreTrainedAudioTokenizerBase):
    """Speech tokenizer: a frozen encoder (Gemma 4 audio, HuBERT, wav2vec2 or Whisper) and a residual VQ.

    Submodules: `in_norm` (LayerNorm D), `in_proj` (Linear D -> Dc), `quantizer` ([`ResidualQuantizer`]),
    `out_norm` (LayerNorm Dc), `out_proj` (Linear Dc -> D) — identities when `use_projection=False` —
    and `encoder` when the encoder is bundled (`config.encoder_config` set). Otherwise the encoder is
    loaded from `config.encoder_name_or_path` on the first call to [`embed`] and kept out of the state
    dict, so the checkpoint stays quantizer-only.
    """

    config_class = GemmaRVQConfig
    config: GemmaRVQConfig
    base_model_prefix = "gemma_rvq"
    main_input_name = "input_values"
    input_modalities = "audio"
    # The attention lives in the encoder: sdpa wherever the encoder family supports it (not Gemma 4's audio
    # tower, see `_sdpa_can_dispatch`); `attn_implementation` is passed down to the encoder.
    _supports_sdpa = True

    def __init__(self, config: GemmaRVQConfig) -> None:
        super().__init__(config)
        dim, cdim = config.dim, config.codebook_dim
        if config.use_projection:
            self.in_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
            self.in_proj = nn.Linear(dim, cdim)
            self.out_norm = nn.LayerNorm(cdim, eps=config.layer_norm_eps)
            self.out_proj = nn.Linear(cdim, dim)
        else:
            self.in_norm, self.in_proj = nn.Identity(), nn.Identity()
            self.out_norm, self.out_proj = nn.Identity(), nn.Identity()
        self.quantizer = ResidualQuantizer(
            cdim,
            config.num_quantizers,
            config.codebook_size,
            codebook_type=config.codebook_type,
            ema_decay=config.ema_decay,
            dead_code_threshold=config.dead_code_threshold,
            balance_weight=config.balance_weight,
            search_chunk_size=config.search_chunk_size,
        )
        if config.encoder_config is not None:
            encoder = build_encoder(config.encoder_family, config.encoder_config, config._attn_implementation)
            self.encoder = prepare_encoder(config.encoder_family, encoder, config.encoder_layer)
        else:
            self.encoder = None
        # Runtime state, deliberately not registered: a lazily loaded encoder never enters the state dict.
        self.__dict__["_lazy_encoder"] = None  # object attribute, never a registered submodule
        self._adapter: EncoderAdapter | None = None
        self.post_init()

    # ------------------------------------------------------------------ init / loading
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ResidualQuantizer):
            init.normal_(module.codebooks, std=1.0 / math.sqrt(module.dim))
            if module.codebook_type == "ema":
                # The quantizer's invariant: codebooks == embed_sum / cluster_size.
                init.ones_(module.cluster_size)
                init.copy_(module.embed_sum, module.codebooks)
            module.invalidate_cache()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, allow_missing_keys: bool = False,
                        **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint that would give wrong codes.

        Every tensor of a gemma-rvq checkpoint defines its codes (codebooks, projections and norms, EMA
        statistics, a bundled encoder), so a checkpoint missing any of them is refused with the missing keys
        named, instead of initialising them randomly as transformers would. Also refused, with the reason:
        tensors the config does not expect (e.g. projections with `use_projection: false`), non-floating
        tensors where the model has floating ones (integer codebooks), and NaN/inf values. Weights are read
        from safetensors only (`use_safetensors=True` unless given): no pickle is ever loaded.

        Args:
            allow_missing_keys: explicit opt-in to initialise missing (or, with `ignore_mismatched_sizes`,
                mismatched) tensors randomly, e.g. to train them.
        """
        kwargs.setdefault("use_safetensors", True)
        return_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except RuntimeError as err:  # transformers logs the shape mismatches and raises without naming them
            if "ignore_mismatched_sizes" not in str(err) or pretrained_model_name_or_path is None:
                raise
            raise ValueError(cls._describe_mismatches(pretrained_model_name_or_path, kwargs)) from err
        if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
            files = _checkpoint_files(pretrained_model_name_or_path, kwargs)
            check_loaded_checkpoint(model, info, files, source=str(pretrained_model_name_or_path),
                                    allow_missing_keys=allow_missing_keys)
        model._freeze_encoder()
        return (model, info) if return_info else model

    @classmethod
    def _describe_mismatches(cls, name_or_path: Any, kwargs: dict[str, Any]) -> str:
        """The tensors whose stored shape differs from what config.json describes, for the error message."""
        from safetensors import safe_open

        config = kwargs.get("config")
        if not isinstance(config, GemmaRVQConfig):
            config = GemmaRVQConfig.from_pretrained(name_or_path, **{
                k: kwargs[k] for k in ("cache_dir", "revision", "token", "subfolder") if k in kwargs})
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
        wrong = []
        for path in _checkpoint_files(name_or_path, kwargs):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shape = tuple(f.get_slice(key).get_shape())
                    if key in expected and shape != expected[key]:
                        wrong.append(f"{key} (stored {list(shape)}, config.json gives {list(expected[key])})")
        return (f"{name_or_path}: tensors of the wrong shape for its config.json: {', '.join(sorted(wrong)) or '?'}; "
                "the config does not describe these weights (e.g. codebook_size, num_quantizers, dim)")

    # ------------------------------------------------------------------ attention implementation
    def _sdpa_can_dispatch(self, is_init_check: bool = False) -> bool:
        # Our only attention is the encoder's: refuse sdpa where the encoder family does (Gemma 4's audio
        # tower); transformers then falls back to eager unless sdpa was asked for explicitly.
        if not supports_sdpa(self.config.encoder_family):
            raise ValueError(f"the {self.config.encoder_family} encoder does not support attn_implementation='sdpa'; "
                             "use 'eager'")
        return super()._sdpa_can_dispatch(is_init_check)

    def set_attn_implementation(self, attn_implementation: str | dict, *args: Any, **kwargs: Any) -> None:
        """transformers' `set_attn_implementation`, also applied to a lazily loaded encoder."""
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        if self._lazy_encoder is not None:
            self._lazy_encoder.set_attn_implementation(self.config._attn_implementation)

    # ------------------------------------------------------------------ feature extractor (the processor)
    @property
    def feature_extractor(self) -> Any:
        """The encoder's feature extractor (saved with every checkpoint as `preprocessor_config.json`, so
        `AutoFeatureExtractor` / `AutoProcessor.from_pretrained(folder)` return it; `encode` takes its output).

        The loaded encoder's when there is one; else from `config.feature_extractor_config`, the encoder's
        folder or the Hub cache (no download), or the family's default."""
        if self._adapter is not None:
            return self._adapter.feature_extractor
        if self.__dict__.get("_feature_extractor") is None:
            config = self.config
            self.__dict__["_feature_extractor"] = build_feature_extractor(
                config.encoder_family, config.feature_extractor_config, config.encoder_name_or_path,
                revision=config.encoder_revision, local_files_only=True, warn=False,
            )
        return self.__dict__["_feature_extractor"]

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, plus the encoder's feature extractor (`preprocessor_config.json`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self._save_feature_extractor(save_directory)

    def _upload_modified_files(self, working_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        # save_pretrained(push_to_hub=True) uploads before our save_pretrained returns: write the feature
        # extractor first so it is part of the upload.
        self._save_feature_extractor(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def _save_feature_extractor(self, save_directory: str | os.PathLike) -> None:
        feature_extractor = copy.deepcopy(self.feature_extractor)
        # Processor output must carry its mask (encode refuses Whisper features without one).
        feature_extractor.return_attention_mask = True
        feature_extractor.save_pretrained(save_directory)

    def _freeze_encoder(self) -> None:
        for encoder in (self.encoder, self._lazy_encoder):
            if encoder is not None:
                encoder.eval()
                encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> GemmaRVQModel:
        """Train mode for the projections and quantizer; the encoder always stays frozen in eval mode."""
        super().train(mode)
        self._freeze_encoder()
        return self

    # ------------------------------------------------------------------ encoder
    def get_audio_encoder(self) -> nn.Module:
        """The frozen encoder module (bundled, or loaded now from `config.encoder_name_or_path`)."""
        return self._encoder_adapter().model

    def _encoder_adapter(self) -> EncoderAdapter:
        config = self.config
        if self._adapter is None:
            if self.encoder is not None:
                encoder = self.encoder
            elif config.encoder_name_or_path:
                encoder = load_encoder(
                    config.encoder_family, config.encoder_name_or_path, revision=config.encoder_revision,
                    dtype=self.dtype, attn_implementation=config._attn_implementation,
                )
                encoder = prepare_encoder(config.encoder_family, encoder, config.encoder_layer)
                hidden = getattr(encoder.config, "d_model" if config.encoder_family == "whisper" else "hidden_size")
                if hidden != config.dim:
                    raise ValueError(
                        f"the encoder {config.encoder_name_or_path!r} has hidden size {hidden}, but this "
                        f"model quantizes dim={config.dim}"
                    )
                self.__dict__["_lazy_encoder"] = encoder  # bypass nn.Module registration
            else:
                raise ValueError(
                    "this GemmaRVQModel has no encoder: set config.encoder_name_or_path or config.encoder_config, "
                    "or pass precomputed `embeddings=` to encode()"
                )
            feature_extractor = build_feature_extractor(
                config.encoder_family, config.feature_extractor_config, config.encoder_name_or_path,
                revision=config.encoder_revision,
            )
            self._adapter = EncoderAdapter(
                config.encoder_family, encoder, feature_extractor,
                window_seconds=config.max_chunk_seconds, overlap_seconds=config.chunk_overlap_seconds,
            )
        if self._lazy_encoder is not None:
            param = next(self.quantizer.buffers(), None)
            if param is None:
                param = next(self.parameters())
            if next(self._lazy_encoder.parameters()).device != param.device:
                self._lazy_encoder.to(param.device)
        return self._adapter

    def bundle_encoder(self) -> None:
        """Make the (lazily loaded) encoder part of this checkpoint: it is registered as `encoder`, and
        `config.encoder_config` / `config.feature_extractor_config` are filled, so `save_pretrained` then
        writes a self-contained model."""
        adapter = self._encoder_adapter()
        if self.encoder is None:
            self.encoder = adapter.model
            self.__dict__["_lazy_encoder"] = None
        self.config.encoder_config = adapter.model.config.to_dict()
        self.config.feature_extractor_config = adapter.feature_extractor.to_dict()

    @property
    def sampling_rate(self) -> int:
        """Sampling rate (Hz) the encoder expects."""
        return self.config.sampling_rate

    @property
    def frames(self) -> EncoderFrames:
        """The encoder's frame arithmetic: the loaded encoder's when there is one, else the config's."""
        return self._adapter.frames if self._adapter is not None else self.config.frames

    @property
    def frame_rate(self) -> float:
        """Frames (and codes) per second."""
        return self.frames.frame_rate

    def get_encoded_length(self, input_length: Any) -> Any:
        """Frames (and codes) the model gives for ``input_length`` samples at `sampling_rate`.

        Args:
            input_length: an int, or an integer tensor of any shape (computed element-wise, without
                branches: traceable).
        """
        return self.frames.get_encoded_length(input_length)

    def get_audio_codes_mask(self, padding_mask: torch.Tensor) -> torch.BoolTensor:
        """Sample mask `[B, S]` (1 = real sample, right-padded, as the feature extractor returns it) -> code
        mask `[B, T]` with `T = get_encoded_length(S)`."""
        padding_mask = torch.as_tensor(padding_mask)
        lengths = self.get_encoded_length(padding_mask.long().sum(-1))
        frames = int(self.get_encoded_length(padding_mask.shape[-1]))
        return torch.arange(frames, device=padding_mask.device)[None, :] < lengths[:, None]

    # ------------------------------------------------------------------ audio -> embeddings
    def _to_clips(
        self, input_values: Any, padding_mask: Any, sampling_rate: int | None, adapter: EncoderAdapter
    ) -> list[np.ndarray]:
        # every raw-audio check (rates, PCM widths, channels, masks, lengths) lives in audio.py
        return prepare_batch(
            input_values, padding_mask, sampling_rate=sampling_rate,
            target_sampling_rate=adapter.sampling_rate, min_samples=adapter.min_samples,
        )  # fmt: skip

    def embed(
        self,
        input_values: Any = None,
        padding_mask: Any = None,
        *,
        sampling_rate: int | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio -> frozen-encoder frame embeddings.

        Args:
            input_values: `[B, S]` tensor/array (with `padding_mask [B, S]`, True = real sample), a 1-D
                waveform `[S]`, or a list of waveforms of any length (1-D, or 2-D multi-channel: downmixed).
                Float or integer PCM.
            padding_mask: `[B, S]` bool, only with a padded `[B, S]` input.
            sampling_rate: rate of the input in Hz; resampled to `self.sampling_rate` when different.
                `None` takes the input to be at `self.sampling_rate` and warns (pass it). Accepted inputs
                and the errors for the rest: `gemma_rvq.audio`.
            input_features, input_features_mask, attention_mask: instead of raw audio, the output of the
                checkpoint's feature extractor (`AutoProcessor.from_pretrained(folder)`, i.e.
                `model.feature_extractor`): Gemma 4 `input_features [B, F, 128]` + `input_features_mask [B, F]`,
                Whisper `input_features [B, n_mels, 3000]` + `attention_mask [B, 3000]`, HuBERT / wav2vec2
                `input_values [B, S]` + `attention_mask [B, S]`. Run through the encoder as given (one forward,
                no windowing). For Gemma 4 / Whisper, `attention_mask` beside raw `input_values` is a sample
                mask, like `padding_mask`.

        Returns:
            `(embeddings [B, T, D], mask [B, T])`, on the encoder's device, in its dtype. Audio longer than
            `config.max_chunk_seconds` is encoded in overlapping windows and stitched by frame position.
        """
        embeddings, mask, _ = self._embed(
            input_values, padding_mask, sampling_rate=sampling_rate, input_features=input_features,
            input_features_mask=input_features_mask, attention_mask=attention_mask,
        )
        return embeddings, mask

    def _embed(
        self, input_values: Any, padding_mask: Any, *, sampling_rate: int | None = None,
        input_features: torch.Tensor | None = None, input_features_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, output_hidden_states: bool | list[int] = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """`embed`, plus the encoder's own output (hidden states / attentions when asked; `None` otherwise)."""
        adapter = self._encoder_adapter()
        outputs = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        prepared = self._processor_inputs(input_values, padding_mask, input_features, input_features_mask,
                                          attention_mask)
        if prepared is not None:
            return adapter.run(*prepared, **outputs)
        if attention_mask is not None:
            padding_mask = attention_mask  # Gemma 4 / Whisper: a sample mask beside raw audio
        clips = self._to_clips(input_values, padding_mask, sampling_rate, adapter)
        if not (output_hidden_states or output_attentions):
            embeddings, mask = adapter(clips)
            return embeddings, mask, None
        too_long = [i for i, clip in enumerate(clips) if len(adapter.plan(len(clip))) > 1]
        if too_long:
            raise ValueError(f"output_hidden_states / output_attentions need every clip within one encoder window "
                             f"({adapter.window / adapter.sampling_rate:g} s); input {too_long[0]} is longer")
        return adapter.run(*adapter.features(clips), **outputs)

    def _processor_inputs(
        self, input_values: Any, padding_mask: Any, input_features: Any, input_features_mask: Any,
        attention_mask: Any,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(encoder input, its mask)` when given the feature extractor's output, `None` for raw audio."""
        family = self.config.encoder_family
        w2v = family in ("hubert", "wav2vec2")
        if input_features is None and not (w2v and attention_mask is not None and input_values is not None):
            if input_features_mask is not None:
                raise ValueError("input_features_mask needs input_features")
            return None
        if input_features is not None and (input_values is not None or w2v):
            raise ValueError(f"the {family} encoder takes input_values (+ attention_mask), not input_features"
                             if w2v else "pass either input_values (audio) or input_features, not both")
        if padding_mask is not None:
            raise ValueError("padding_mask goes with raw audio; the feature extractor's output carries attention_mask")
        inputs = input_values if input_features is None else input_features
        mask = attention_mask if input_features_mask is None else input_features_mask
        name = "input_values" if input_features is None else "input_features"
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            raise ValueError(f"{name} from the feature extractor must be a floating-point tensor "
                             "(return_tensors='pt')")
        expected_dims = {"gemma4_audio": 3, "whisper": 3}.get(family, 2)
        if inputs.dim() != expected_dims:
            raise ValueError(f"{name} for the {family} encoder must have {expected_dims} dimensions, got shape "
                             f"{tuple(inputs.shape)}")
        frames = inputs.shape[-1] if family == "whisper" else inputs.shape[1]
        if mask is None:
            if family == "whisper":
                raise ValueError("Whisper input_features need the feature extractor's attention_mask "
                                 "(return_attention_mask=True): without it the 30 s window's padding would be encoded")
            mask = torch.ones(inputs.shape[0], frames, dtype=torch.long, device=inputs.device)
        mask = torch.as_tensor(mask)
        hop = getattr(self.feature_extractor, "hop_length", 0)
        if family == "whisper" and hop and mask.shape[-1] == frames * hop:
            mask = mask[:, ::hop]  # a sample mask (padding="longest"): one entry per mel frame
        if tuple(mask.shape) != (inputs.shape[0], frames):
            raise ValueError(f"the mask of {name} has shape {tuple(mask.shape)}, expected {(inputs.shape[0], frames)}")
        return inputs, mask

    # ------------------------------------------------------------------ projections
    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., D]` -> `[..., Dc]` (in_norm, in_proj)."""
        return self.in_proj(self.in_norm(x))

    def project_out(self, z: torch.Tensor) -> torch.Tensor:
        """`[..., Dc]` -> `[..., D]` (out_norm, out_proj)."""
        return self.out_proj(self.out_norm(z))

    # A Q=1 k-means model without projections and with EMA codebooks has buffers but no parameters:
    # the mixin's parameter-based dtype/device would raise StopIteration (e.g. in save_pretrained).
    @property
    def dtype(self) -> torch.dtype:
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _param_dtype(self) -> torch.dtype:
        return self.in_proj.weight.dtype if self.config.use_projection else self.quantizer.codebooks.dtype

    def _check_embeddings(
        self, embeddings: Any, mask: Any, name: str = "embeddings", allow_flat: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
            raise ValueError(f"{name} must be a floating-point torch.Tensor [B, T, D], got {type(embeddings).__name__}")
        if allow_flat and embeddings.dim() == 2:
            if mask is not None:
                raise ValueError(f"flat {name} [N, D] are all valid frames: do not pass a mask")
            embeddings = embeddings[None]
        if embeddings.dim() != 3:
            raise ValueError(f"{name} must have shape [B, T, D], got {tuple(embeddings.shape)}")
        if embeddings.shape[-1] != self.config.dim:
            raise ValueError(
                f"{name} have dimension {embeddings.shape[-1]}, but this model quantizes dim={self.config.dim}"
            )
        if mask is None:
            mask = torch.ones(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device)
        else:
            if not isinstance(mask, torch.Tensor):
                mask = torch.as_tensor(np.asarray(mask))
            if tuple(mask.shape) != tuple(embeddings.shape[:2]):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} [B, T] = "
                                 f"{tuple(embeddings.shape[:2])}")
            mask = mask.to(device=embeddings.device, dtype=torch.bool)
        return embeddings, mask

    # ------------------------------------------------------------------ embeddings -> codes
    @torch.no_grad()
    def quantize(
        self, embeddings: torch.Tensor, mask: torch.Tensor | None = None, num_quantizers: int | None = None
    ) -> GemmaRVQQuantizerOutput:
        """Encoder embeddings `[B, T, D]` (+ mask `[B, T]`) -> codes `[B, Q', T]` and reconstruction `[B, T, D]`.

        Only valid frames reach the quantizer. `num_quantizers` (default: all) selects the first levels.
        """
        return self._quantize(embeddings, mask, num_quantizers, reconstruct=True)

    def _quantize(
        self, embeddings: torch.Tensor, mask: torch.Tensor | None, num_quantizers: int | None, reconstruct: bool
    ) -> GemmaRVQQuantizerOutput:
        embeddings, mask = self._check_embeddings(embeddings, mask)
        if _tracing():
            return self._quantize_all_frames(embeddings, mask, num_quantizers, reconstruct)
        x = _gather(embeddings, mask).to(self._param_dtype())
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("embeddings contain NaN or infinite values on valid frames")
        codes = self.quantizer.encode(self.project_in(x), num_quantizers)  # [N, Q']
        mask = mask.to(codes.device)
        quantized = None
        if reconstruct:
            quantized = _scatter(self.project_out(self.quantizer.decode(codes)), mask)
        return GemmaRVQQuantizerOutput(
            audio_codes=_scatter(codes, mask).permute(0, 2, 1).contiguous(),
            codes_mask=mask,
            quantized=quantized,
        )

    def _quantize_all_frames(
        self, embeddings: torch.Tensor, mask: torch.Tensor, num_quantizers: int | None, reconstruct: bool
    ) -> GemmaRVQQuantizerOutput:
        """`_quantize` with masks as arithmetic (for compile / export: static shapes, no branches on values).

        Every frame goes through the quantizer, padded frames as zeros (so NaN padding cannot leak), and padded
        frames' codes and reconstruction are set to 0 afterwards: the codes of valid frames are the same.
        """
        batch, frames, dim = embeddings.shape
        keep = mask[..., None]
        x = torch.where(keep, embeddings, 0).reshape(batch * frames, dim).to(self._param_dtype())
        codes = self.quantizer.encode(self.project_in(x), num_quantizers).reshape(batch, frames, -1)
        codes = torch.where(keep, codes, 0)
        quantized = None
        if reconstruct:
            flat = self.project_out(self.quantizer.decode(codes.reshape(batch * frames, -1)))
            quantized = torch.where(keep, flat.reshape(batch, frames, -1), 0)
        return GemmaRVQQuantizerOutput(audio_codes=codes.permute(0, 2, 1), codes_mask=mask, quantized=quantized)

    @torch.no_grad()
    def encode(
        self,
        input_values: Any = None,
        padding_mask: Any = None,
        *,
        sampling_rate: int | None = None,
        embeddings: torch.Tensor | None = None,
        embeddings_mask: torch.Tensor | None = None,
        num_quantizers: int | None = None,
        return_dict: bool | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> GemmaRVQEncoderOutput | tuple:
        """Audio, the feature extractor's output, or precomputed embeddings -> codes.

        Args:
            input_values, padding_mask, sampling_rate: audio, as in [`embed`].
            input_features, input_features_mask, attention_mask: the output of the checkpoint's feature
                extractor instead (`model.encode(**processor(audio, return_tensors="pt"))`), as in [`embed`].
            embeddings: precomputed encoder embeddings `[B, T, D]` instead of audio.
            embeddings_mask: `[B, T]` bool mask of `embeddings` (default: all valid).
            num_quantizers: use only the first levels.
            return_dict: a tuple when `False` (default: `config.return_dict`).

        Returns:
            [`GemmaRVQEncoderOutput`]: `audio_codes [B, Q', T]` (0 on padded frames), `codes_mask [B, T]`,
            `embeddings [B, T, D]`.
        """
        audio = input_values is not None or input_features is not None
        if audio == (embeddings is not None):
            raise ValueError("pass exactly one of input_values / input_features (audio) or embeddings")
        if embeddings is None:
            embeddings, embeddings_mask = self.embed(
                input_values, padding_mask, sampling_rate=sampling_rate, input_features=input_features,
                input_features_mask=input_features_mask, attention_mask=attention_mask,
            )
        out = self._quantize(embeddings, embeddings_mask, num_quantizers, reconstruct=False)
        result = GemmaRVQEncoderOutput(audio_codes=out.audio_codes, codes_mask=out.codes_mask, embeddings=embeddings)
        return result if self._return_dict(return_dict) else result.to_tuple()

    def _return_dict(self, return_dict: bool | None) -> bool:
        return self.config.return_dict if return_dict is None else return_dict

    def stream(
        self,
        sampling_rate: int,
        num_quantizers: int | None = None,
        *,
        token_format: Any = None,
        lookahead_ms: float | None = None,
        context_ms: float | None = None,
    ):
        """Open a stream for one utterance: codes (or token text) of each frame as soon as it is final.

        ```python
        stream = model.stream(sampling_rate=16000)
        for chunk in chunks:             # mono [S] pieces of any length
            codes = stream.push(chunk)   # LongTensor [Q, n]: the frames that became final (n may be 0)
        codes = stream.flush()           # the rest; then stream.reset() for the next utterance
        ```

        Gemma 4 (exact): the concatenated codes equal [`encode`] of the whole clip (float near-ties aside);
        frame `t` is emitted once `t * 40 + stream.lookahead_ms` (40.0625) ms of audio arrived; the state
        is bounded by the encoder's context. HuBERT / wav2vec2 / Whisper attend both ways: they stream only
        with an explicit `lookahead_ms` (windowed, approximate codes), and raise otherwise. See
        docs/streaming.md.

        Args:
            sampling_rate: rate of the pushed samples in Hz (resampled to the model's rate on the fly).
            num_quantizers: emit only the first levels (default: all).
            token_format: a token format (preset name, `SemanticTokenFormat` or its dict): `push` / `flush`
                then return text whose concatenation equals `format.render` of the whole utterance.
            lookahead_ms: bidirectional encoders only: audio each frame waits for from its start on.
            context_ms: bidirectional encoders only: left context of every window (default 2000).

        Returns:
            `AudioCodeStream`, or `TokenStream` when `token_format` is given.
        """
        from .streaming import open_stream

        return open_stream(
            self, sampling_rate, num_quantizers, token_format=token_format, lookahead_ms=lookahead_ms,
            context_ms=context_ms,
        )

    @torch.no_grad()
    def decode(
        self,
        audio_codes: torch.Tensor,
        codes_mask: torch.Tensor | None = None,
        num_quantizers: int | None = None,
        return_dict: bool | None = None,
    ) -> GemmaRVQDecoderOutput | tuple:
        """Codes `[B, Q', T]` -> reconstructed encoder embeddings `[B, T, D]` from the first levels.

        Args:
            audio_codes: integer codes in `[0, K)` on valid frames; `Q' <= Q`.
            codes_mask: `[B, T]` bool (default: all valid); padded frames are ignored and decode to 0.
            num_quantizers: decode only the first levels (default: all given).
            return_dict: a tuple when `False` (default: `config.return_dict`).

        Under `torch.compile` / `torch.export` the code values are not range-checked (that needs a host sync).
        """
        if not isinstance(audio_codes, torch.Tensor):
            audio_codes = torch.as_tensor(np.asarray(audio_codes))
        if audio_codes.dim() != 3:
            raise ValueError(f"audio_codes must have shape [B, Q, T], got {tuple(audio_codes.shape)}")
        if audio_codes.is_floating_point() or audio_codes.dtype == torch.bool:
            raise ValueError(f"audio_codes must be an integer tensor, got {audio_codes.dtype}")
        levels = audio_codes.shape[1]
        if not 1 <= levels <= self.config.num_quantizers:
            raise ValueError(f"audio_codes have {levels} levels; this model has {self.config.num_quantizers}")
        if num_quantizers is not None:
            if not isinstance(num_quantizers, int) or not 1 <= num_quantizers <= levels:
                raise ValueError(f"num_quantizers must be an int in [1, {levels}], got {num_quantizers!r}")
            audio_codes = audio_codes[:, :num_quantizers]
        batch, _, frames = audio_codes.shape
        if codes_mask is None:
            codes_mask = torch.ones(batch, frames, dtype=torch.bool, device=audio_codes.device)
        else:
            if not isinstance(codes_mask, torch.Tensor):
                codes_mask = torch.as_tensor(np.asarray(codes_mask))
            if tuple(codes_mask.shape) != (batch, frames):
                raise ValueError(f"codes_mask shape {tuple(codes_mask.shape)} does not match audio_codes [B, T] = "
                                 f"{(batch, frames)}")
            codes_mask = codes_mask.to(device=audio_codes.device, dtype=torch.bool)
        if _tracing():
            keep = codes_mask[..., None]
            codes = torch.where(keep, audio_codes.permute(0, 2, 1), 0)  # padded frames may hold anything
            flat = self.project_out(self.quantizer.decode(codes.reshape(batch * frames, -1)))
            embeddings = torch.where(keep, flat.reshape(batch, frames, -1), 0)
        else:
            codes = _gather(audio_codes.permute(0, 2, 1), codes_mask)  # [N, Q']
            if codes.numel():
                low, high = int(codes.min()), int(codes.max())
                if low < 0 or high >= self.config.codebook_size:
                    raise ValueError(
                        f"audio_codes must be in [0, {self.config.codebook_size}) on valid frames, got values in "
                        f"[{low}, {high}]"
                    )
            flat = self.project_out(self.quantizer.decode(codes))
            embeddings = _scatter(flat, codes_mask.to(flat.device))
        result = GemmaRVQDecoderOutput(embeddings=embeddings, codes_mask=codes_mask)
        return result if self._return_dict(return_dict) else result.to_tuple()

    # ------------------------------------------------------------------ training
    def forward(
        self,
        input_values: Any = None,
        padding_mask: Any = None,
        *,
        embeddings: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        sampling_rate: int | None = None,
        num_quantizers: int | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> GemmaRVQOutput | tuple:
        """Reconstruction loss through the quantizer: of encoder embeddings (the training path) or of audio.

        Args:
            input_values, padding_mask, sampling_rate, input_features, input_features_mask: audio or the feature
                extractor's output, as in [`embed`]; the frozen encoder runs first (without gradient).
            embeddings: precomputed encoder embeddings instead: `[B, T, D]` (with `attention_mask [B, T]`), or
                flat valid frames `[N, D]` (treated as one sequence: outputs then have `B = 1, T = N`).
            attention_mask: with `embeddings`, `[B, T]`, 1/True on valid frames (only they count); with
                audio, the feature extractor's mask, as in [`embed`].
            num_quantizers: train/evaluate with only the first levels.
            return_dict: a tuple when `False` (default: `config.return_dict`).
            kwargs: `output_hidden_states` / `output_attentions` (default: the config's): return the
                encoder's hidden states / attention weights (audio input within one encoder window);
                `output_hidden_states` may list the indices to return (the others are `None`).

        Returns:
            [`GemmaRVQOutput`] with `loss = mse_weight * MSE + cosine_weight * (1 - cos) +
            commitment_weight * commitment + codebook_loss` over valid frames. In training mode EMA
            codebooks are updated by the quantizer.
        """
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        output_attentions = kwargs.pop("output_attentions", None)
        unknown = set(kwargs) - set(TransformersKwargs.__annotations__)
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments {sorted(unknown)}")
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        elif not isinstance(output_hidden_states, (list, tuple)):  # a list of indices selects hidden states
            output_hidden_states = bool(output_hidden_states)
        output_attentions = bool(self.config.output_attentions if output_attentions is None else output_attentions)
        encoder_out = None
        if (embeddings is None and isinstance(input_values, torch.Tensor) and input_values.is_floating_point()
                and input_values.dim() == 3 and input_values.shape[-1] == self.config.dim):
            raise ValueError(f"forward() takes audio as its first argument (input_values [B, S]); this looks like "
                             f"encoder embeddings [B, T, D={self.config.dim}]: pass them as embeddings=")
        if embeddings is None:
            if input_values is None and input_features is None:
                raise ValueError("forward() needs audio (input_values / input_features) or embeddings")
            embeddings, attention_mask, encoder_out = self._embed(
                input_values, padding_mask, sampling_rate=sampling_rate, input_features=input_features,
                input_features_mask=input_features_mask, attention_mask=attention_mask,
                output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            )
        elif input_values is not None or input_features is not None:
            raise ValueError("pass either audio (input_values / input_features) or embeddings, not both")
        embeddings, mask = self._check_embeddings(embeddings, attention_mask, allow_flat=True)
        x = _gather(embeddings, mask).to(self._param_dtype())
        qout = self.quantizer(self.project_in(x), num_quantizers)
        recon = self.project_out(qout.quantized)
        if x.shape[0] == 0:
            raise ValueError("forward() got no valid frames (the mask is all False)")
        mse = F.mse_loss(recon.float(), x.float())
        cosine = (1.0 - F.cosine_similarity(recon.float(), x.float(), dim=-1)).mean()
        cfg = self.config
        loss = (
            cfg.mse_weight * mse + cfg.cosine_weight * cosine + cfg.commitment_weight * qout.commitment_loss
            + qout.codebook_loss
        )
        result = GemmaRVQOutput(
            loss=loss,
            mse_loss=mse,
            cosine_loss=cosine,
            commitment_loss=qout.commitment_loss,
            codebook_loss=qout.codebook_loss,
            quantized=_scatter(recon, mask),
            audio_codes=_scatter(qout.codes, mask).permute(0, 2, 1).contiguous(),
            codes_mask=mask.long(),
            hidden_states=getattr(encoder_out, "hidden_states", None) if output_hidden_states else None,
            attentions=getattr(encoder_out, "attentions", None) if output_attentions else None,
        )
        return result if self._return_dict(return_dict) else result.to_tuple()


# This module's annotations are strings (postponed evaluation); transformers' tooling reads forward's
# `**kwargs` annotation to know which outputs it can ask for, so give it the evaluated one.
GemmaRVQModel.forward.__annotations__["kwargs"] = Unpack[TransformersKwargs]

__all__ = [
    "GemmaRVQDecoderOutput",
    "GemmaRVQEncoderOutput",
    "GemmaRVQModel",
    "GemmaRVQOutput",
    "GemmaRVQQuantizerOutput",
    "check_loaded_checkpoint",
]
