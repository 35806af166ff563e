"""The encoder's compute dtype of the map transform: ``dtype="auto"``, explicit dtypes, the cache identity."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from datasets.fingerprint import Hasher

from gemma_rvq import precision
from gemma_rvq.precision import Precision, measure_encoder_dtype, native_bf16
from gemma_rvq.transforms import SpeechTokenizer


@pytest.fixture
def clips(make_speech) -> list[np.ndarray]:
    return [make_speech(2.0, 16000, seed=3), make_speech(1.3, 16000, seed=4)]


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(native=True/False)``: pretend this CPU does (not) have bf16 arithmetic; fresh choice cache."""
    monkeypatch.setattr(precision, "_CHOICES", {})

    def set_native(native: bool) -> None:
        monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512_bf16"} if native else {"avx512f"})

    return set_native


def reference(model, clips, encoder_dtype: torch.dtype) -> list[str]:
    """The codes the seed card computes: the encoder in ``encoder_dtype``, the quantizer in float32."""
    ref = copy.deepcopy(model)
    ref.get_audio_encoder().to(encoder_dtype)
    fmt = SpeechTokenizer(model, dtype=None).format  # the preset fitted to the model
    strings = []
    for clip in clips:
        out = ref.encode([torch.from_numpy(clip)], sampling_rate=16000)
        strings.append(fmt.render(out.audio_codes[0][:, out.codes_mask[0]].numpy()))
    return strings


def tokens(tok: SpeechTokenizer, clips) -> list[str]:
    return tok.tokenize(list(clips), [16000] * len(clips))["semantic_tokens"]


def test_native_bf16_reads_the_hardware(cpu):
    cpu(native=False)
    assert not native_bf16("cpu")
    cpu(native=True)
    assert native_bf16("cpu")
    assert not native_bf16("meta")  # other devices: never assumed
    if not torch.cuda.is_available():
        assert not native_bf16("cuda:0")  # no driver: not native (and CUDA is never initialised for it)
        assert not torch.cuda.is_initialized()


def test_auto_is_float32_where_bf16_is_not_native(tiny_gemma4_rvq, clips, cpu, monkeypatch):
    cpu(native=False)
    monkeypatch.setattr(precision, "measure_encoder_dtype", lambda *a: pytest.fail("timed without native bf16"))
    tok = SpeechTokenizer(tiny_gemma4_rvq)
    assert tok.dtype == "auto" and tok.precision == Precision("float32", "float32")
    assert tok.identity()["precision"] == {"encoder": "float32", "quantizer": "float32"}
    assert tokens(tok, clips) == tokens(SpeechTokenizer(tiny_gemma4_rvq, dtype=None), clips)
    assert tok.get_model() is tiny_gemma4_rvq  # already float32 on the CPU: no copy


@pytest.mark.parametrize("min_speedup, chosen", [(0.0, "bfloat16"), (float("inf"), "float32")])
def test_auto_times_the_encoder_on_a_native_bf16_cpu(tiny_gemma4_rvq, clips, cpu, monkeypatch, min_speedup, chosen):
    """The real timing decides (the threshold forces the outcome); the choice is in the cache identity, made
    once, carried to workers, and computes exactly what the explicit dtype computes."""
    cpu(native=True)
    monkeypatch.setattr(precision, "MIN_SPEEDUP", min_speedup)
    calls = []
    real = precision.measure_encoder_dtype
    monkeypatch.setattr(precision, "measure_encoder_dtype", lambda m: calls.append(1) or real(m))
    tok = SpeechTokenizer(tiny_gemma4_rvq)
    assert tok.precision.encoder == chosen and tok.precision.quantizer == "float32"
    first = Hasher.hash(tok)
    assert Hasher.hash(SpeechTokenizer(tiny_gemma4_rvq)) == first and len(calls) == 1  # once per process
    explicit = SpeechTokenizer(tiny_gemma4_rvq, dtype=chosen)
    assert explicit.identity()["precision"] == tok.identity()["precision"]
    assert tokens(tok, clips) == tokens(explicit, clips) == reference(tiny_gemma4_rvq, clips, getattr(torch, chosen))
    clone = pickle.loads(pickle.dumps(tok))  # what a num_proc worker receives: the decision, not "decide again"
    assert clone.precision == tok.precision and len(calls) == 1
    other = "float32" if chosen == "bfloat16" else "bfloat16"
    assert Hasher.hash(SpeechTokenizer(tiny_gemma4_rvq, dtype=other)) != first


def test_measure_encoder_dtype_times_both_and_leaves_the_model_alone(tiny_gemma4_rvq):
    before = {k: v.clone() for k, v in tiny_gemma4_rvq.state_dict().items()}
    choice, times = measure_encoder_dtype(tiny_gemma4_rvq, seconds=1.0)
    assert choice in ("float32", "bfloat16") and set(times) == {"float32", "bfloat16"}
    assert all(0 < t < 60 for t in times.values())
    assert (choice == "bfloat16") == (times["float32"] >= precision.MIN_SPEEDUP * times["bfloat16"])
    after = tiny_gemma4_rvq.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_explicit_dtype_casts_the_encoder_of_a_copy_only(tiny_gemma4_rvq, clips):
    tok = SpeechTokenizer(tiny_gemma4_rvq, dtype=torch.bfloat16)
    assert tok.dtype == "bfloat16" and tok.precision == Precision("bfloat16", "float32")
    used = tok.get_model()
    assert used is not tiny_gemma4_rvq and next(tiny_gemma4_rvq.parameters()).dtype == torch.float32
    assert next(used.get_audio_encoder().parameters()).dtype == torch.bfloat16
    assert used.quantizer.codebooks.dtype == torch.float32 and used.in_proj.weight.dtype == torch.float32
    assert tokens(tok, clips) == reference(tiny_gemma4_rvq, clips, torch.bfloat16)
    assert SpeechTokenizer(tiny_gemma4_rvq, dtype="float64").precision == Precision("float64", "float64")


def test_dtype_option_is_checked(tiny_gemma4_rvq):
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        SpeechTokenizer(tiny_gemma4_rvq, dtype="int8")
    with pytest.raises(ValueError, match="unknown dtype 'half-ish'"):
        SpeechTokenizer(tiny_gemma4_rvq, dtype="half-ish")
    assert SpeechTokenizer(tiny_gemma4_rvq, dtype=None).precision == Precision(None, None)


def test_path_model_is_read_once_when_auto_times_it(tiny_gemma4_rvq, clips, cpu, monkeypatch, tmp_path):
    import gemma_rvq.convert

    cpu(native=True)
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)  # bf16 wins: a second, cast copy is needed
    tiny_gemma4_rvq.save_pretrained(tmp_path / "m")
    loads = []
    real = gemma_rvq.convert.load_any
    monkeypatch.setattr(gemma_rvq.convert, "load_any", lambda *a, **k: loads.append(a) or real(*a, **k))
    tok = SpeechTokenizer(str(tmp_path / "m"))
    assert tok.precision.encoder == "bfloat16"
    assert tokens(tok, clips) == reference(tiny_gemma4_rvq, clips, torch.bfloat16)
    assert len(loads) == 1
