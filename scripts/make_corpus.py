#!/usr/bin/env python
"""Generate the small multilingual synthetic speech corpus used by tests, the demo and benchmarks.

Speech is synthesised with espeak-ng (a system program: ``apt install espeak-ng``) at its native
22.05 kHz, mono, 16-bit, and stored as FLAC. Everything is deterministic: the texts are fixed below,
voices, speeds and pitches are fixed per clip (or drawn from a seeded generator for larger corpora).

Two outputs:

* ``metadata.jsonl``: one row per clip ``{"id", "file", "text", "language", "voice", "variant",
  "speed", "pitch", "split", "duration"}``. ``split`` is ``"train"`` or ``"dev"``; dev clips use texts
  that never occur in train AND a voice variant that never occurs in train.
* ``instructions.jsonl``: short question/answer pairs ``{"id", "instruction", "response", "language",
  "file", "voice", "split"}``. Spoken rows point to a clip of the instruction; text-only rows have
  ``"file": null`` (stage 2 turns those into semantic tokens). ``split == "dev"`` rows are spoken by the
  held-out voice (the demo's unseen spoken prompt).

Usage::

    python scripts/make_corpus.py --out data/corpus              # the committed corpus
    python scripts/make_corpus.py --out /tmp/big --utterances-per-language 100 --seed 1  # ~38 min

Benchmarks import it::

    sys.path.insert(0, "scripts"); import make_corpus
    rows = make_corpus.generate_corpus("/tmp/speech", n_utterances_per_lang=100)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 22050  # espeak-ng's native output rate

# language code (used in metadata) -> espeak-ng voice name
LANGUAGES: dict[str, str] = {"en": "en-us", "sw": "sw", "vi": "vi", "es": "es", "fr": "fr-fr"}
TRAIN_VARIANTS: tuple[str, ...] = ("m3", "f3")
DEV_VARIANT = "f5"  # never used for a train clip: the held-out voice
# variants a large generated corpus draws from (the held-out one excluded unless asked for)
EXTRA_VARIANTS: tuple[str, ...] = ("m1", "m2", "m4", "m7", "f1", "f2", "f4")

# Sentences written for this project (no third-party text). The last N_DEV of each list are dev-only.
SENTENCES: dict[str, list[str]] = {
    "en": [
        "The sun rises early in the morning.",
        "My brother likes to read books at night.",
        "Please open the window, it is warm today.",
        "We walked to the market to buy fresh bread.",
        "The children are playing football in the park.",
        "The train leaves the station at noon.",
        "She wrote a short letter to her friend.",
    ],
    "sw": [
        "Jua linachomoza asubuhi na mapema.",
        "Kaka yangu anapenda kusoma vitabu usiku.",
        "Tafadhali fungua dirisha, leo kuna joto.",
        "Tulitembea sokoni kununua mkate.",
        "Watoto wanacheza mpira uwanjani.",
        "Treni inaondoka kituoni saa sita mchana.",
        "Aliandika barua fupi kwa rafiki yake.",
    ],
    "vi": [
        "Mặt trời mọc sớm vào buổi sáng.",
        "Anh trai tôi thích đọc sách vào ban đêm.",
        "Làm ơn mở cửa sổ, hôm nay trời nóng.",
        "Chúng tôi đi bộ ra chợ để mua bánh mì.",
        "Bọn trẻ đang chơi bóng đá trong công viên.",
        "Tàu rời ga lúc mười hai giờ trưa.",
        "Cô ấy viết một lá thư ngắn cho bạn.",
    ],
    "es": [
        "El sol sale temprano por la mañana.",
        "A mi hermano le gusta leer libros por la noche.",
        "Por favor, abre la ventana, hoy hace calor.",
        "Caminamos al mercado para comprar pan fresco.",
        "Los niños juegan al fútbol en el parque.",
        "El tren sale de la estación al mediodía.",
        "Ella escribió una carta corta a su amiga.",
    ],
    "fr": [
        "Le soleil se lève tôt le matin.",
        "Mon frère aime lire des livres le soir.",
        "Ouvre la fenêtre, il fait chaud aujourd'hui.",
        "Nous allons au marché pour acheter du pain.",
        "Les enfants jouent au football dans le parc.",
        "Le train quitte la gare à midi.",
        "Elle a écrit une courte lettre à son amie.",
    ],
}
N_DEV = 2

# (instruction, response); the first N_SPOKEN of each language are spoken, the rest text-only.
INSTRUCTIONS: dict[str, list[tuple[str, str]]] = {
    "en": [
        ("What is two plus two?", "Four."),
        ("What color is the sky on a clear day?", "Blue."),
        ("How many days are in a week?", "Seven."),
        ("What is the opposite of hot?", "Cold."),
        ("Which animal says moo?", "A cow."),
        ("What do bees make?", "Honey."),
        ("How many legs does a spider have?", "Eight."),
        ("What is the capital of Kenya?", "Nairobi."),
        ("What is three times three?", "Nine."),
        ("What do we drink when we are thirsty?", "Water."),
        ("Which season comes after winter?", "Spring."),
        ("How many hours are in a day?", "Twenty four."),
    ],
    "sw": [
        ("Mbili jumlisha mbili ni ngapi?", "Nne."),
        ("Anga lina rangi gani siku ya jua?", "Bluu."),
        ("Wiki ina siku ngapi?", "Saba."),
        ("Kinyume cha joto ni nini?", "Baridi."),
        ("Nyuki hutengeneza nini?", "Asali."),
        ("Buibui ana miguu mingapi?", "Minane."),
        ("Mji mkuu wa Kenya ni upi?", "Nairobi."),
        ("Ng'ombe hutoa nini?", "Maziwa."),
        ("Tatu mara tatu ni ngapi?", "Tisa."),
        ("Tunakunywa nini tukiwa na kiu?", "Maji."),
        ("Mwezi huonekana wakati gani?", "Usiku."),
        ("Siku moja ina saa ngapi?", "Ishirini na nne."),
    ],
}
N_SPOKEN = 7
# spoken instructions (index into INSTRUCTIONS[lang]) repeated in the held-out voice as dev prompts
DEV_PROMPTS: dict[str, int] = {"en": 0, "sw": 0}

_PAD_SECONDS = 0.06  # silence kept around the speech when trimming espeak's trailing pause
_SILENCE_LEVEL = 64  # int16 amplitude below which a sample counts as silence


def espeak_version() -> str | None:
    """The installed espeak-ng version string, or None when espeak-ng is not on PATH."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"text-to-speech:\s*(\S+)", out)
    return match.group(1) if match else out.strip()


def _require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (e.g. `apt-get install espeak-ng`); it is needed to "
                           "synthesise speech. The committed corpus in data/corpus needs no espeak-ng.")
    return exe


def trim_silence(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, pad_seconds: float = _PAD_SECONDS,
                 level: int = _SILENCE_LEVEL) -> np.ndarray:
    """Cut leading/trailing silence from an int16 wave ``[S]``, keeping ``pad_seconds`` around the speech."""
    loud = np.flatnonzero(np.abs(wave.astype(np.int32)) > level)
    if loud.size == 0:
        return wave
    pad = round(pad_seconds * sample_rate)
    return wave[max(0, loud[0] - pad): min(len(wave), loud[-1] + 1 + pad)]


def synthesize(text: str, voice: str, out_path: str | os.PathLike | None = None, *, speed: int = 175,
               pitch: int = 50, trim: bool = True) -> tuple[np.ndarray, int]:
    """Speak ``text`` with espeak-ng.

    Args:
        text: UTF-8 text (passed on stdin, so a leading ``-`` is not taken for an option).
        voice: an espeak-ng voice, optionally with a variant: ``"en-us"``, ``"sw+m3"``, ``"vi+f5"``.
        out_path: if given, the clip is also written there (format from the suffix: .flac or .wav), 16-bit.
        speed: words per minute (espeak ``-s``, default 175 there; 80..450).
        pitch: 0..99 (espeak ``-p``).
        trim: cut espeak's leading/trailing silence down to 60 ms.

    Returns:
        ``(wave, sample_rate)``: int16 array ``[S]`` and 22050.
    """
    exe = _require_espeak()
    if not text.strip():
        raise ValueError("synthesize: text is empty")
    cmd = [exe, "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "-b", "1", "--stdin", "--stdout"]
    proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace')}")
    wave, sr = sf.read(io.BytesIO(proc.stdout), dtype="int16")
    if wave.ndim != 1:
        wave = wave[:, 0]
    if trim:
        wave = trim_silence(wave, sr)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        kw = {"compression_level": 1.0} if out_path.suffix.lower() == ".flac" else {}
        sf.write(out_path, wave, sr, subtype="PCM_16", **kw)
    return wave, int(sr)


def _spec(clip_id: str, text: str, language: str, variant: str, speed: int, pitch: int, split: str) -> dict:
    return {"id": clip_id, "file": f"clips/{clip_id}.flac", "text": text, "language": language,
            "voice": f"{LANGUAGES[language]}+{variant}", "variant": variant, "speed": speed,
            "pitch": pitch, "split": split}


def corpus_specs(n_utterances_per_lang: int | None = None, *, languages: Sequence[str] | None = None,
                 seed: int = 0) -> list[dict]:
    """What to synthesise, without synthesising it (no espeak needed).

    ``n_utterances_per_lang=None`` gives the fixed committed corpus: per language, the 5 train sentences
    each spoken once, alternately by the two train variants (m3, f3) with slightly varied speed/pitch,
    and the 2 dev sentences spoken by the held-out variant f5. An integer ``n`` gives a larger corpus for
    benchmarks: the fixed one, then seeded extra train utterances (pairs of train sentences, voices drawn
    from the train and extra variants, random speed/pitch) until each language has ``n`` clips.
    """
    languages = list(languages or LANGUAGES)
    rng = random.Random(seed)
    specs: list[dict] = []
    for lang in languages:
        if lang not in SENTENCES:
            raise ValueError(f"unknown language {lang!r}; known: {sorted(SENTENCES)}")
        sentences = SENTENCES[lang]
        train, dev = sentences[:-N_DEV], sentences[-N_DEV:]
        lang_specs = []
        for i, text in enumerate(train):
            variant = TRAIN_VARIANTS[i % len(TRAIN_VARIANTS)]
            lang_specs.append(_spec(f"{lang}_train_{i:03d}", text, lang, variant, 165 + 10 * (i % 3),
                                    45 + 5 * (i % 3), "train"))
        for i, text in enumerate(dev):
            lang_specs.append(_spec(f"{lang}_dev_{i:03d}", text, lang, DEV_VARIANT, 175, 50, "dev"))
        if n_utterances_per_lang is not None:
            pool = (*TRAIN_VARIANTS, *EXTRA_VARIANTS)
            i = len(train)
            while len(lang_specs) < n_utterances_per_lang:
                a, b = rng.sample(train, 2)
                lang_specs.append(_spec(f"{lang}_train_{i:03d}", f"{a} {b}", lang, rng.choice(pool),
                                        rng.randrange(150, 205, 5), rng.randrange(30, 75, 5), "train"))
                i += 1
            lang_specs = lang_specs[:max(n_utterances_per_lang, 1)]
        specs.extend(lang_specs)
    return specs


def instruction_specs() -> list[dict]:
    """The instruction/response rows (``file`` set for spoken ones); deterministic, no espeak needed."""
    rows = []
    for lang, pairs in INSTRUCTIONS.items():
        for i, (instruction, response) in enumerate(pairs):
            spoken = i < N_SPOKEN
            variant = TRAIN_VARIANTS[i % len(TRAIN_VARIANTS)] if spoken else None
            clip_id = f"{lang}_instr_{i:03d}"
            rows.append({"id": clip_id, "instruction": instruction, "response": response, "language": lang,
                         "file": f"clips/{clip_id}.flac" if spoken else None,
                         "voice": f"{LANGUAGES[lang]}+{variant}" if spoken else None, "split": "train",
                         "duration": None})
        i = DEV_PROMPTS[lang]
        instruction, response = pairs[i]
        clip_id = f"{lang}_instr_dev_{i:03d}"
        rows.append({"id": clip_id, "instruction": instruction, "response": response, "language": lang,
                     "file": f"clips/{clip_id}.flac", "voice": f"{LANGUAGES[lang]}+{DEV_VARIANT}",
                     "split": "dev", "duration": None})
    return rows


def _synthesize_rows(rows: Iterable[dict], out_dir: Path, text_key: str, workers: int,
                     progress: bool) -> list[dict]:
    rows = [r for r in rows if r.get("file")]

    def job(row: dict) -> dict:
        wave, sr = synthesize(row[text_key], row["voice"], out_dir / row["file"],
                              speed=row.get("speed", 175), pitch=row.get("pitch", 50))
        return {**row, "duration": round(len(wave) / sr, 6)}

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the package
        progress = False
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = pool.map(job, rows)
        if progress:
            done = tqdm(done, total=len(rows), desc="espeak-ng", unit="clip")
        return list(done)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate_corpus(out_dir: str | os.PathLike, n_utterances_per_lang: int | None = None, *,
                    languages: Sequence[str] | None = None, seed: int = 0, instructions: bool = True,
                    workers: int | None = None, progress: bool = True) -> list[dict]:
    """Synthesise a corpus into ``out_dir`` (clips/ + metadata.jsonl [+ instructions.jsonl]).

    Args:
        out_dir: output folder (created).
        n_utterances_per_lang: None = the fixed committed corpus (7 clips per language); an integer grows
            each language to that many clips with seeded extra utterances (~4.5 s each): 100 per
            language over the 5 languages is about 38 minutes of speech (~15 s on 2 cores).
        languages: subset of ``LANGUAGES`` keys (default: all).
        seed: seed for the extra utterances.
        instructions: also synthesise the spoken instructions and write instructions.jsonl.
        workers: parallel espeak-ng processes (default: number of CPUs).
        progress: show a tqdm bar.

    Returns:
        The metadata rows written to metadata.jsonl (with ``duration`` in seconds).
    """
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    rows = _synthesize_rows(corpus_specs(n_utterances_per_lang, languages=languages, seed=seed), out,
                            "text", workers, progress)
    _write_jsonl(out / "metadata.jsonl", rows)
    if instructions:
        instr = instruction_specs()
        spoken = {r["id"]: r for r in _synthesize_rows(instr, out, "instruction", workers, progress)}
        # text-only rows keep file=None; spoken ones get their duration
        _write_jsonl(out / "instructions.jsonl", [spoken.get(r["id"], r) for r in instr])
    info = {"generator": "scripts/make_corpus.py", "espeak_ng_version": espeak_version(),
            "sample_rate": SAMPLE_RATE, "format": "FLAC PCM_16 mono",
            "train_variants": list(TRAIN_VARIANTS), "dev_variant": DEV_VARIANT, "seed": seed,
            "n_utterances_per_lang": n_utterances_per_lang}
    (out / "generation.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return rows


def load_metadata(corpus_dir: str | os.PathLike, name: str = "metadata.jsonl") -> list[dict]:
    """Read ``metadata.jsonl`` (or ``instructions.jsonl``) rows; ``path`` is added as an absolute path."""
    corpus_dir = Path(corpus_dir)
    rows = []
    with open(corpus_dir / name, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                row["path"] = str(corpus_dir / row["file"]) if row.get("file") else None
                rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/corpus", help="output folder (default: data/corpus)")
    parser.add_argument("--utterances-per-language", type=int, default=None,
                        help="grow each language to this many clips (default: the fixed 7-clip corpus)")
    parser.add_argument("--languages", nargs="+", default=None, choices=sorted(LANGUAGES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-instructions", action="store_true")
    args = parser.parse_args(argv)
    rows = generate_corpus(args.out, args.utterances_per_language, languages=args.languages, seed=args.seed,
                           instructions=not args.no_instructions, workers=args.workers)
    total = sum(r["duration"] for r in rows)
    print(f"wrote {len(rows)} clips, {total / 60:.1f} min of speech, to {args.out} ({espeak_version()})")


if __name__ == "__main__":
    main()
