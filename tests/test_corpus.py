"""The committed speech corpus (data/corpus) and its generator (scripts/make_corpus.py).

The committed-file checks need only soundfile; the generator checks are skipped without espeak-ng.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


make_corpus = load_script("scripts/make_corpus.py")


def _rows(name: str) -> list[dict]:
    with open(CORPUS / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def metadata() -> list[dict]:
    return _rows("metadata.jsonl")


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    return _rows("instructions.jsonl")


def _check_clip(path: Path, duration: float) -> None:
    info = sf.info(path)
    assert info.samplerate == 22050, path
    assert info.channels == 1, path
    assert info.format == "FLAC" and info.subtype == "PCM_16", path
    assert info.frames / info.samplerate == pytest.approx(duration, abs=1e-5), path
    wave, sr = sf.read(path, dtype="int16")
    assert sr == 22050 and wave.shape == (info.frames,)
    assert np.abs(wave.astype(np.int32)).max() > 1000, f"{path} is (nearly) silent"


def test_metadata_clips_readable_and_durations_match(metadata):
    assert len(metadata) >= 30
    for row in metadata:
        assert set(row) >= {"file", "text", "language", "voice", "split", "duration"}
        assert row["text"].strip()
        assert 1.0 <= row["duration"] <= 4.0, row
        _check_clip(CORPUS / row["file"], row["duration"])


def test_languages_voices_and_splits(metadata):
    languages = {r["language"] for r in metadata}
    assert {"en", "sw", "vi"} <= languages and len(languages) >= 4
    train = [r for r in metadata if r["split"] == "train"]
    dev = [r for r in metadata if r["split"] == "dev"]
    assert {r["split"] for r in metadata} == {"train", "dev"}
    # dev is unseen in text AND in voice variant
    assert not {r["text"] for r in train} & {r["text"] for r in dev}
    train_variants = {r["variant"] for r in train}
    dev_variants = {r["variant"] for r in dev}
    assert len(train_variants) >= 2
    assert not train_variants & dev_variants
    for row in metadata:
        assert row["voice"].endswith("+" + row["variant"])
    for lang in languages:  # every language has both splits
        assert {r["split"] for r in metadata if r["language"] == lang} == {"train", "dev"}
    assert len({r["file"] for r in metadata}) == len(metadata)


def test_instructions(instructions, metadata):
    assert 20 <= len(instructions) <= 30
    assert {r["language"] for r in instructions} >= {"en", "sw"}
    spoken = [r for r in instructions if r["file"] is not None]
    text_only = [r for r in instructions if r["file"] is None]
    assert len(spoken) >= 10 and len(text_only) >= 6
    for row in instructions:
        assert row["instruction"].strip() and row["response"].strip()
    for row in spoken:
        _check_clip(CORPUS / row["file"], row["duration"])
    train_voices = {r["voice"] for r in spoken if r["split"] == "train"}
    dev = [r for r in instructions if r["split"] == "dev"]
    assert dev and all(r["file"] is not None for r in dev)
    # the held-out spoken prompt: a trained question, spoken by a voice no train clip uses
    train_questions = {r["instruction"] for r in spoken if r["split"] == "train"}
    all_train_voices = train_voices | {r["voice"] for r in metadata if r["split"] == "train"}
    for row in dev:
        assert row["instruction"] in train_questions
        assert row["voice"] not in all_train_voices
    corpus_files = {r["file"] for r in metadata}
    assert not corpus_files & {r["file"] for r in spoken}


def test_committed_corpus_is_small():
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert total < 3_000_000, f"committed corpus is {total} bytes"


def test_generator_specs_match_committed_files(metadata, instructions):
    """scripts/make_corpus.py and the committed files agree (regeneration would give the same rows)."""
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("duration", "path")} for r in rows]  # noqa: E731
    assert strip(make_corpus.corpus_specs()) == strip(metadata)
    assert strip(make_corpus.instruction_specs()) == strip(instructions)
    loaded = make_corpus.load_metadata(CORPUS)
    assert [r["path"] for r in loaded] == [str(CORPUS / r["file"]) for r in metadata]


def test_larger_specs_are_seeded_and_train_only():
    a = make_corpus.corpus_specs(12, languages=["en", "sw"], seed=3)
    b = make_corpus.corpus_specs(12, languages=["en", "sw"], seed=3)
    c = make_corpus.corpus_specs(12, languages=["en", "sw"], seed=4)
    assert a == b and a != c
    assert len(a) == 24
    dev_texts = {r["text"] for r in a if r["split"] == "dev"}
    extra = [r for r in a if r["split"] == "train"]
    assert all(r["variant"] != make_corpus.DEV_VARIANT for r in extra)
    assert not any(t in r["text"] for r in extra for t in dev_texts)
    with pytest.raises(ValueError, match="unknown language"):
        make_corpus.corpus_specs(languages=["xx"])


@needs_espeak
def test_synthesize(tmp_path):
    wave, sr = make_corpus.synthesize("-Habari ya asubuhi.", "sw+m3", tmp_path / "a.flac")
    assert sr == 22050 and wave.dtype == np.int16 and wave.ndim == 1
    assert 0.5 < len(wave) / sr < 3.0
    # trimmed: only the 60 ms pad is quiet at either end
    pad = round(0.06 * sr)
    loud = np.flatnonzero(np.abs(wave.astype(np.int32)) > 64)
    assert loud[0] <= pad and len(wave) - 1 - loud[-1] <= pad
    read, sr2 = sf.read(tmp_path / "a.flac", dtype="int16")
    assert sr2 == sr and np.array_equal(read, wave)
    with pytest.raises(ValueError, match="empty"):
        make_corpus.synthesize("  ", "en-us")


@needs_espeak
def test_generate_corpus(tmp_path):
    rows = make_corpus.generate_corpus(tmp_path, 9, languages=["vi"], seed=1, instructions=False,
                                       workers=2, progress=False, word_timings=False)
    assert len(rows) == 9
    assert [r["id"] for r in rows] == [r["id"] for r in make_corpus.corpus_specs(9, languages=["vi"], seed=1)]
    for row in rows:
        _check_clip(tmp_path / row["file"], row["duration"])
    assert make_corpus.load_metadata(tmp_path)[0]["text"] == rows[0]["text"]
    info = json.loads((tmp_path / "generation.json").read_text())
    assert info["sample_rate"] == 22050 and info["espeak_ng_version"]


DISTILL_SPEECH = ROOT / "data" / "distill_speech"


def test_distill_benchmark_set_matches_its_generator_and_is_small():
    """data/distill_speech (make_corpus.py --distill-benchmark): the rows the generator plans, each voice in one
    split, 16 kHz clips, and small enough to commit."""
    rows = make_corpus.load_metadata(DISTILL_SPEECH)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("duration", "path")} for r in rows]  # noqa: E731
    assert strip(make_corpus.distill_benchmark_specs()) == strip(rows)
    splits: dict[str, set] = {}  # a speaker (espeak variant, its speed and pitch) speaks both languages
    for row in rows:
        splits.setdefault((row["variant"], row["speed"], row["pitch"]), set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values()), splits
    assert len({variant for variant, _, _ in splits}) == len(splits) == 14
    assert len(rows) == 24 * len(splits) and len({r["id"] for r in rows}) == len(rows)
    # the confirm voices (added after the first results) come last, so the 288 earlier rows keep their order
    assert [r["split"] for r in rows[288:]] == ["confirm"] * 48
    assert {r["variant"] for r in rows[288:]} == {"david", "linda"}
    assert not {r["variant"] for r in rows[288:]} & {r["variant"] for r in rows[:288]}
    for row in rows[::23]:
        info = sf.info(DISTILL_SPEECH / row["file"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.frames / info.samplerate == pytest.approx(row["duration"], abs=1e-5)
    total = sum(p.stat().st_size for p in DISTILL_SPEECH.rglob("*") if p.is_file())
    assert total < 9_500_000, f"data/distill_speech is {total} bytes"


@needs_espeak
def test_generate_distill_benchmark_reproduces_committed_clips(tmp_path):
    specs = [make_corpus.distill_benchmark_specs()[i] for i in (0, 200, 300)]  # 300: a confirm voice
    rows = make_corpus.generate_distill_benchmark(tmp_path, specs=specs, workers=1, progress=False)
    for row in rows:
        fresh, sr = sf.read(tmp_path / row["file"], dtype="int16")
        committed, _ = sf.read(DISTILL_SPEECH / row["file"], dtype="int16")
        assert sr == 16000 and np.array_equal(fresh, committed), row["id"]
    with pytest.raises(SystemExit):
        make_corpus.main(["--distill-benchmark", "--out", str(ROOT / "data" / "corpus")])


@pytest.fixture(scope="module")
def word_rows() -> list[dict]:
    return _rows("words.jsonl")


def test_word_timings_cover_every_clip_in_order(word_rows, metadata, instructions):
    spoken = metadata + [r for r in instructions if r["file"] is not None]
    assert [r["id"] for r in word_rows] == [r["id"] for r in spoken]
    for row, clip in zip(word_rows, spoken):
        assert row["file"] == clip["file"]
        text = clip.get("text") or clip["instruction"]
        words = row["words"]
        assert " ".join(w["word"] for w in words) == " ".join(text.split())  # every character, in order
        ends = [0.0]
        for word in words:
            assert ends[-1] <= word["start"] < word["end"] <= clip["duration"] + 1e-6, (clip["id"], word)
            ends.append(word["end"])


def test_word_timings_lie_on_speech(word_rows, metadata):
    """Inside a word there is sound; the clip is spoken from the first word's start to the last word's end."""
    by_id = {r["id"]: r for r in metadata}
    for row in word_rows[:10]:
        wave, rate = sf.read(CORPUS / row["file"], dtype="int16")
        level = np.abs(wave.astype(np.int32))
        for word in row["words"]:
            span = level[round(word["start"] * rate): round(word["end"] * rate)]
            assert span.size and span.max() > 1000, (row["id"], word)
        first, last = row["words"][0]["start"], row["words"][-1]["end"]
        assert level[: max(0, round(first * rate) - 200)].max(initial=0) < 1000, row["id"]
        # after the last word: the 60 ms pad, or a voice variant's echo tail (f3: ~0.2 s)
        assert last >= by_id[row["id"]]["duration"] - 0.3


@needs_espeak
def test_synthesize_with_words_reproduces_the_committed_clip_and_timings(word_rows, metadata):
    for clip in (metadata[0], metadata[-1]):  # English (with a merged "in the") and French
        wave, _, words = make_corpus.synthesize_with_words(clip["text"], clip["voice"], speed=clip["speed"],
                                                           pitch=clip["pitch"])
        committed, _ = sf.read(CORPUS / clip["file"], dtype="int16")
        assert np.array_equal(wave, committed)
        assert words == next(r["words"] for r in word_rows if r["id"] == clip["id"])


def test_words_from_events_by_hand():
    """Units run from one spoken WORD event to the next; a unit ends where the next phoneme starts."""
    text = "Hi, in the park."
    events = [(1, 1, 2, 0, ""), (7, 1, 0, 10, "h"), (7, 1, 0, 20, "aI"), (7, 4, 0, 30, "_:"),
              (1, 5, 2, 40, ""), (7, 5, 0, 42, "I"), (7, 5, 0, 50, "n"), (7, 5, 0, 55, "D"),
              (1, 12, 4, 60, ""), (7, 12, 0, 61, "p"), (7, 12, 0, 70, "A@"), (7, 17, 0, 90, "_"),
              (1, 17, 0, 95, "")]
    assert make_corpus.words_from_events(text, events, 100) == [("Hi,", 10, 30), ("in the", 42, 61),
                                                                ("park.", 61, 90)]
