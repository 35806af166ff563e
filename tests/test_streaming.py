"""Streaming tokenization (``model.stream``): Gemma 4 streams equal offline codes; the rest is windowed or refused."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import gemma_rvq
from gemma_rvq.streaming import Gemma4StreamingEncoder, StreamingTokenRenderer
from gemma_rvq.tokens import SemanticTokenFormat, format_for_model, get_format

SR = 16000


def _stream(model, wave, sizes, **kwargs):
    """Push ``wave`` in chunks of the given sizes (cycled) -> (codes [Q, T], codes returned by each push)."""
    stream = model.stream(SR, **kwargs)
    pieces, i, k = [], 0, 0
    while i < len(wave):
        size = sizes[k % len(sizes)]
        pieces.append(stream.push(wave[i : i + size]))
        i, k = i + size, k + 1
    pieces.append(stream.flush())
    return torch.cat(pieces, 1), pieces


def _edge_sizes(length: int, edge: int = 1300, middle: int = 4000) -> list[int]:
    """1-sample pushes over the first and last ``edge`` samples, ``middle``-sample pushes in between."""
    sizes = [1] * edge
    rest = length - 2 * edge
    sizes += [middle] * (rest // middle) + ([rest % middle] if rest % middle else [])
    return sizes + [1] * edge


def _near_tie_report(model, offline_emb, stream_emb, offline_codes, stream_codes, tol=1e-4):
    """Frames whose codes differ, each checked to be a near-tie: at the first differing level the two codes'
    squared distances to the offline residual differ by at most ``tol`` (relative), and the embeddings agree
    to float precision."""
    differing = (offline_codes != stream_codes).any(0).nonzero().flatten().tolist()
    with torch.no_grad():
        z = model.project_in(offline_emb.float())
        books = model.quantizer.codebooks.float()
        for t in differing:
            level = int((offline_codes[:, t] != stream_codes[:, t]).nonzero()[0])
            residual = z[t] - sum((books[j, offline_codes[j, t]] for j in range(level)), torch.zeros_like(z[t]))
            d_off = (residual - books[level, offline_codes[level, t]]).pow(2).sum()
            d_str = (residual - books[level, stream_codes[level, t]]).pow(2).sum()
            assert d_str - d_off <= tol * d_off, f"frame {t} level {level}: not a near-tie ({d_off}, {d_str})"
            rel = (stream_emb[t] - offline_emb[t]).norm() / offline_emb[t].norm()
            assert rel < 1e-4, f"frame {t}: embeddings differ by {rel:.2e}, more than float noise"
    return differing


# ------------------------------------------------------------------------------------ Gemma 4: exact
def test_gemma4_stream_equals_offline_for_many_chunkings(tiny_gemma4_rvq, make_speech):
    model = tiny_gemma4_rvq
    wave = make_speech(3.3, SR, seed=5)
    reference = model.encode(wave, sampling_rate=SR)
    ref_codes = reference.audio_codes[0]
    rng = np.random.default_rng(0)
    chunkings = {
        "10 ms": [160],
        "40 ms": [640],
        "160 ms": [2560],
        "2 s": [32000],
        "random": rng.integers(1, 6000, size=64).tolist(),
        "1-sample edges": _edge_sizes(len(wave)),
        "odd": [1, 639, 641, 7, 1279],
    }
    agree = total = 0
    for name, sizes in chunkings.items():
        codes, _ = _stream(model, wave, sizes)
        assert codes.shape == ref_codes.shape, name
        agree += int((codes == ref_codes).sum())
        total += codes.numel()
        if not torch.equal(codes, ref_codes):  # only float near-ties may differ: check each one
            encoder = Gemma4StreamingEncoder(model.get_audio_encoder(), model._encoder_adapter().feature_extractor)
            i, pieces = 0, []
            for k in range(10**6):
                if i >= len(wave):
                    break
                size = sizes[k % len(sizes)]
                pieces.append(encoder.push(wave[i : i + size]))
                i += size
            emb = torch.cat([*pieces, encoder.flush()])
            _near_tie_report(model, reference.embeddings[0], emb, ref_codes, codes)
    assert agree / total >= 0.999, f"{agree}/{total} frame-levels agree"


def test_gemma4_stream_embeddings_match_offline_to_float_precision(tiny_gemma4_rvq, make_speech):
    adapter = tiny_gemma4_rvq._encoder_adapter()
    wave = make_speech(2.0, SR, seed=6)
    offline, _ = tiny_gemma4_rvq.embed(wave, sampling_rate=SR)
    encoder = Gemma4StreamingEncoder(adapter.model, adapter.feature_extractor)
    streamed = torch.cat([encoder.push(wave[i : i + 1000]) for i in range(0, len(wave), 1000)] + [encoder.flush()])
    assert streamed.shape == offline[0].shape
    torch.testing.assert_close(streamed, offline[0], rtol=1e-4, atol=1e-5)


def test_frames_are_emitted_exactly_after_the_lookahead(tiny_gemma4_rvq, make_speech):
    """Frame t is returned by the push that brings the audio to t * 40 ms + lookahead_ms, not earlier."""
    stream = tiny_gemma4_rvq.stream(SR)
    assert stream.lookahead_ms == pytest.approx(40.0625)
    assert stream.frame_rate == 25 and stream.exact
    wave = make_speech(0.5, SR, seed=7)
    spf, lookahead = 640, round(stream.lookahead_ms * SR / 1000)
    for n in range(1, len(wave) + 1):
        codes = stream.push(wave[n - 1 : n])
        expected = max(0, (n - lookahead) // spf + 1)
        assert stream.frames_emitted == expected, n
        assert codes.shape == (2, 1 if n >= lookahead and (n - lookahead) % spf == 0 else 0)


@pytest.mark.parametrize("length", [0, 1, 100, 639])
def test_flush_of_a_clip_shorter_than_one_frame_gives_no_frame(tiny_gemma4_rvq, make_speech, length):
    stream = tiny_gemma4_rvq.stream(SR)
    wave = make_speech(0.1, SR, seed=8)[:length]
    for i in range(length):  # 1-sample pushes
        assert stream.push(wave[i : i + 1]).shape == (2, 0)
    codes = stream.flush()
    assert codes.shape == (2, 0) and codes.dtype == torch.long
    text = tiny_gemma4_rvq.stream(SR, token_format="ichigo")
    assert text.push(wave) + text.flush() == "<|sound_start|><|sound_end|>"


@pytest.mark.parametrize("length", [640, 641, 700, 1280, 1281, 1999])
def test_flush_of_short_clips_equals_offline(tiny_gemma4_rvq, make_speech, length):
    wave = make_speech(0.2, SR, seed=9)[:length]
    codes, _ = _stream(tiny_gemma4_rvq, wave, [1])
    reference = tiny_gemma4_rvq.encode(wave, sampling_rate=SR).audio_codes[0]
    assert torch.equal(codes, reference)


def test_stream_resamples_like_offline_encode(tiny_gemma4_rvq, make_speech):
    wave = make_speech(2.0, 22050, seed=10)
    stream = tiny_gemma4_rvq.stream(22050, num_quantizers=1)
    codes = torch.cat([stream.push(wave[i : i + 1234]) for i in range(0, len(wave), 1234)] + [stream.flush()], 1)
    reference = tiny_gemma4_rvq.encode(wave, sampling_rate=22050, num_quantizers=1).audio_codes[0]
    assert torch.equal(codes, reference)
    assert stream.received_ms == pytest.approx(2000, abs=0.1)


def test_integer_pcm_chunks_are_scaled_like_offline(tiny_gemma4_rvq, make_speech):
    pcm = (make_speech(1.0, SR, seed=11) * 32767).astype(np.int16)
    codes, _ = _stream(tiny_gemma4_rvq, pcm, [3000])
    assert torch.equal(codes, tiny_gemma4_rvq.encode(pcm, sampling_rate=SR).audio_codes[0])


def test_state_is_bounded_by_the_context_not_the_stream_length(tiny_gemma4_rvq, make_speech):
    stream = tiny_gemma4_rvq.stream(SR)
    wave = make_speech(2.0, SR, seed=12)
    sizes = []
    for _ in range(6):  # 12 s, pushed 2 s at a time in 160 ms chunks
        for i in range(0, len(wave), 2560):
            stream.push(wave[i : i + 2560])
        sizes.append(stream.state_nbytes)
    assert len(set(sizes)) == 1, sizes
    # per layer the attention window (24 frames of keys beside the relative keys, values, 12 queries) and
    # 4 conv frames, a few mel frames, < 1 frame of audio
    assert sizes[0] < 128 * 1024


def test_reset_starts_a_new_utterance(tiny_gemma4_rvq, make_speech):
    wave = make_speech(1.0, SR, seed=13)
    stream = tiny_gemma4_rvq.stream(SR)
    stream.push(make_speech(0.7, SR, seed=14))
    stream.flush()
    with pytest.raises(RuntimeError, match="reset"):
        stream.push(wave)
    with pytest.raises(RuntimeError, match="already flushed"):
        stream.flush()
    stream.reset()
    codes = torch.cat([stream.push(wave), stream.flush()], 1)
    assert torch.equal(codes, tiny_gemma4_rvq.encode(wave, sampling_rate=SR).audio_codes[0])


# ------------------------------------------------------------------------------------ token text
def _formats() -> list[SemanticTokenFormat]:
    return [
        get_format("gemma_rvq", codebook_size=16, num_levels=2),
        get_format("gemma_rvq", codebook_size=16, num_levels=2, dedup=True),
        get_format("gemma_rvq", codebook_size=16, num_levels=2, dedup=True, duration_template="<|rvq_dur_{duration}|>"),
        get_format("ichigo", codebook_size=16),
        get_format("ichigo", codebook_size=16, max_duration=3),
        get_format("spire", codebook_size=16),
        SemanticTokenFormat.from_template("<u{code}>", separator=" ", dedup=True, duration_template="<d{duration}>",
                                          max_duration=4, codebook_size=16),
        SemanticTokenFormat.from_template("<u{code}>", separator=" ", codebook_size=16),
    ]


@pytest.mark.parametrize("fmt", _formats(), ids=lambda f: f.name)
def test_streamed_text_equals_render_of_the_whole_utterance(fmt):
    rng = np.random.default_rng(1)
    # runs of every length around max_duration, and single frames
    runs = [(int(rng.integers(0, 3)), int(rng.integers(0, 16))) for _ in range(60)]
    lengths = rng.choice([1, 1, 2, 3, 4, 5, 9, 50, 51, 99], size=len(runs))
    codes = np.concatenate([np.tile(np.array(r)[:, None], (1, n)) for r, n in zip(runs, lengths)], axis=1)
    for trial in range(4):
        renderer = StreamingTokenRenderer(fmt)
        cuts = np.sort(rng.choice(codes.shape[1], size=12 * trial, replace=False)) if trial else []
        pieces = [renderer.feed(part) for part in np.split(codes, cuts, axis=1)] + [renderer.close()]
        assert "".join(pieces) == fmt.render(codes)
    empty = StreamingTokenRenderer(fmt)
    assert empty.close() == fmt.render(np.zeros((2, 0), dtype=np.int64))


def test_a_run_is_written_only_once_it_is_closed():
    fmt = get_format("ichigo", codebook_size=16)
    renderer = StreamingTokenRenderer(fmt)
    assert renderer.feed([[5, 5, 5]]) == "<|sound_start|>"
    assert renderer.feed([[5]]) == ""  # the run is still open: its duration is unknown
    assert renderer.feed([[7]]) == "<|duration_04|><|sound_0005|>"
    assert renderer.feed(np.full((1, 49), 3)) == "<|sound_0007|><|duration_49|><|sound_0003|>"  # full chunk
    assert renderer.close() == "<|sound_end|>"
    spire = StreamingTokenRenderer(get_format("spire", codebook_size=16))  # no durations: written at once
    assert spire.feed([[5, 5]]) == chr(0xF0005)


def test_token_stream_of_the_model_equals_rendered_offline_codes(tiny_gemma4_rvq, make_speech):
    wave = make_speech(2.0, SR, seed=15)
    for name in ("gemma_rvq", "ichigo", "spire"):
        stream = tiny_gemma4_rvq.stream(SR, token_format=name)
        assert stream.lookahead_ms == pytest.approx(40.0625)
        text = "".join(stream.push(wave[i : i + 2560]) for i in range(0, len(wave), 2560)) + stream.flush()
        fmt = format_for_model(name, codebook_size=16, num_quantizers=2)
        assert text == fmt.render(tiny_gemma4_rvq.encode(wave, sampling_rate=SR).audio_codes[0]), name


# ------------------------------------------------------------------------------------ refusals
def test_bidirectional_encoders_refuse_without_a_stated_lookahead(tiny_hubert_rvq):
    with pytest.raises(ValueError, match=r"both directions.*lookahead_ms"):
        tiny_hubert_rvq.stream(SR)
    with pytest.raises(ValueError, match="receptive field"):
        tiny_hubert_rvq.stream(SR, lookahead_ms=10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling_rate": True}, "number of Hz"),
        ({"sampling_rate": "16000"}, "number of Hz"),
        ({"sampling_rate": float("nan")}, "whole number"),
        ({"sampling_rate": 0}, r"\[1000, 384000\]"),
        ({"sampling_rate": 16}, r"\[1000, 384000\]"),
        ({"sampling_rate": 16000, "num_quantizers": 3}, "num_quantizers"),
        ({"sampling_rate": 16000, "lookahead_ms": 200}, "fixed lookahead"),
        ({"sampling_rate": 16000, "token_format": get_format("gemma_rvq", codebook_size=16, num_levels=3)},
         "renders 3 levels"),
    ],
)
def test_bad_stream_arguments_are_refused(tiny_gemma4_rvq, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_gemma4_rvq.stream(**kwargs)


def test_stream_refuses_an_encoder_it_does_not_reproduce(monkeypatch):
    """The first stream of an encoder is checked against its offline forward: a mirror that computes
    differently (here: a wrong attention query scale, as another transformers version might) is refused."""
    from gemma_rvq.streaming import Gemma4StreamingEncoder
    from gemma_rvq.testing import tiny_rvq_model

    original = Gemma4StreamingEncoder._layer_constants

    def wrong(attn, position_embeddings):
        constants = original(attn, position_embeddings)
        return {**constants, "query_scale": constants["query_scale"] * 2}

    monkeypatch.setattr(Gemma4StreamingEncoder, "_layer_constants", staticmethod(wrong))
    with pytest.raises(RuntimeError, match="does not reproduce"):
        tiny_rvq_model("gemma4_audio").stream(SR)


def test_bad_chunks_are_refused(tiny_gemma4_rvq):
    stream = tiny_gemma4_rvq.stream(SR)
    with pytest.raises(ValueError, match="mono"):
        stream.push(np.zeros((2, 1600), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        stream.push(np.array([0.0, np.nan], dtype=np.float32))
    assert stream.push([]).shape == (2, 0)


# ------------------------------------------------------------------------------------ windowed streaming
def test_windowed_hubert_stream_has_the_offline_frames_and_stated_latency(tiny_hubert_rvq, make_speech):
    wave = make_speech(3.0, SR, seed=16)
    reference = tiny_hubert_rvq.encode(wave, sampling_rate=SR).audio_codes[0]
    stream = tiny_hubert_rvq.stream(SR, lookahead_ms=500, context_ms=1000)
    assert stream.lookahead_ms == 500 and not stream.exact and stream.frame_rate == 50
    pieces = []
    for i in range(0, len(wave), 2560):
        pieces.append(stream.push(wave[i : i + 2560]))
        n = min(i + 2560, len(wave))
        assert stream.frames_emitted == (n - 8000) // 320 + 1 if n >= 8000 else stream.frames_emitted == 0
    codes = torch.cat([*pieces, stream.flush()], 1)
    assert codes.shape == reference.shape
    agreement = float((codes == reference).float().mean())
    assert agreement > 0.8, agreement  # measured 0.96 on this tiny random encoder (docs/streaming.md)


def test_windowed_whisper_stream_frames(make_speech):
    from gemma_rvq.testing import tiny_rvq_model

    model = tiny_rvq_model("whisper", num_quantizers=2, codebook_size=16)
    wave = make_speech(1.0, SR, seed=17)
    stream = model.stream(SR, lookahead_ms=300)
    codes = torch.cat([stream.push(wave[:8000]), stream.push(wave[8000:]), stream.flush()], 1)
    assert codes.shape == model.encode(wave, sampling_rate=SR).audio_codes[0].shape
    with pytest.raises(ValueError, match="window"):
        model.stream(SR, lookahead_ms=300, context_ms=30000)


# ------------------------------------------------------------------------------------ long audio memory
_MEMORY_CHILD = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, torch
    from gemma_rvq.testing import tiny_rvq_model
    model = tiny_rvq_model("gemma4_audio", max_chunk_seconds=1.0, chunk_overlap_seconds=0.25)
    rng = np.random.default_rng(0)
    model.encode((rng.standard_normal(16000) * 0.1).astype(np.float32), sampling_rate=16000)  # warm up
    wave = (rng.standard_normal(int(float(sys.argv[1]) * 16000)) * 0.1).astype(np.float32)
    frames = model.encode(wave, sampling_rate=16000).audio_codes.shape[-1]
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, frames)
    """
)


@pytest.mark.slow  # two fresh Python processes (torch + transformers imports)
def test_long_audio_peak_memory_is_flat_in_the_clip_length():
    """10x longer audio (10x more windows) must not raise the peak RSS by more than 1.3x (one process each).

    With every window in one forward (the former behaviour) this measured 616 MB vs 440 MB (1.4x); window by
    window, 428 MB for both.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {
        seconds: subprocess.Popen([sys.executable, "-c", _MEMORY_CHILD, str(seconds)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        for seconds in (3, 30)
    }
    peaks = {}
    for seconds, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
        peak, frames = map(int, stdout.split())
        assert frames == seconds * 25
        peaks[seconds] = peak
    assert peaks[30] <= 1.3 * peaks[3], peaks


def test_windowed_long_audio_codes_do_not_depend_on_windows_per_forward(make_speech):
    from gemma_rvq.testing import tiny_rvq_model

    model = tiny_rvq_model("gemma4_audio", max_chunk_seconds=2.0, chunk_overlap_seconds=0.5)
    clips = [make_speech(7.3, SR, seed=18), make_speech(1.1, SR, seed=19), make_speech(4.9, SR, seed=20)]
    adapter = model._encoder_adapter()
    grouped = model.encode(clips, sampling_rate=SR)
    adapter.windows_per_forward = 100  # every window of every clip in one forward: the former behaviour
    try:
        together = model.encode(clips, sampling_rate=SR)
    finally:
        adapter.windows_per_forward = None
    assert torch.equal(grouped.codes_mask, together.codes_mask)
    assert torch.equal(grouped.audio_codes, together.audio_codes)
    torch.testing.assert_close(grouped.embeddings, together.embeddings, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ CLI
def test_cli_stream_prints_the_tokens_of_the_offline_codes(tiny_gemma4_rvq, make_speech, tmp_path, capsys):
    import soundfile

    from gemma_rvq.cli import main

    tiny_gemma4_rvq.save_pretrained(tmp_path / "ckpt")
    wave = make_speech(1.5, 22050, seed=21)
    soundfile.write(tmp_path / "a.wav", wave, 22050)
    assert main(["stream", str(tmp_path / "a.wav"), "-m", str(tmp_path / "ckpt"), "--chunk-ms", "160",
                 "--format", "ichigo"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    text = "".join(line.split("\t")[-1] for line in lines)
    fmt = format_for_model("ichigo", codebook_size=16, num_quantizers=2)
    assert text == fmt.render(tiny_gemma4_rvq.encode(wave, sampling_rate=22050).audio_codes[0])
    assert "lookahead 40.0625 ms" in captured.err and "p95" in captured.err
    assert main(["stream", "-m", str(tmp_path / "ckpt")]) == 1
    assert "give an audio file, or --mic" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ remote code
@pytest.mark.parametrize("name", ["streaming.py", "streaming_encoders.py", "streaming_plan.py"])
def test_streaming_module_imports_only_siblings_and_allowed_libraries(name):
    source = Path(gemma_rvq.__file__).parent / name
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            # flat siblings that are copied next to checkpoints too (search: through quantization.py)
            names = [node.module] if node.module else [a.name for a in node.names]
            assert set(names) <= {"audio", "tokens", "search", "streaming_encoders", "streaming_plan"}, names
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for module in modules:
                top = module.split(".")[0]
                assert top in sys.stdlib_module_names or top in {"torch", "numpy", "transformers", "__future__"}


_REMOTE_CHILD = textwrap.dedent(
    """
    import os, sys
    src = os.path.realpath(sys.argv[1])
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != src]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    import numpy as np, torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[2], trust_remote_code=True)
    assert "gemma_rvq" not in sys.modules and type(model).__module__.startswith("transformers_modules")
    wave = np.load(sys.argv[3])
    stream = model.stream(16000, token_format="ichigo")
    text = "".join(stream.push(wave[i : i + 2560]) for i in range(0, len(wave), 2560)) + stream.flush()
    print(text)
    """
)


@pytest.mark.slow  # two fresh Python processes (torch + transformers imports)
def test_stream_works_as_remote_code_without_the_package(tiny_gemma4_rvq, make_speech, tmp_path):
    tiny_gemma4_rvq.save_pretrained(tmp_path / "ckpt")
    for name in ("streaming.py", "streaming_encoders.py", "streaming_plan.py"):
        assert (tmp_path / "ckpt" / name).is_file(), name
    wave = make_speech(1.2, SR, seed=22)
    np.save(tmp_path / "wave.npy", wave)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    src = str(Path(gemma_rvq.__file__).parent.parent)
    out = subprocess.run(
        [sys.executable, "-I", "-c", _REMOTE_CHILD, src, str(tmp_path / "ckpt"), str(tmp_path / "wave.npy")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    fmt = format_for_model("ichigo", codebook_size=16, num_quantizers=2)
    assert out.stdout.strip() == fmt.render(tiny_gemma4_rvq.encode(wave, sampling_rate=SR).audio_codes[0])
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]


# ------------------------------------------------------------------------------ per-push fast paths
def test_packed_weights_stream_equals_offline_and_follow_weight_updates(tiny_gemma4_rvq, make_speech, monkeypatch):
    """Large fp32 CPU weights are packed once (oneDNN) for the few-frame products of a push; here every
    weight of the tiny encoder is packed. The codes stay the offline ones, and an in-place update of a
    weight (fine-tuning, load_state_dict) repacks it instead of streaming with the stale copy."""
    import copy

    from gemma_rvq import streaming_plan

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setattr(streaming_plan, "PACK_MIN_ELEMENTS", 0)
    model = copy.deepcopy(tiny_gemma4_rvq)
    wave = make_speech(2.0, SR, seed=21)
    codes, _ = _stream(model, wave, [2560])
    assert torch.equal(codes, model.encode(wave, sampling_rate=SR).audio_codes[0])
    encoder = model._encoder_adapter().model
    linear = encoder.layers[0].feed_forward1.ffw_layer_1.linear
    packed = streaming_plan._PACKED.get(linear)
    assert packed is not None, "the stream did not use the packed weight"
    x = torch.randn(5, linear.in_features, generator=torch.Generator().manual_seed(0))
    product = streaming_plan._Product(linear.weight, linear.bias, None, None, packed[1])  # the stream's product
    torch.testing.assert_close(product(x), torch.nn.functional.linear(x, linear.weight, linear.bias))

    with torch.no_grad():
        linear.weight.mul_(1.5)  # in place: same storage, new version
    codes, _ = _stream(model, wave, [2560])
    assert streaming_plan._PACKED[linear][0] != packed[0]
    offline = model.embed(wave, sampling_rate=SR)[0][0]
    adapter = model._encoder_adapter()
    stream = Gemma4StreamingEncoder(adapter.model, adapter.feature_extractor)
    emb = torch.cat([stream.push(wave[i : i + 2560]) for i in range(0, len(wave), 2560)] + [stream.flush()])
    torch.testing.assert_close(emb, offline, rtol=1e-4, atol=1e-5)
    assert torch.equal(codes, model.encode(wave, sampling_rate=SR).audio_codes[0])


def test_pack_weights_switch_is_set_through_gemma_rvq_streaming(tiny_gemma4_rvq, make_speech, monkeypatch):
    """The documented switch ``gemma_rvq.streaming.PACK_WEIGHTS = False`` reaches the plan (which lives in
    ``streaming_plan``): nothing is packed, and the codes are the offline ones."""
    import copy

    from gemma_rvq import streaming, streaming_plan

    monkeypatch.setattr(streaming_plan, "PACK_MIN_ELEMENTS", 0)
    monkeypatch.setattr(streaming, "PACK_WEIGHTS", False)
    assert streaming_plan.PACK_WEIGHTS is False and streaming.PACK_WEIGHTS is False
    model = copy.deepcopy(tiny_gemma4_rvq)
    wave = make_speech(1.0, SR, seed=23)
    codes, _ = _stream(model, wave, [2560])
    assert torch.equal(codes, model.encode(wave, sampling_rate=SR).audio_codes[0])
    linear = model._encoder_adapter().model.layers[0].feed_forward1.ffw_layer_1.linear
    assert linear not in streaming_plan._PACKED


def test_finite_clipping_bounds_are_applied_like_offline(tiny_gemma4_rvq, make_speech):
    """Gemma 4's clippable linears clamp their input and output; the stream skips clamps to (-inf, inf)
    only. With finite bounds (as real checkpoints have) the streamed embeddings equal the offline ones."""
    import copy

    model = copy.deepcopy(tiny_gemma4_rvq)
    encoder = model._encoder_adapter().model
    clippable = [m for m in encoder.modules() if type(m).__name__ == "Gemma4ClippableLinear"]
    assert clippable and all(m.use_clipped_linears for m in clippable)
    with torch.no_grad():
        for module in clippable:
            module.input_min.fill_(-0.5)
            module.input_max.fill_(0.5)
            module.output_min.fill_(-0.3)
            module.output_max.fill_(0.3)
    wave = make_speech(2.0, SR, seed=22)
    offline = model.embed(wave, sampling_rate=SR)[0][0]
    assert not torch.allclose(offline, tiny_gemma4_rvq.embed(wave, sampling_rate=SR)[0][0], atol=1e-2)  # it clips
    adapter = model._encoder_adapter()
    stream = Gemma4StreamingEncoder(adapter.model, adapter.feature_extractor)
    emb = torch.cat([stream.push(wave[i : i + 1000]) for i in range(0, len(wave), 1000)] + [stream.flush()])
    torch.testing.assert_close(emb, offline, rtol=1e-4, atol=1e-5)
    assert all(bound is not None for bounds in stream._clip_bounds.values() for bound in bounds)
    # the unclipped original: every clamp skipped, the same embeddings as its offline forward
    base = tiny_gemma4_rvq._encoder_adapter()
    unclipped = Gemma4StreamingEncoder(base.model, base.feature_extractor)
    emb = torch.cat([unclipped.push(wave[i : i + 1000]) for i in range(0, len(wave), 1000)] + [unclipped.flush()])
    torch.testing.assert_close(emb, tiny_gemma4_rvq.embed(wave, sampling_rate=SR)[0][0], rtol=1e-4, atol=1e-5)
    assert all(bound is None for bounds in unclipped._clip_bounds.values() for bound in bounds)
