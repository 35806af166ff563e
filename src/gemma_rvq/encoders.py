"""Frozen speech-encoder adapters: waveforms -> frame embeddings ``[B, T, D]`` + mask ``[B, T]``.

One adapter per encoder family, each built on the real transformers model and feature extractor:

* ``gemma4_audio`` (`Gemma4AudioModel`): the input of ``output_proj`` (1024-d in the full model), read as
  ``hidden_states[-1]`` with ``config.tie_last_hidden_states = False`` (no forward hook). 16 kHz -> 128-bin
  log-mel at a 10 ms hop -> two stride-2 convolutions: 25 frames per second (640 samples per frame).
  The mask comes from the model (``attention_mask`` of its output), computed from the feature extractor's
  ``input_features_mask`` which must be passed as ``attention_mask=`` (``model(**features)`` would
  silently drop it). The feature extractor truncates at 30 s unless told ``truncation=False`` and ignores
  ``sampling_rate`` (inputs are resampled before it).
* ``hubert`` / ``wav2vec2`` (`HubertModel`, `Wav2Vec2Model`): ``hidden_states[k]``; convolutional front
  end of total stride 320: 50 frames per second; mask from ``_get_feat_extract_output_lengths``.
* ``whisper`` (`WhisperEncoder`): ``hidden_states[k]``; fixed 30 s windows of 3000 mel frames (10 ms hop),
  stride-2 convolution: 1500 frames per window, 50 per second. Only the frames of the real audio are
  kept: the feature extractor's mel-frame mask subsampled by 2 (``ceil(samples / 320)`` frames).

Layer selection (``encoder_layer``): an int ``k`` means the raw output of layer ``k`` (``0`` = the input
of the first layer), i.e. ``hidden_states[k]`` of the full encoder with ``tie_last_hidden_states=False``:
never the final LayerNorm that stable-layer-norm HuBERT/wav2vec2 and Whisper apply after their last
layer, even for ``k = num_layers``. ``None`` means the encoder's own final output: ``last_hidden_state``
(final LayerNorm included) for HuBERT / wav2vec2 / Whisper, the input of ``output_proj`` for Gemma 4.
Unused layers are never run: the layer list is truncated to ``k`` layers (and the final LayerNorm replaced
by an identity), so ``last_hidden_state`` of the truncated encoder is the wanted state.

Padding invariance (batched codes == one-at-a-time codes on valid frames): Gemma 4 masks its input before
each subsampling convolution and in attention, its light convolutions are causal; HuBERT/wav2vec2 with
``feat_extract_norm="layer"`` use valid convolutions and zero padded frames before the positional
convolution. With ``feat_extract_norm="group"`` (wav2vec2-base / hubert-base style) the first
convolution's GroupNorm normalises over time, padding included, so those encoders are run one clip at a
time (exact, slower). Whisper pads every clip to the same 30 s window anyway.

Long audio (longer than the adapter's window): split into windows of ``window`` samples whose starts are
whole frames apart, overlapping by ``overlap`` samples; the windows go through padded encoder forwards of at
most ``len(clips)`` windows each (peak memory flat in the clip length), and each window keeps the frames
between two seams: the middle of each overlap, or for
Gemma 4, whose layers only look back, a few frames before the end of the earlier window (the later window's
first frames lack left context). No frame is lost or duplicated and frame ``f`` of a window starting at sample ``s`` is
global frame ``s / samples_per_frame + f``.

This file is copied next to saved checkpoints (remote code): it imports only numpy, torch, transformers and its
flat sibling ``configuration_gemma_rvq`` (the frame arithmetic).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .configuration_gemma_rvq import encoder_frames

logger = logging.get_logger(__name__)

FAMILIES = ("gemma4_audio", "hubert", "wav2vec2", "whisper")


def _classes(family: str) -> tuple[type, type, type]:
    """``(config_class, model_class, feature_extractor_class)`` of a family (imported on demand)."""
    import transformers

    if family == "gemma4_audio":
        return transformers.Gemma4AudioConfig, transformers.Gemma4AudioModel, transformers.Gemma4AudioFeatureExtractor
    if family == "hubert":
        return transformers.HubertConfig, transformers.HubertModel, transformers.Wav2Vec2FeatureExtractor
    if family == "wav2vec2":
        return transformers.Wav2Vec2Config, transformers.Wav2Vec2Model, transformers.Wav2Vec2FeatureExtractor
    if family == "whisper":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return transformers.WhisperConfig, WhisperEncoder, transformers.WhisperFeatureExtractor
    raise ValueError(f"unknown encoder family {family!r}; expected one of {FAMILIES}")


def build_encoder(family: str, encoder_config: dict[str, Any], attn_implementation: str | None = None) -> nn.Module:
    """A randomly initialised encoder of ``family`` from its config dict (weights come from a checkpoint).

    ``attn_implementation`` (``"eager"``, ``"sdpa"``, ...) is the encoder's attention; ``None``: its default.
    """
    config_cls, model_cls, _ = _classes(family)
    config_dict = {k: v for k, v in encoder_config.items() if k not in ("transformers_version", "architectures")}
    config = config_cls(**config_dict)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return model_cls(config)


def supports_sdpa(family: str) -> bool:
    """Whether the family's encoder runs with ``attn_implementation="sdpa"`` (Gemma 4's audio tower does not)."""
    return bool(_classes(family)[1]._supports_sdpa)


def load_encoder(family: str, name_or_path: str, *, revision: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a pretrained encoder of ``family`` (Hub id or local directory).

    Gemma 4: ``Gemma4AudioModel.from_pretrained`` also takes a full Gemma 4 checkpoint (just the audio
    tower is loaded). Whisper: a saved ``WhisperEncoder`` or any Whisper model checkpoint (the encoder is
    kept, the decoder dropped).
    """
    _, model_cls, _ = _classes(family)
    if revision is not None:
        kwargs["revision"] = revision
    if family == "whisper":
        import transformers

        config = transformers.AutoConfig.from_pretrained(name_or_path, revision=revision)
        if "WhisperEncoder" not in (getattr(config, "architectures", None) or []):
            return transformers.WhisperModel.from_pretrained(name_or_path, **kwargs).get_encoder()
    return model_cls.from_pretrained(name_or_path, **kwargs)


def build_feature_extractor(
    family: str,
    feature_extractor_config: dict[str, Any] | None = None,
    name_or_path: str | None = None,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    warn: bool = True,
) -> Any:
    """The family's feature extractor: from ``feature_extractor_config``, else the one saved with the
    encoder at ``name_or_path`` (only from disk or the Hub cache with ``local_files_only``), else the
    family's defaults."""
    _, _, fe_cls = _classes(family)
    if feature_extractor_config is not None:
        # Only constructor arguments: derived attributes (hop_length, n_samples, ...) are recomputed.
        accepted = set(inspect.signature(fe_cls.__init__).parameters) - {"self", "kwargs"}
        return fe_cls(**{k: v for k, v in feature_extractor_config.items() if k in accepted})
    if name_or_path is not None:
        try:
            return fe_cls.from_pretrained(name_or_path, revision=revision, local_files_only=local_files_only)
        except (OSError, ValueError) as err:  # no preprocessor_config.json next to the encoder
            (logger.warning if warn else logger.info)(
                f"no feature extractor found at {name_or_path!r} ({type(err).__name__}); using the default "
                f"{fe_cls.__name__}(). Set config.feature_extractor_config if the encoder needs other settings."
            )
    return fe_cls()


def _check_layer(layer: int | None, num_layers: int, family: str) -> int:
    if layer is None:
        return num_layers
    if not 0 <= layer <= num_layers:
        raise ValueError(f"encoder_layer={layer} is out of range for a {num_layers}-layer {family} encoder")
    if family == "gemma4_audio" and layer == 0:
        raise ValueError("encoder_layer=0 is not supported for gemma4_audio (use >= 1: a conformer layer's output)")
    return layer


def prepare_encoder(family: str, model: nn.Module, layer: int | None) -> nn.Module:
    """Freeze ``model`` in place and cut it down to what ``hidden_states[layer]`` needs (see module doc)."""
    if family == "gemma4_audio":
        k = _check_layer(layer, model.config.num_hidden_layers, family)
        model.layers = nn.ModuleList(list(model.layers)[:k])
        model.config.tie_last_hidden_states = False
    elif family in ("hubert", "wav2vec2"):
        encoder = model.encoder
        k = _check_layer(layer, model.config.num_hidden_layers, family)
        encoder.layers = nn.ModuleList(list(encoder.layers)[:k])
        # Stable-layer-norm encoders (large models) apply a final LayerNorm after the last layer, which no
        # `hidden_states[k]` includes; the others apply theirs before the first layer (part of every state).
        if model.config.do_stable_layer_norm and layer is not None:
            encoder.layer_norm = nn.Identity()
        # layerdrop and masking only act in training mode, which a frozen encoder never enters.
    elif family == "whisper":
        k = _check_layer(layer, model.config.encoder_layers, family)
        model.layers = nn.ModuleList(list(model.layers)[:k])
        if layer is not None:
            model.layer_norm = nn.Identity()
    else:
        raise ValueError(f"unknown encoder family {family!r}")
    model.eval()
    model.requires_grad_(False)
    return model


class EncoderAdapter:
    """Runs a frozen encoder on a list of waveforms and returns aligned frame embeddings.

    Not an ``nn.Module``: it holds a reference to the encoder (registered, or not, by its owner).

    Args:
        family: one of ``FAMILIES``.
        model: the encoder, already passed through [`prepare_encoder`].
        feature_extractor: the family's feature extractor.
        window_seconds: longest piece of audio given to the encoder at once.
        overlap_seconds: overlap between consecutive windows of a long clip.
    """

    def __init__(
        self,
        family: str,
        model: nn.Module,
        feature_extractor: Any,
        *,
        window_seconds: float,
        overlap_seconds: float,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown encoder family {family!r}; expected one of {FAMILIES}")
        self.family = family
        self.model = model
        self.feature_extractor = feature_extractor
        self.sampling_rate = int(feature_extractor.sampling_rate)
        # Frame arithmetic from the one table (configuration_gemma_rvq.ENCODER_FAMILIES), resolved with the
        # live encoder's config and the layers actually kept.
        layers = model.encoder.layers if family in ("hubert", "wav2vec2") else model.layers
        self.frames = encoder_frames(family, self.sampling_rate, model.config.to_dict(), len(layers))
        self.samples_per_frame = self.frames.samples_per_frame
        self.min_samples = self.frames.min_samples
        # Gemma 4's conformer barely looks ahead (causal light convolutions, attention with
        # `attention_context_right` frames of right context, 0 by default, and two subsampling
        # convolutions): a window's last frames are as good as any, its first ones lack left context. So
        # seams sit `right_context_frames` before the end of the earlier window (never before the middle
        # of the overlap); for bidirectional encoders they sit in the middle of the overlap.
        lookahead = self.frames.lookahead_frames
        self.right_context_frames = 1 << 30 if lookahead is None else lookahead
        if self.frames.window_samples is not None:
            window_seconds = min(window_seconds, self.frames.window_samples / self.sampling_rate)
        spf = self.samples_per_frame
        self.window = max(spf, int(window_seconds * self.sampling_rate) // spf * spf)
        # Overlap: whole frames, even (two halves), at least 4 frames so that conv edge effects never
        # leave a gap between windows.
        overlap_frames = max(4, round(overlap_seconds * self.sampling_rate / spf))
        overlap_frames += overlap_frames % 2
        self.overlap = min(overlap_frames * spf, self.window // 2 // (2 * spf) * (2 * spf))

    @property
    def frame_rate(self) -> float:
        return self.frames.frame_rate

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ one padded forward
    @torch.no_grad()
    def forward_batch(self, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded encoder forward over ``clips`` (each float32 ``[S_i]`` at ``sampling_rate``, at most
        ``window`` samples) -> embeddings ``[B, T, D]`` (encoder dtype/device) and mask ``[B, T]`` bool."""
        if self._per_clip([len(c) for c in clips]):
            # GroupNorm over time sees the padding: run clips one at a time (exact), then pad.
            outs = [self.forward_batch([c]) for c in clips]
            return _pad_frames([o[0][0, : int(o[1].sum())] for o in outs])
        hidden, mask, _ = self.run(*self.features(clips))
        return hidden, mask

    def _per_clip(self, lengths: list[int]) -> bool:
        group_norm = getattr(self.model.config, "feat_extract_norm", None) == "group"
        return group_norm and len(set(lengths)) > 1

    def features(self, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The feature extractor on ``clips`` -> the encoder's input (``input_features`` for Gemma 4 and
        Whisper, ``input_values`` for HuBERT / wav2vec2) and its mask (mel frames or samples), as the
        feature extractor returns them with ``return_attention_mask=True``."""
        if self.family == "gemma4_audio":
            feats = self.feature_extractor(
                clips, truncation=False, padding="longest", return_attention_mask=True, return_tensors="pt"
            )
            return feats["input_features"], feats["input_features_mask"]
        if self.family == "whisper":
            feats = self.feature_extractor(
                clips, sampling_rate=self.sampling_rate, padding="max_length", truncation=True,
                return_attention_mask=True, return_tensors="pt",
            )
            return feats["input_features"], feats["attention_mask"]
        feats = self.feature_extractor(
            clips, sampling_rate=self.sampling_rate, padding="longest", return_attention_mask=True,
            return_tensors="pt",
        )
        return feats["input_values"], feats["attention_mask"]

    @torch.no_grad()
    def run(
        self, inputs: torch.Tensor, input_mask: torch.Tensor, *, output_hidden_states: bool | list[int] = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.BoolTensor, Any]:
        """The encoder on prepared inputs (what `features` or the feature extractor returns).

        Args:
            inputs: ``input_features`` (Gemma 4 ``[B, F, n_mels]``, Whisper ``[B, n_mels, 3000]``) or
                ``input_values`` (HuBERT / wav2vec2 ``[B, S]``).
            input_mask: ``[B, F]`` / ``[B, 3000]`` mel-frame mask or ``[B, S]`` sample mask (1 = real).
            output_hidden_states, output_attentions: also return the encoder's own (kept layers only);
                ``output_hidden_states`` may list the indices to keep (the others are ``None``), as transformers.

        Returns:
            ``(embeddings [B, T, D], mask [B, T] bool, encoder output)``; the output carries ``hidden_states``
            / ``attentions`` when asked.
        """
        x = inputs.to(self.device, self.dtype)
        input_mask = input_mask.to(self.device)
        extra = {"output_attentions": True} if output_attentions else {}
        if self.family == "gemma4_audio":
            # Keep only the wanted state (index k of k kept layers; [0] is the input of the first layer)
            # unless all are asked for: transformers >= 5.2x accepts indices.
            last = len(self.model.layers)
            wanted: bool | list[int] = [last]
            if isinstance(output_hidden_states, (list, tuple)):
                wanted = sorted({i % (last + 1) for i in output_hidden_states} | {last})
            elif output_hidden_states:
                wanted = True
            out = self.model(x, attention_mask=input_mask, output_hidden_states=wanted, **extra)
            hidden = out.hidden_states[-1]
            if hidden is None:  # pragma: no cover - depends on the transformers version
                hidden = self.model(x, attention_mask=input_mask, output_hidden_states=True).hidden_states[-1]
            mask = out.attention_mask.bool()
            # the feature extractor pads to a multiple of 128 samples: drop frames that are padding in every row
            frames = int(mask.sum(-1).max())
            return hidden[:, :frames], mask[:, :frames], _select_hidden_states(out, output_hidden_states)
        if self.family == "whisper":
            out = self.model(x, output_hidden_states=bool(output_hidden_states), **extra)
            mask = input_mask[:, ::2].bool()  # mel frames -> encoder frames
            frames = int(mask.sum(-1).max())  # drop the frames of the window's padding
            return out.last_hidden_state[:, :frames], mask[:, :frames], _select_hidden_states(out, output_hidden_states)
        if self._per_clip(input_mask.sum(-1).tolist()):
            if output_hidden_states or output_attentions:
                raise ValueError("output_hidden_states / output_attentions need clips of one length with a "
                                 "GroupNorm feature encoder (it is run one clip at a time)")
            rows = [self.run(x[i : i + 1, : int(n)], input_mask[i : i + 1, : int(n)])
                    for i, n in enumerate(input_mask.sum(-1))]
            hidden, mask = _pad_frames([h[0, : int(m.sum())] for h, m, _ in rows])
            return hidden, mask, None
        out = self.model(x, attention_mask=input_mask, output_hidden_states=bool(output_hidden_states), **extra)
        hidden = out.last_hidden_state
        lengths = self.model._get_feat_extract_output_lengths(input_mask.sum(-1))
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return hidden, mask, _select_hidden_states(out, output_hidden_states)

    # ------------------------------------------------------------------ long audio
    def plan(self, num_samples: int) -> list[int]:
        """Window start samples for a clip of ``num_samples`` samples (``[0]`` when it fits one window)."""
        if num_samples <= self.window:
            return [0]
        spf, hop = self.samples_per_frame, self.window - self.overlap
        starts = list(range(0, num_samples - self.window, hop))
        # Last window: flush with the end of the clip (rounded up to a whole frame), never past it.
        last = -(-(num_samples - self.window) // spf) * spf
        if last > starts[-1]:
            starts.append(last)
        return starts

    #: windows per encoder forward for long audio (``None``: as many as there are clips in the call)
    windows_per_forward: int | None = None

    def __call__(self, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``[B, T, D]`` and mask ``[B, T]`` of clips of any length.

        Clips that fit one window go through one padded forward. Longer clips are cut into windows
        (``plan``) that go through the encoder ``len(clips)`` at a time (``windows_per_forward``), so peak
        memory is that of one batch of full windows whatever the clips' length; only kept frames are held.
        """
        plans = [self.plan(len(c)) for c in clips]
        if all(len(p) == 1 for p in plans):
            return self.forward_batch(list(clips))
        spf = self.samples_per_frame
        # (clip, window index, frame offset of the window, frame offset of the next window or None)
        jobs = [
            (i, j, s // spf, plan[j + 1] // spf if j + 1 < len(plan) else None)
            for i, plan in enumerate(plans)
            for j, s in enumerate(plan)
        ]
        parts: list[list[torch.Tensor]] = [[] for _ in clips]
        kept_until = [0] * len(clips)  # frames of each clip stitched so far
        group = max(1, self.windows_per_forward or len(clips))
        for g in range(0, len(jobs), group):
            batch = jobs[g : g + group]
            hidden, mask = self.forward_batch([clips[i][off * spf : off * spf + self.window] for i, _, off, _ in batch])
            for row, (i, _, off, next_off) in enumerate(batch):
                end = off + int(mask[row].sum())
                if next_off is None:
                    hi = end
                else:  # middle of the overlap, or later when the encoder barely looks ahead
                    hi = max((next_off + end) // 2, end - self.right_context_frames)
                lo = kept_until[i]
                hi = min(end, max(lo, hi))
                parts[i].append(hidden[row, lo - off : hi - off].clone())  # not a view: frees the batch
                kept_until[i] = hi
            del hidden, mask
        return _pad_frames([torch.cat(p) if len(p) > 1 else p[0] for p in parts])


def _select_hidden_states(out: Any, wanted: bool | list[int]) -> Any:
    """``out`` with only the hidden states listed in ``wanted`` (the others ``None``) when it is a list."""
    states = getattr(out, "hidden_states", None)
    if isinstance(wanted, (list, tuple)) and states is not None:
        keep = {i % len(states) for i in wanted}
        out.hidden_states = tuple(h if i in keep else None for i, h in enumerate(states))
    return out


def _pad_frames(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of ``[T_i, D]`` to ``[B, T, D]`` with zeros; mask ``[B, T]`` True on valid frames."""
    lengths = torch.tensor([f.shape[0] for f in frames])
    out = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)
    mask = torch.arange(out.shape[1])[None, :] < lengths[:, None]
    return out, mask.to(out.device)


__all__ = [
    "FAMILIES",
    "EncoderAdapter",
    "build_encoder",
    "build_feature_extractor",
    "load_encoder",
    "prepare_encoder",
    "supports_sdpa",
]
