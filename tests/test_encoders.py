"""Encoder adapters on tiny random configs of the real transformers encoders: layer selection, masks,
padding invariance, long-audio chunking and stitching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gemma_rvq.encoders import EncoderAdapter, build_encoder
from gemma_rvq.testing import tiny_rvq_model

SR = 16000


def _fit(model, make_speech):
    clips = [make_speech(2.0, SR, seed=s) for s in range(2)]
    emb, mask = model.embed(clips, sampling_rate=SR)
    model.quantizer.kmeans_init(model.project_in(emb[mask]).detach())
    return model


def _assert_batch_equals_singles(model, clips):
    batched = model.encode(clips, sampling_rate=SR)
    assert batched.audio_codes.shape[0] == len(clips)
    distinct = set()
    for i, clip in enumerate(clips):
        single = model.encode([clip], sampling_rate=SR)
        n = int(single.codes_mask.sum())
        assert int(batched.codes_mask[i].sum()) == n
        assert not batched.codes_mask[i, n:].any()
        torch.testing.assert_close(batched.embeddings[i, :n], single.embeddings[0, :n], atol=1e-4, rtol=1e-4)
        assert torch.equal(batched.audio_codes[i, :, :n], single.audio_codes[0, :, :n]), f"clip {i}"
        assert (batched.audio_codes[i, :, n:] == 0).all()
        distinct |= set(single.audio_codes[0, 0].tolist())
    assert len(distinct) >= 4, "codes are not diverse enough for this test to mean anything"


def test_gemma4_batched_equals_one_at_a_time(tiny_gemma4_rvq, make_speech):
    clips = [make_speech(0.5, SR, seed=1), make_speech(9.0, SR, seed=2), make_speech(2.3, SR, seed=3)]
    _assert_batch_equals_singles(tiny_gemma4_rvq, clips)


def test_hubert_batched_equals_one_at_a_time(tiny_hubert_rvq, make_speech):
    clips = [make_speech(0.5, SR, seed=1), make_speech(9.0, SR, seed=2)]
    _assert_batch_equals_singles(tiny_hubert_rvq, clips)


def test_group_norm_wav2vec2_is_run_per_clip_and_stays_exact(make_speech):
    model = _fit(tiny_rvq_model("wav2vec2", num_quantizers=2, codebook_size=16), make_speech)
    adapter = model._encoder_adapter()
    assert model.get_audio_encoder().config.feat_extract_norm == "group"
    clips = [make_speech(0.5, SR, seed=1), make_speech(9.0, SR, seed=2)]
    # Why the adapter falls back: one padded forward through GroupNorm is NOT padding-invariant.
    inputs, mask = adapter.features(clips)
    with torch.no_grad():
        naive = adapter.model(inputs, attention_mask=mask).last_hidden_state
    alone, _ = adapter.forward_batch(clips[:1])
    n = alone.shape[1]
    assert (naive[0, :n] - alone[0]).abs().max() > 1e-3
    _assert_batch_equals_singles(model, clips)
    # the feature extractor's padded output is run one row at a time too
    from_features, features_mask, _ = adapter.run(inputs, mask)
    torch.testing.assert_close(from_features[0, :n], alone[0], atol=1e-4, rtol=1e-4)
    assert features_mask.sum(-1).tolist() == [n, model.get_encoded_length(len(clips[1]))]


def test_padded_tensor_with_padding_mask_equals_list_input(tiny_gemma4_rvq, make_speech):
    a, b = make_speech(1.0, SR, seed=4), make_speech(2.5, SR, seed=5)
    batch = torch.zeros(2, len(b))
    batch[0, : len(a)] = torch.from_numpy(a)
    batch[1] = torch.from_numpy(b)
    padding_mask = torch.zeros(2, len(b), dtype=torch.bool)
    padding_mask[0, : len(a)] = True
    padding_mask[1] = True
    from_tensor = tiny_gemma4_rvq.encode(batch, padding_mask, sampling_rate=SR)
    from_list = tiny_gemma4_rvq.encode([a, b], sampling_rate=SR)
    assert torch.equal(from_tensor.codes_mask, from_list.codes_mask)
    assert torch.equal(from_tensor.audio_codes, from_list.audio_codes)


@pytest.mark.parametrize(
    ("family", "seconds", "expected"),
    [("gemma4_audio", 0.5, 13), ("gemma4_audio", 9.0, 225), ("hubert", 9.0, 449), ("whisper", 1.0, 50),
     ("whisper", 9.0, 450), ("wav2vec2", 0.5, 24)],
)
def test_frame_counts_follow_the_frame_rate(family, seconds, expected, make_speech):
    model = tiny_rvq_model(family)
    emb, mask = model.embed([make_speech(seconds, SR)], sampling_rate=SR)
    assert int(mask.sum()) == expected == emb.shape[1]
    assert abs(expected - seconds * model.config.frame_rate) <= 1
    adapter = model._encoder_adapter()
    assert adapter.frame_rate == model.config.frame_rate and adapter.min_samples == model.config.min_samples


@pytest.mark.parametrize("family", ["gemma4_audio", "hubert", "wav2vec2", "whisper"])
def test_get_encoded_length_predicts_every_frame_count(family):
    """The config's frame arithmetic equals what the real encoder gives, one padded batch of many lengths
    (every residue of the frame stride around short, medium and windowed long clips)."""
    model = tiny_rvq_model(family, encoder_kwargs={"feat_extract_norm": "layer"} if family in ("hubert", "wav2vec2") else None)
    base = model._encoder_adapter()
    adapter = EncoderAdapter(family, base.model, base.feature_extractor, window_seconds=1.0, overlap_seconds=0.2)
    spf, low = adapter.samples_per_frame, model.config.min_samples
    lengths = sorted({n for start in (low, 7 * spf) for n in range(start, start + spf + 2, 37)})
    lengths += [3 * SR - 1, 3 * SR, 3 * SR + 1, 3 * SR + spf // 2]
    rng = np.random.default_rng(0)
    _, mask = adapter([0.1 * rng.standard_normal(n).astype(np.float32) for n in lengths])
    assert len(adapter.plan(3 * SR)) > 1  # the long ones are windowed and stitched
    expected = model.get_encoded_length(torch.tensor(lengths))
    assert mask.sum(-1).tolist() == expected.tolist() == [model.get_encoded_length(n) for n in lengths]
    assert model.frames == adapter.frames == model.config.frames


def _full_hidden_states(family, truncated, encoder_config, features):
    full = build_encoder(family, encoder_config).eval()
    result = full.load_state_dict(truncated.state_dict(), strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        return full(**features, output_hidden_states=True).hidden_states, full


@pytest.mark.parametrize("stable", [False, True])
def test_hubert_layer_k_equals_hidden_states_k_of_the_full_model(stable, make_speech):
    kwargs = {"feat_extract_norm": "layer", "do_stable_layer_norm": stable}
    wave = make_speech(2.0, SR)
    for layer in (1, 3):
        model = tiny_rvq_model("hubert", encoder_layer=layer, encoder_kwargs=kwargs)
        assert len(model.encoder.encoder.layers) == layer  # unused layers are never run
        emb, _ = model.embed([wave], sampling_rate=SR)
        feats = model._encoder_adapter().feature_extractor(wave, sampling_rate=SR, return_tensors="pt")
        states, _ = _full_hidden_states("hubert", model.encoder, model.config.encoder_config,
                                        {"input_values": feats["input_values"]})
        torch.testing.assert_close(emb, states[layer], atol=1e-5, rtol=1e-5)


def test_whisper_layer_k_and_real_frames_only(make_speech):
    wave = make_speech(3.0, SR)
    model = tiny_rvq_model("whisper", encoder_layer=1)
    emb, mask = model.embed([wave], sampling_rate=SR)
    assert emb.shape[1] == 150 and mask.all()  # 3 s of a 30 s window: only the real frames
    feats = model._encoder_adapter().feature_extractor(wave, sampling_rate=SR, return_tensors="pt")
    states, _ = _full_hidden_states("whisper", model.encoder, model.config.encoder_config,
                                    {"input_features": feats["input_features"]})
    torch.testing.assert_close(emb[0], states[1][0, :150], atol=1e-5, rtol=1e-5)


def test_gemma4_default_layer_is_the_input_of_output_proj(tiny_gemma4_rvq, make_speech):
    wave = make_speech(2.0, SR)
    emb, mask = tiny_gemma4_rvq.embed([wave], sampling_rate=SR)
    encoder = tiny_gemma4_rvq.get_audio_encoder()
    feats = tiny_gemma4_rvq._encoder_adapter().feature_extractor([wave], truncation=False, return_tensors="pt")
    with torch.no_grad():
        out = encoder(feats["input_features"], attention_mask=feats["input_features_mask"])
        projected = encoder.output_proj(emb)
    assert emb.shape[-1] == 64 and out.last_hidden_state.shape[-1] == 96
    torch.testing.assert_close(projected[mask], out.last_hidden_state[out.attention_mask], atol=1e-5, rtol=1e-5)


def test_gemma4_layer_1_matches_hidden_states_1(make_speech):
    wave = make_speech(2.0, SR)
    model = tiny_rvq_model("gemma4_audio", encoder_layer=1)
    emb, _mask = model.embed([wave], sampling_rate=SR)
    feats = model._encoder_adapter().feature_extractor([wave], truncation=False, return_tensors="pt")
    states, _ = _full_hidden_states(
        "gemma4_audio", model.encoder, model.config.encoder_config,
        {"input_features": feats["input_features"], "attention_mask": feats["input_features_mask"]},
    )
    torch.testing.assert_close(emb, states[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- long audio
@pytest.mark.parametrize("family", ["gemma4_audio", "hubert", "whisper"])
def test_chunk_plan_covers_every_sample_on_frame_boundaries(family):
    adapter = tiny_rvq_model(family)._encoder_adapter()
    spf = adapter.samples_per_frame
    for seconds in (0.1, 29.99, 30.0, 30.01, 61.0, 95.0, 123.456):
        n = int(seconds * SR)
        starts = adapter.plan(n)
        assert starts[0] == 0 and all(s % spf == 0 for s in starts)
        assert starts == sorted(set(starts))
        assert starts[-1] + adapter.window >= n  # the last window reaches the end
        for a, b in itertools.pairwise(starts):
            assert b - a <= adapter.window - 4 * spf  # consecutive windows overlap by >= 4 frames
        assert (len(starts) == 1) == (n <= adapter.window)


def test_gemma4_95_seconds_frame_count(tiny_gemma4_rvq, make_speech):
    wave = make_speech(95.0, SR, seed=7)
    assert len(tiny_gemma4_rvq._encoder_adapter().plan(len(wave))) > 1
    out = tiny_gemma4_rvq.encode([wave], sampling_rate=SR)
    assert abs(out.audio_codes.shape[-1] - round(95.0 * 25)) <= 1 and bool(out.codes_mask.all())


def test_gemma4_stitched_frames_equal_an_unchunked_run(tiny_gemma4_rvq, make_speech):
    """Tiny Gemma 4 sees a limited left context (2 layers of local attention): seams placed near the end of
    the earlier window leave every kept frame with its full context, so stitching is exact."""
    wave = make_speech(7.3, SR, seed=8)
    base = tiny_gemma4_rvq._encoder_adapter()
    small = EncoderAdapter("gemma4_audio", base.model, base.feature_extractor, window_seconds=3.0,
                           overlap_seconds=1.5)
    assert len(small.plan(len(wave))) >= 3
    whole, whole_mask = base([wave])
    stitched, mask = small([wave])
    assert stitched.shape == whole.shape and torch.equal(mask, whole_mask)
    torch.testing.assert_close(stitched, whole, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("family", "seconds", "window"), [("hubert", 9.7, 3.0), ("whisper", 21.3, 8.0)])
def test_stitched_frames_sit_at_their_positions(family, seconds, window, make_speech, tiny_hubert_rvq):
    """Every stitched frame equals frame ``g - start / samples_per_frame`` of the window it was taken from
    (run alone), the windows used never go backwards, and the count equals an un-chunked run."""
    model = tiny_hubert_rvq if family == "hubert" else tiny_rvq_model("whisper")
    wave = make_speech(seconds, SR, seed=9)
    base = model._encoder_adapter()
    small = EncoderAdapter(family, base.model, base.feature_extractor, window_seconds=window, overlap_seconds=1.0)
    starts = small.plan(len(wave))
    assert len(starts) >= 3
    _, whole_mask = base([wave])
    stitched, mask = small([wave])
    assert torch.equal(mask, whole_mask) and stitched.shape[1] == whole_mask.shape[1]
    spf = small.samples_per_frame
    alone = [small.forward_batch([wave[s : s + small.window]])[0][0] for s in starts]
    used = []
    for g in range(stitched.shape[1]):
        sources = [
            j for j, (s, frames) in enumerate(zip(starts, alone))
            if 0 <= g - s // spf < frames.shape[0]
            and torch.allclose(stitched[0, g], frames[g - s // spf], atol=1e-4, rtol=1e-4)
        ]
        assert sources, f"frame {g} matches no window at its position"
        used.append(max(sources) if not used else min(j for j in sources if j >= used[-1]))
    assert set(used) == set(range(len(starts)))  # every window contributed


def test_long_and_short_clips_in_one_batch(tiny_gemma4_rvq, make_speech):
    waves = [make_speech(0.7, SR, seed=10), make_speech(33.0, SR, seed=11)]
    out = tiny_gemma4_rvq.encode(waves, sampling_rate=SR)
    lengths = out.codes_mask.sum(-1).tolist()
    assert abs(lengths[0] - 0.7 * 25) <= 1 and abs(lengths[1] - 33 * 25) <= 1
    single = tiny_gemma4_rvq.encode([waves[0]], sampling_rate=SR)
    assert torch.equal(single.audio_codes[0], out.audio_codes[0, :, : lengths[0]])


def test_audio_shorter_than_one_frame_is_rejected(tiny_gemma4_rvq):
    with pytest.raises(ValueError, match=r"input 1: too short"):
        tiny_gemma4_rvq.embed([np.zeros(16000, np.float32), np.zeros(100, np.float32)], sampling_rate=SR)


@pytest.mark.parametrize("family", ["gemma4_audio", "hubert", "whisper"])
def test_shortest_accepted_audio_gives_one_frame(family):
    model = tiny_rvq_model(family)
    n = model.config.min_samples
    wave = 0.1 * np.sin(np.arange(n) / 5).astype(np.float32)
    out = model.encode([wave], sampling_rate=SR)
    assert out.audio_codes.shape[-1] == 1 and bool(out.codes_mask.all())
    with pytest.raises(ValueError, match="too short"):
        model.encode([wave[:-1]], sampling_rate=SR)


def test_feature_extractor_resolution_order(tmp_path):
    from transformers import Gemma4AudioFeatureExtractor, Wav2Vec2FeatureExtractor

    from gemma_rvq.encoders import build_feature_extractor

    # 1. an explicit config wins (derived arrays are recomputed, not read)
    fe = build_feature_extractor("gemma4_audio", {"feature_size": 128, "mel_floor": 0.01, "hop_length": 999})
    assert isinstance(fe, Gemma4AudioFeatureExtractor) and float(fe.mel_floor) == 0.01 and fe.hop_length == 160
    # 2. the one saved next to the encoder
    Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(tmp_path / "with")
    assert build_feature_extractor("hubert", None, str(tmp_path / "with")).do_normalize is False
    # 3. the family default when there is none
    (tmp_path / "without").mkdir()
    fe = build_feature_extractor("hubert", None, str(tmp_path / "without"))
    assert isinstance(fe, Wav2Vec2FeatureExtractor) and fe.do_normalize is True
