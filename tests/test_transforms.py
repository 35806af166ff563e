"""The datasets transform: SpeechTokenizer / tokenize_speech on the committed espeak-ng corpus (22.05 kHz)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile
import torch
from datasets import Audio, Dataset, load_from_disk
from datasets.fingerprint import Hasher
from datasets.utils._dill import dumps

import gemma_rvq
from gemma_rvq import model_registry, transforms
from gemma_rvq.audio import decode_audio, prepare_waveform
from gemma_rvq.testing import tiny_rvq_model
from gemma_rvq.tokens import get_format
from gemma_rvq.transforms import DEFAULT_MODEL, MODEL_ENV_VAR, SpeechTokenizer, tokenize_speech

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
N_CLIPS = 3


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def files() -> list[str]:
    rows = [json.loads(line) for line in (CORPUS / "metadata.jsonl").read_text().splitlines() if line]
    return [str(CORPUS / r["file"]) for r in rows[:: len(rows) // N_CLIPS][:N_CLIPS]]


@pytest.fixture(scope="module")
def model():
    return tiny_rvq_model(num_quantizers=8, codebook_size=16, seed=0).eval()


def bytes_dataset(files: list[str]) -> Dataset:
    ds = Dataset.from_dict({"audio": [{"bytes": Path(f).read_bytes(), "path": f} for f in files]})
    return ds.cast_column("audio", Audio(decode=False))


def file_backed(ds: Dataset, folder: Path) -> Dataset:
    ds.save_to_disk(str(folder))
    return load_from_disk(str(folder))


def direct(model, wave: np.ndarray, rate: int, fmt="gemma_rvq") -> tuple[str, np.ndarray]:
    """What the transform must produce for one clip: model.encode on that clip alone + format.render."""
    wave = prepare_waveform(wave, rate, model.config.sampling_rate)
    out = model.encode([wave], sampling_rate=model.config.sampling_rate)
    codes = out.audio_codes[0][:, out.codes_mask[0]].numpy()
    return get_format(fmt).render(codes), codes


@pytest.fixture(scope="module")
def expected(model, files) -> list[tuple[str, np.ndarray]]:
    result = []
    for f in files:
        wave, rate = decode_audio(f)
        assert rate == 22050  # the corpus' native rate: every test below exercises resampling
        result.append(direct(model, wave, rate))
    return result


class FakeSamples:
    def __init__(self, data, sample_rate):
        self.data, self.sample_rate = data, sample_rate


class DecoderLike:
    """The duck-typed protocol of torchcodec's AudioDecoder (torchcodec does not load here)."""

    def __init__(self, path: str) -> None:
        wave, self.rate = soundfile.read(path, dtype="float32")
        self.data = torch.from_numpy(np.stack([wave, wave]))  # [C, S], channels first

    def get_all_samples(self) -> FakeSamples:
        return FakeSamples(self.data, self.rate)


def test_map_equals_direct_encode_and_render(model, files, expected):
    tok = SpeechTokenizer(model, return_codes=True, return_num_frames=True, batch_size=4)
    out = bytes_dataset(files).map(tok, batched=True, batch_size=4)
    assert out.column_names == ["audio", "semantic_tokens", "audio_codes", "num_frames"]
    for row, (string, codes) in zip(out, expected):
        assert row["semantic_tokens"] == string
        assert row["semantic_tokens"].startswith("<|rvq_start|>")
        np.testing.assert_array_equal(np.asarray(row["audio_codes"]), codes)
        assert row["num_frames"] == codes.shape[1] > 10
    assert tok.stats["examples"] == len(files)
    assert tok.stats["encode_calls"] < len(files)  # clips were batched


def test_input_forms_agree(model, files, expected):
    strings = [s for s, _ in expected]
    tok = SpeechTokenizer(model)
    waves = [soundfile.read(f, dtype="float32") for f in files]
    # undecoded paths
    by_path = Dataset.from_dict({"audio": files}).cast_column("audio", Audio(decode=False))
    assert by_path.map(tok, batched=True)["semantic_tokens"] == strings
    # decoded dicts (array + sampling_rate)
    dicts = Dataset.from_dict({"audio": [{"array": w, "sampling_rate": r} for w, r in waves]})
    assert dicts.map(tok, batched=True)["semantic_tokens"] == strings
    # raw int16 PCM (the FLAC files' own samples) + a sampling-rate column, under other column names
    pcm = [np.round(w * 32768).clip(-32768, 32767).astype(np.int16) for w, _ in waves]
    raw = Dataset.from_dict({"speech": pcm, "sr": [r for _, r in waves]})
    tok_raw = SpeechTokenizer(model, audio_column="speech", sampling_rate_column="sr", output_column="units")
    with pytest.raises(ValueError, match="pcm_dtype"):  # int16 comes back from Arrow as int64
        raw.map(tok_raw, batched=True, batch_size=4)
    tok_raw = SpeechTokenizer(
        model, audio_column="speech", sampling_rate_column="sr", output_column="units", pcm_dtype="int16"
    )
    assert raw.map(tok_raw, batched=True, batch_size=4)["units"] == strings
    # AudioDecoder-like objects (stereo, channels first) through the same code path map uses
    assert tok({"audio": [DecoderLike(f) for f in files]})["semantic_tokens"] == strings
    # batched=False
    assert by_path.map(tok)["semantic_tokens"] == strings


def test_sorted_minibatches_keep_order_and_pad_little(model, files):
    # ten clips of 1.5-3 s: corpus clips concatenated and cut
    waves = [decode_audio(f)[0] for f in files]
    clips = [np.concatenate(waves[k % 3 : k % 3 + 2])[: int(22050 * (1.5 + k / 6))] for k in range(10)]
    order = np.random.default_rng(0).permutation(len(clips))
    ds = Dataset.from_dict({"audio": [clips[i] for i in order], "sr": [22050] * len(clips)})
    one = SpeechTokenizer(model, sampling_rate_column="sr", batch_size=1)
    many = SpeechTokenizer(model, sampling_rate_column="sr", batch_size=16, batch_seconds=30, max_padding=0.1)
    ref = ds.map(one, batched=True)["semantic_tokens"]
    got = ds.map(many, batched=True)["semantic_tokens"]
    assert got == ref  # dataset order restored, codes independent of batching
    streams = SpeechTokenizer(model, sampling_rate_column="sr", batch_size=2, cpu_streams=2)
    assert ds.map(streams, batched=True)["semantic_tokens"] == ref  # concurrent minibatches, same tokens
    assert streams.stats["encode_calls"] >= 3
    assert one.padding_fraction == 0.0
    assert many.stats["encode_calls"] <= len(clips) / 2
    assert 0.0 < many.padding_fraction < 0.1
    # without sorting the same batches would have padded far more
    lengths = np.array([len(c) for c in clips])[order]
    unsorted = 1 - lengths.sum() / sum(
        len(g) * g.max() for g in np.array_split(lengths, many.stats["encode_calls"])
    )
    assert unsorted > 2 * many.padding_fraction


def test_pickled_identity_is_small_stable_and_computed_once(model, monkeypatch):
    calls = []
    real = model_registry.state_dict_digest
    monkeypatch.setattr(model_registry, "state_dict_digest", lambda m: calls.append(1) or real(m))
    tok = SpeechTokenizer(model)
    first = Hasher.hash(tok)
    assert Hasher.hash(tok) == first and len(calls) == 1  # weights digest computed once
    assert len(dumps(tok)) < 4096  # no weights in the pickle
    assert Hasher.hash(SpeechTokenizer(model)) == first  # same weights, new object: same identity
    assert Hasher.hash(SpeechTokenizer(model, format="ichigo")) != first
    assert Hasher.hash(SpeechTokenizer(model, num_quantizers=1)) != first
    other = tiny_rvq_model(num_quantizers=8, codebook_size=16, seed=0)
    assert Hasher.hash(SpeechTokenizer(other)) == first  # equal weights, equal digest
    with torch.no_grad():
        other.quantizer.codebooks[0, 0, 0] += 1e-3
    assert Hasher.hash(SpeechTokenizer(other)) != first
    monkeypatch.setattr(gemma_rvq, "__version__", "999.0")
    assert Hasher.hash(SpeechTokenizer(model)) != first
    # Hub ids are identified by id + revision, without loading anything
    hub = SpeechTokenizer("someone/some-rvq", revision="a" * 40)
    assert hub.identity()["model"] == {"hub_id": "someone/some-rvq", "revision": "a" * 40}


def test_cache_hit_and_miss_with_model_object(model, files, tmp_path, monkeypatch):
    ds = file_backed(bytes_dataset(files[:2]), tmp_path / "ds")
    tok = SpeechTokenizer(model)
    first = ds.map(tok, batched=True)
    assert tok.stats["examples"] == 2
    again = SpeechTokenizer(model)
    second = ds.map(again, batched=True)
    assert again.stats["examples"] == 0  # served from the cache file
    assert second.cache_files == first.cache_files
    assert second["semantic_tokens"] == first["semantic_tokens"]

    changed = tiny_rvq_model(num_quantizers=8, codebook_size=16, seed=0)
    with torch.no_grad():
        changed.quantizer.codebooks.mul_(-1.0)
    miss = SpeechTokenizer(changed)
    third = ds.map(miss, batched=True)
    assert miss.stats["examples"] == 2 and third["semantic_tokens"] != first["semantic_tokens"]

    fmt = SpeechTokenizer(model, format="ichigo")
    assert ds.map(fmt, batched=True)["semantic_tokens"][0].startswith("<|sound_start|>")
    assert fmt.stats["examples"] == 2

    monkeypatch.setattr(gemma_rvq, "__version__", "999.0")
    upgraded = SpeechTokenizer(model)
    ds.map(upgraded, batched=True)
    assert upgraded.stats["examples"] == 2


def test_cache_with_a_path_and_num_proc(model, files, expected, tmp_path):
    path = tmp_path / "rvq"
    model.save_pretrained(path)
    ds = file_backed(bytes_dataset(files), tmp_path / "ds")
    tok = SpeechTokenizer(str(path), return_num_frames=True)
    out = ds.map(tok, batched=True, batch_size=3, num_proc=2, with_rank=True)
    assert out["semantic_tokens"] == [s for s, _ in expected]  # two workers, one model each, same result
    assert tok.stats["examples"] == 0  # the work happened in the workers

    hit = SpeechTokenizer(str(path), return_num_frames=True)
    ds.map(hit, batched=True, batch_size=3, num_proc=2, with_rank=True)
    assert hit.stats["examples"] == 0
    # single-process map: separate cache entry (num_proc is part of datasets' file naming), same tokens
    single = SpeechTokenizer(str(path), return_num_frames=True)
    assert ds.map(single, batched=True)["semantic_tokens"] == out["semantic_tokens"]

    changed = tiny_rvq_model(num_quantizers=8, codebook_size=16, seed=1)
    changed.save_pretrained(path)  # new weights at the same path
    miss = SpeechTokenizer(str(path), return_num_frames=True)
    ds.map(miss, batched=True)
    assert miss.stats["examples"] == len(files)


def test_num_proc_with_in_memory_model(model, files, expected):
    tok = SpeechTokenizer(model, batch_size=2)
    out = bytes_dataset(files).map(tok, batched=True, batch_size=2, num_proc=2)
    assert out["semantic_tokens"] == [s for s, _ in expected]


def bad_dataset(files: list[str], nan: bool = True, empty: bool = True) -> Dataset:
    good = [soundfile.read(f, dtype="float32")[0] for f in files[:3]]
    with_nan = good[1].copy()
    with_nan[100] = np.nan
    rows = [
        good[0],
        good[1],
        good[2],
        with_nan if nan else good[1],
        np.zeros(0, np.float32) if empty else good[2],
    ]
    rows.append(good[0])
    return Dataset.from_dict({"audio": [{"array": w, "sampling_rate": 22050} for w in rows]})


@pytest.mark.parametrize(
    ("row", "message"), [(3, "NaN"), (4, "empty"), (2, "cannot decode"), (1, "too short")]
)
def test_bad_rows_raise_naming_the_row(model, files, row, message):
    ds = bad_dataset(files, nan=row == 3, empty=row == 4)
    if row == 2:  # an unreadable file: garbage bytes in an undecoded audio column
        ds = bytes_dataset(files[:3])
        ds = Dataset.from_dict({"audio": [*ds["audio"][:2], {"bytes": b"not audio", "path": None}]})
        ds = ds.cast_column("audio", Audio(decode=False))
    if row == 1:  # shorter than one encoder frame
        ds = Dataset.from_dict(
            {
                "audio": [
                    {"array": np.ones(22050) * 0.1, "sampling_rate": 22050},
                    {"array": np.ones(100) * 0.1, "sampling_rate": 22050},
                ]
            }
        )
    tok = SpeechTokenizer(model)
    with pytest.raises(ValueError, match=rf"row {row}\b.*{message}"):
        ds.map(tok, batched=True, batch_size=2, with_indices=True)
    with pytest.raises(ValueError, match=rf"row {row % 2} of this batch.*{message}"):
        ds.map(tok, batched=True, batch_size=2)


def test_bad_rows_skip(model, files):
    ds = bad_dataset(files)
    tok = SpeechTokenizer(model, on_error="skip", return_codes=True, return_num_frames=True)
    out = ds.map(tok, batched=True, batch_size=4)
    clean = ds.select([0, 1, 2, 5]).map(SpeechTokenizer(model), batched=True)["semantic_tokens"]
    assert [out["semantic_tokens"][i] for i in (0, 1, 2, 5)] == clean
    assert out["semantic_tokens"][3] == out["semantic_tokens"][4] == ""
    errors = out["semantic_tokens_error"]
    assert errors[0] is None and errors[5] is None
    assert "NaN" in errors[3] and "empty" in errors[4]
    assert out["num_frames"][3] == 0 and out["audio_codes"][3] == [[]] * 8
    assert tok.stats["errors"] == 2


def test_default_transform_loads_lazily_from_env(model, files, expected, tmp_path, monkeypatch):
    assert tokenize_speech.identity()["model"]["hub_id"] in (DEFAULT_MODEL, os.environ.get(MODEL_ENV_VAR))
    path = tmp_path / "default"
    model.save_pretrained(path)
    monkeypatch.setenv(MODEL_ENV_VAR, str(path))
    assert not any(key[0] == str(path) for key in transforms._LOADED_MODELS)  # nothing loaded yet
    identity = tokenize_speech.identity()["model"]
    assert "digest" in identity
    out = bytes_dataset(files[:2]).map(tokenize_speech, batched=True)
    assert out["semantic_tokens"] == [s for s, _ in expected[:2]]
    assert any(key[0] == str(path) for key in transforms._LOADED_MODELS)
    # a copy sent through pickle (what num_proc does) loads the same model in its process
    clone = dumps(tokenize_speech)
    assert len(clone) < 4096


def test_long_clip_is_chunked_not_cut(files):
    model = tiny_rvq_model(
        num_quantizers=8, codebook_size=16, seed=0, max_chunk_seconds=3.0, chunk_overlap_seconds=1.0
    ).eval()
    long = np.concatenate([decode_audio(f)[0] for f in files])  # ~12 s at 22.05 kHz
    ds = Dataset.from_dict({"audio": [long, long[:22050]], "sr": [22050, 22050]})
    out = ds.map(SpeechTokenizer(model, sampling_rate_column="sr", return_num_frames=True), batched=True)
    string, codes = direct(model, long, 22050)
    assert out["semantic_tokens"][0] == string
    assert out["num_frames"][0] == codes.shape[1] == pytest.approx(len(long) / 22050 * 25, abs=2)


def test_options_are_validated(model):
    with pytest.raises(ValueError, match="on_error"):
        SpeechTokenizer(model, on_error="ignore")
    with pytest.raises(ValueError, match="batch_size"):
        SpeechTokenizer(model, batch_size=0)
    with pytest.raises(KeyError, match="no column 'audio'"):
        SpeechTokenizer(model)({"speech": [np.zeros(16000)]})
    with pytest.raises(ValueError, match="no sampling rate"):
        SpeechTokenizer(model)({"audio": [np.zeros(16000, np.float32)]})


def test_dtype_runs_on_a_copy_and_is_part_of_the_identity(model, files, expected):
    tok = SpeechTokenizer(model, dtype="bfloat16")
    strings = tok({"audio": files[:1]})["semantic_tokens"]
    assert strings[0].startswith("<|rvq_start|>") and strings[0].endswith("<|rvq_end|>")
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is never cast
    assert SpeechTokenizer(model)({"audio": files[:1]})["semantic_tokens"] == [expected[0][0]]
    assert Hasher.hash(tok) != Hasher.hash(SpeechTokenizer(model))


# ---------------------------------------------------------------------------------------------- audio input
# The issue-10 audio-input cases through the transform (the unit cases and model.encode: test_audio.py).
BAD_RATES = [True, "16000", float("nan"), float("inf"), 0, -16000, 16, 999, 384_001]


def _stereo(files) -> list[np.ndarray]:
    out = []
    for f in files:
        wave = decode_audio(f)[0]
        out.append(np.stack([wave, 0.5 * wave[::-1]]))  # [C, S], two different channels
    return out


def test_stereo_row_is_one_example_batched_or_not(model, files):
    stereo = _stereo(files[:2])
    mono = [s.mean(axis=0) for s in stereo]
    ref = [direct(model, m, 22050)[0] for m in mono]
    ds = Dataset.from_dict({"audio": [s.tolist() for s in stereo], "sr": [22050, 22050]})
    tok = SpeechTokenizer(model, sampling_rate_column="sr")
    assert ds.map(tok)["semantic_tokens"] == ref  # batched=False: one string per row, not per channel
    assert ds.map(tok, batched=True, batch_size=2)["semantic_tokens"] == ref
    assert ds.with_format("numpy").map(tok)["semantic_tokens"] == ref
    # one example given directly: a [C, S] array / tensor is one multi-channel example
    assert tok({"audio": stereo[0], "sr": 22050})["semantic_tokens"] == ref[0]
    fixed = SpeechTokenizer(model, sampling_rate=22050)
    assert fixed({"audio": torch.from_numpy(stereo[1])})["semantic_tokens"] == ref[1]
    assert fixed({"audio": stereo})["semantic_tokens"] == ref  # a list of them is a batch


@pytest.mark.parametrize("form", ["python ints", "torch.int64", "arrow int64"])
def test_int64_samples_through_the_transform(model, files, form):
    wave = decode_audio(files[0])[0]
    pcm = np.round(wave * 32767).astype(np.int16)
    ref = direct(model, pcm, 22050)[0]  # int16 scaled by its own width
    value = {"python ints": pcm.tolist(), "torch.int64": torch.from_numpy(pcm.astype(np.int64)),
             "arrow int64": None}[form]
    if form == "arrow int64":
        ds = Dataset.from_dict({"audio": [pcm], "sr": [22050]})
        refuse = SpeechTokenizer(model, sampling_rate_column="sr")
        with pytest.raises(ValueError, match=r"row 0\b.*pcm_dtype='int16'"):
            ds.map(refuse, batched=True, with_indices=True)
        accept = SpeechTokenizer(model, sampling_rate_column="sr", pcm_dtype="int16")
        assert ds.map(accept, batched=True)["semantic_tokens"] == [ref]
        return
    with pytest.raises(ValueError, match="no PCM width"):
        SpeechTokenizer(model, sampling_rate=22050).tokenize([value])
    assert SpeechTokenizer(model, sampling_rate=22050, pcm_dtype="int16").tokenize([value])["semantic_tokens"] == [ref]


def test_unscaled_float_row_is_refused_naming_the_peak(model, files):
    wave = decode_audio(files[0])[0]
    loud = (wave * 32767).astype(np.float32)  # int16 PCM cast to float without scaling
    ds = Dataset.from_dict({"audio": [{"array": wave, "sampling_rate": 22050},
                                      {"array": loud, "sampling_rate": 22050}]})
    with pytest.raises(ValueError, match=rf"row 1\b.*float samples reach {np.abs(loud).max():.6g}"):
        ds.map(SpeechTokenizer(model), batched=True, with_indices=True)
    out = ds.map(SpeechTokenizer(model, on_error="skip"), batched=True)
    assert out["semantic_tokens"][1] == "" and "float samples reach" in out["semantic_tokens_error"][1]


@pytest.mark.parametrize("rate", BAD_RATES, ids=repr)
def test_bad_sampling_rates_are_refused(model, files, rate):
    with pytest.raises(ValueError, match=r"\[1000, 384000\]"):
        SpeechTokenizer(model, sampling_rate=rate)
    wave = decode_audio(files[0])[0]
    with pytest.raises(ValueError, match=r"row 0\b.*\[1000, 384000\]"):
        SpeechTokenizer(model, sampling_rate_column="sr")({"audio": [wave], "sr": [rate]}, [0])
    with pytest.raises(ValueError, match=r"\[1000, 384000\]"):
        SpeechTokenizer(model)({"audio": [{"array": wave, "sampling_rate": rate}]})


def test_truncated_wav_row_is_refused(model, files, tmp_path):
    wave = decode_audio(files[0])[0]
    buffer = tmp_path / "clip.wav"
    soundfile.write(buffer, wave, 22050, subtype="PCM_16")
    data = buffer.read_bytes()
    ds = Dataset.from_dict({"audio": [{"bytes": data, "path": None}, {"bytes": data[: len(data) // 3], "path": None}]})
    ds = ds.cast_column("audio", Audio(decode=False))
    with pytest.raises(ValueError, match=r"row 1\b.*truncated"):
        ds.map(SpeechTokenizer(model), batched=True, with_indices=True)


def test_mistyped_local_path_fails_at_once(tmp_path, files):
    import time

    (tmp_path / "runs").mkdir()
    for name in ("./no-such-rvq", str(tmp_path / "missing"), "a/b/c", str(tmp_path / "runs" / "rvq")):
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="no such checkpoint file or folder"):
            SpeechTokenizer(name)({"audio": files[:1]})
        assert time.perf_counter() - start < 5


def test_offline_hub_id_fails_at_once_naming_the_model(monkeypatch, tmp_path, files):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv(MODEL_ENV_VAR, "someone/not-cached-rvq")
    start = time.perf_counter()
    with pytest.raises(OSError, match="someone/not-cached-rvq") as info:
        SpeechTokenizer()({"audio": files[:1]})
    assert time.perf_counter() - start < 5
    assert "GEMMA_RVQ_MODEL" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


# ---------------------------------------------------------------------------------------------- options
def test_every_option_travels_to_workers_and_undeclared_options_cannot_exist(model):
    import dataclasses
    import pickle

    from gemma_rvq.tokenizer_options import (
        OPTION_NAMES,
        SpeechTokenizerOptions,
        check_declared,
        check_keywords,
    )

    changed = {
        "audio_column": "speech", "sampling_rate_column": "sr", "sampling_rate": 22050, "pcm_dtype": "int16",
        "output_column": "units", "return_codes": True, "codes_column": "codes", "return_num_frames": True,
        "num_frames_column": "frames", "error_column": "err", "batch_size": 3, "batch_seconds": 7.0,
        "max_padding": 0.2, "cpu_streams": 2, "device": "cpu", "dtype": "bfloat16", "on_error": "skip",
        "num_quantizers": 1, "num_threads": 2,
    }  # fmt: skip
    assert set(changed) == set(OPTION_NAMES)  # a new option must be added here too
    tok = SpeechTokenizer(model, **changed)
    clone = pickle.loads(pickle.dumps(tok))  # what a num_proc worker receives
    assert clone.options == tok.options and all(getattr(clone, k) == v for k, v in changed.items())
    output = {f.name for f in dataclasses.fields(SpeechTokenizerOptions) if f.metadata["changes_output"]}
    assert set(tok.identity()["options"]) == output
    with pytest.raises(AttributeError):
        tok.batch_size = 8  # options are read-only: a changed copy would disagree with the cache identity

    def init(self, model=None, format=None, *, revision=None, undeclared_option=1, **_):
        pass

    with pytest.raises(TypeError, match=r"undeclared keywords \['undeclared_option'\]"):
        check_keywords(init, besides=("self", "model", "format", "revision", "_"))

    @dataclasses.dataclass
    class Forgot(SpeechTokenizerOptions):
        new_option: int = 0  # not made with option(..., changes_output=...)

    with pytest.raises(TypeError, match="new_option must be declared with option"):
        check_declared(Forgot)


# ---------------------------------------------------------------------------------------------- extras
_WITHOUT_EXTRAS = r"""
import sys
# as if only `pip install gemma-rvq` had run: every optional dependency is missing
for name in ("trl", "peft", "accelerate", "evaluate", "matplotlib", "sklearn", "joblib", "numba"):
    sys.modules[name] = None
import datasets
from gemma_rvq import SpeechTokenizer
ds = datasets.Dataset.from_dict({"audio": sys.argv[2:]}).cast_column("audio", datasets.Audio(decode=False))
out = ds.map(SpeechTokenizer(sys.argv[1]), batched=True)
assert all(s.startswith("<|rvq_start|>") for s in out["semantic_tokens"]), out["semantic_tokens"]
from gemma_rvq.commands import sft
from gemma_rvq.extras import require

def refused(call, extra):
    try:
        call()
    except ImportError as err:
        assert f"pip install 'gemma-rvq[{extra}]'" in str(err), str(err)
    else:
        raise SystemExit(f"{call} ran without its extra")

refused(lambda: __import__("gemma_rvq.recipes"), "sft")
refused(sft.make_parser, "sft")
refused(lambda: require("matplotlib", "training plots"), "train")
refused(lambda: require("evaluate", "the evaluate metric modules"), "metrics")
print("tokenized without extras")
"""


def test_tokenizing_needs_no_extra_and_a_missing_extra_is_named(model, files, tmp_path):
    import subprocess
    import sys

    model.save_pretrained(tmp_path / "rvq")
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, str(tmp_path / "rvq"), *files[:2]],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0 and "tokenized without extras" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- integrity
def _encoder_dir(path: Path, seed: int) -> Path:
    """A tiny Gemma 4 audio encoder saved as its own folder (what encoder_name_or_path points to)."""
    tiny_rvq_model(num_quantizers=8, codebook_size=16, seed=seed, bundle_encoder=False, encoder_path=str(path))
    return path


def test_cache_identity_covers_the_encoder_behind_encoder_name_or_path(files, tmp_path):
    encoder = _encoder_dir(tmp_path / "encoder", seed=0)
    rvq = tiny_rvq_model(num_quantizers=8, codebook_size=16, seed=0, bundle_encoder=False,
                         encoder_path=str(encoder))
    rvq.save_pretrained(tmp_path / "rvq")
    assert json.loads((tmp_path / "rvq" / "config.json").read_text()).get("encoder_config") is None  # by path
    ds = file_backed(bytes_dataset(files[:2]), tmp_path / "ds")
    first = SpeechTokenizer(str(tmp_path / "rvq"))
    out1 = ds.map(first, batched=True)["semantic_tokens"]
    assert "encoder" in first.identity()["model"]
    again = SpeechTokenizer(str(tmp_path / "rvq"))
    assert ds.map(again, batched=True)["semantic_tokens"] == out1 and again.stats["examples"] == 0  # a hit
    # replace the encoder at the same path: the RVQ folder is untouched, the tokens must be recomputed
    for name in os.listdir(encoder):
        os.remove(encoder / name)
    _encoder_dir(encoder, seed=1)
    replaced = SpeechTokenizer(str(tmp_path / "rvq"))
    out2 = ds.map(replaced, batched=True)["semantic_tokens"]
    assert replaced.stats["examples"] == 2  # a miss, not the old tokens
    transforms._LOADED_MODELS.clear()  # a fresh process: loads the new encoder
    assert out2 == SpeechTokenizer(str(tmp_path / "rvq"))({"audio": files[:2]})["semantic_tokens"]
    # an in-memory model whose encoder is referenced by path carries the encoder identity too
    assert SpeechTokenizer(rvq).identity()["model"]["encoder"] == replaced.identity()["model"]["encoder"]


def test_weights_changed_in_place_are_never_a_silent_stale_hit(files, tmp_path):
    model = tiny_rvq_model(num_quantizers=8, codebook_size=16, seed=0).eval()
    ds = file_backed(bytes_dataset(files[:2]), tmp_path / "ds")
    tok = SpeechTokenizer(model)
    before = ds.map(tok, batched=True)["semantic_tokens"]
    with torch.no_grad():
        model.quantizer.codebooks.mul_(-1.0)  # in place, after the transform was built
    after = ds.map(tok, batched=True)["semantic_tokens"]  # same transform object: a new identity, a miss
    assert after != before and after == ds.map(SpeechTokenizer(model), batched=True)["semantic_tokens"]
    # changed between fingerprint and call (what a map in flight would see): refused
    tok.identity()
    with torch.no_grad():
        model.quantizer.codebooks.mul_(-1.0)
    with pytest.raises(ValueError, match="changed after this SpeechTokenizer computed its cache identity"):
        tok({"audio": files[:1]})
    # a checkpoint folder rewritten in place with its old modification times
    path = tmp_path / "rvq"
    model.save_pretrained(path)
    by_path = SpeechTokenizer(str(path))
    by_path.identity()
    weights = path / "model.safetensors"
    stat = weights.stat()
    tiny_rvq_model(num_quantizers=8, codebook_size=16, seed=3).save_pretrained(path)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match="changed after this SpeechTokenizer computed its cache identity"):
        by_path({"audio": files[:1]})
    assert SpeechTokenizer(str(path)).identity() != by_path._handle._identity  # a new transform sees it


def test_a_format_that_does_not_fit_is_refused_when_the_transform_is_built(model, files, tmp_path):
    from gemma_rvq.tokens import get_format

    small = get_format("gemma_rvq", codebook_size=8, num_levels=8)  # the model has 16 codes per level
    deep = get_format("gemma_rvq", codebook_size=16, num_levels=8)
    with pytest.raises(ValueError, match=r"does not fit the model \(8 levels of 16 codes\).*below 8"):
        SpeechTokenizer(model, format=small, on_error="skip")
    with pytest.raises(ValueError, match=r"renders 8 levels"):
        SpeechTokenizer(model, format=deep, num_quantizers=2)
    with pytest.raises(ValueError, match="num_quantizers=9"):
        SpeechTokenizer(model, num_quantizers=9)
    model.save_pretrained(tmp_path / "rvq")  # a path: checked from its config.json, nothing loaded
    with pytest.raises(ValueError, match="does not fit the model"):
        SpeechTokenizer(str(tmp_path / "rvq"), format=small)
    assert not any(key[0] == str(tmp_path / "rvq") for key in transforms._LOADED_MODELS)
