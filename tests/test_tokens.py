"""SemanticTokenFormat: exact strings, exact round trips, strict parsing, vocabulary, identity."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from gemma_rvq.tokens import PRESETS, ParsedTokens, SemanticTokenFormat, get_format

ICHIGO_5557 = "<|sound_start|><|duration_03|><|sound_0005|><|sound_0007|><|sound_end|>"


def random_codes_with_runs(rng: np.random.Generator, levels: int, frames: int, size: int, max_run: int = 130):
    """Codes [Q, T] made of runs of identical frames (lengths 1..max_run, some longer than 49)."""
    out = [np.zeros((levels, 0), dtype=np.int64)]
    while sum(len(r[0]) for r in out) < frames:
        run = int(rng.choice([1, 1, 2, 3, 5, 49, 50, 98, 99, int(rng.integers(1, max_run))]))
        frame = rng.integers(0, size, size=(levels, 1))
        out.append(np.repeat(frame, run, axis=1))
    return np.concatenate(out, axis=1)[:, :frames]


# ----------------------------------------------------------------------------- exact strings
def test_ichigo_hand_cases():
    fmt = get_format("ichigo")
    assert fmt.render([5, 5, 5, 7]) == ICHIGO_5557
    assert fmt.render([0]) == "<|sound_start|><|sound_0000|><|sound_end|>"
    assert fmt.render([]) == "<|sound_start|><|sound_end|>"
    # a run of 50 is 49 + 1, a run of 100 is 49 + 49 + 2: never a <|duration_50|> or longer
    assert fmt.render([9] * 50) == "<|sound_start|><|duration_49|><|sound_0009|><|sound_0009|><|sound_end|>"
    assert fmt.render([9] * 100) == (
        "<|sound_start|><|duration_49|><|sound_0009|><|duration_49|><|sound_0009|>"
        "<|duration_02|><|sound_0009|><|sound_end|>"
    )
    # multi-level codes: ichigo renders level 0 only
    assert fmt.render(np.array([[5, 5, 5, 7], [1, 2, 3, 4]])) == ICHIGO_5557
    # without dedup: one token per frame, no durations
    assert get_format("ichigo", dedup=False).render([5, 5, 7]) == (
        "<|sound_start|><|sound_0005|><|sound_0005|><|sound_0007|><|sound_end|>"
    )


def test_gemma_rvq_hand_cases():
    fmt = get_format("gemma_rvq", num_levels=2)
    codes = np.array([[1, 1, 2], [3, 3, 2047]])
    assert fmt.render(codes) == (
        "<|rvq_start|><|q0_0001|><|q1_0003|><|q0_0001|><|q1_0003|><|q0_0002|><|q1_2047|><|rvq_end|>"
    )
    # first k levels of deeper codes, separator, no markers
    deep = np.array([[1, 2], [3, 4], [5, 6]])
    assert get_format("gemma_rvq", num_levels=1, markers=False, separator=" ").render(deep) == (
        "<|q0_0001|> <|q0_0002|>"
    )
    # dedup with durations: whole frames collapse
    assert get_format("gemma_rvq", num_levels=2, dedup=True).render(codes) == (
        "<|rvq_start|><|rvq_dur_02|><|q0_0001|><|q1_0003|><|q0_0002|><|q1_2047|><|rvq_end|>"
    )


def test_spire_hand_cases():
    fmt = get_format("spire")
    assert fmt.render([0, 0, 1, 4999, 1]) == "\U000f0000\U000f0001\U000f1387\U000f0001"
    assert fmt.render([7, 7, 7]) == chr(0xF0007)
    parsed = fmt.parse(" \U000f0000 \U000f0001\n")
    assert parsed.codes.tolist() == [[0, 1]] and parsed.durations is None


def test_template_hand_cases():
    fmt = SemanticTokenFormat.from_template("<unit_{code}>")
    assert fmt.render([3, 12, 12]) == "<unit_3><unit_12><unit_12>"
    assert fmt.num_levels == 1
    multi = SemanticTokenFormat.from_template(
        "<|L{level}:{code:03d}|>", codebook_size=1000, start_token="<s>"
    )
    assert multi.code_width == 3
    assert multi.render(np.array([[1, 2], [30, 400]])) == "<s><|L0:001|><|L1:030|><|L0:002|><|L1:400|>"
    assert multi.parse("<s><|L0:001|><|L1:030|>").codes.tolist() == [[1], [30]]


# ----------------------------------------------------------------------------- round trips
FORMATS = [
    get_format("gemma_rvq", num_levels=1),
    get_format("gemma_rvq", num_levels=3),
    get_format("gemma_rvq"),
    get_format("gemma_rvq", num_levels=2, dedup=True),
    get_format("gemma_rvq", num_levels=None, codebook_size=None, separator=" "),
    get_format("ichigo"),
    get_format("ichigo", dedup=False, markers=False),
    get_format("ichigo", separator=", "),
    get_format("spire", codebook_size=2048),
    get_format("spire", dedup=False),
    get_format("spire", num_levels=2, codebook_size=2048, dedup=False),
    SemanticTokenFormat.from_template("<unit_{code}>", dedup=True),
    SemanticTokenFormat.from_template(
        "[{level}|{code}]", num_levels=2, codebook_size=2048, dedup=True, duration_template="[x{duration}]"
    ),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.name}-{f.num_levels}-{f.dedup}-{f.separator!r}")
def test_round_trip_random(fmt: SemanticTokenFormat):
    rng = np.random.default_rng(0)
    for trial in range(12):
        frames = int(rng.integers(0, 400)) if trial else 0
        levels = 8 if fmt.num_levels is None else max(fmt.num_levels, 1 + trial % 3)
        codes = random_codes_with_runs(rng, levels, frames, 2048)
        text = fmt.render(codes)
        parsed = fmt.parse(text)
        rendered = codes[: fmt.num_levels or levels]
        if frames == 0 and fmt.num_levels is None:  # no frame to tell the number of levels
            assert fmt.parse(text).codes.shape == (1, 0)
            continue
        # the expanded frames are the original sequence exactly, whenever the format keeps durations
        if fmt.dedup and not fmt.uses_durations:
            keep = np.ones(rendered.shape[1], dtype=bool)
            keep[1:] = (rendered[:, 1:] != rendered[:, :-1]).any(axis=0)
            np.testing.assert_array_equal(parsed.codes, rendered[:, keep])
            assert parsed.durations is None
        else:
            np.testing.assert_array_equal(parsed.expand(), rendered)
        if fmt.uses_durations:
            assert (
                parsed.durations.min(initial=2) >= 1 and parsed.durations.max(initial=2) <= fmt.max_duration
            )
            assert parsed.durations.sum() == rendered.shape[1]
        # and re-rendering the parsed frames gives the same string
        assert fmt.render(parsed.expand()) == text
        if fmt.separator.strip():  # whitespace around separators is tolerated
            assert np.array_equal(
                fmt.parse(text.replace(fmt.separator.strip(), " \n" + fmt.separator.strip())).codes,
                parsed.codes,
            )
        elif fmt.codepoint_offset is None:
            spaced = fmt.parse(text.replace("><", ">  <").replace("]", "]\t"))
            np.testing.assert_array_equal(spaced.codes, parsed.codes)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.name}-{f.num_levels}-{f.dedup}-{f.separator!r}")
def test_fast_parse_agrees_with_the_strict_parser_on_corrupted_strings(fmt: SemanticTokenFormat):
    """The vectorised path either returns exactly the strict parser's result or defers to it."""
    from gemma_rvq.tokens import _fast_parse, _Parser

    rng = np.random.default_rng(5)
    levels = fmt.num_levels or 3
    fast_hits = 0
    for _ in range(60):
        text = fmt.render(random_codes_with_runs(rng, levels, int(rng.integers(1, 120)), 2048))
        pieces = list(text)
        for _ in range(int(rng.integers(0, 3))):  # random character edits: delete, duplicate, insert
            at = int(rng.integers(0, len(pieces)))
            edit = int(rng.integers(0, 3))
            if edit == 0 and len(pieces) > 1:
                del pieces[at]
            elif edit == 1:
                pieces.insert(at, pieces[at])
            else:
                pieces.insert(at, str(rng.choice(["0", "1", "<", ">", "|", " ", "_", "\U000f0001"])))
        corrupted = "".join(pieces)
        try:
            strict = _Parser(fmt, corrupted).run()
        except ValueError:
            strict = None
        fast = _fast_parse(fmt, corrupted)
        if fast is not None:
            fast_hits += 1
            assert strict is not None, corrupted
            np.testing.assert_array_equal(fast.codes, strict.codes)
            assert (fast.durations is None) == (strict.durations is None)
            if fast.durations is not None:
                np.testing.assert_array_equal(fast.durations, strict.durations)
    if not fmt.separator.strip() and fmt.codebook_size is not None:
        assert fast_hits > 0  # the fast path is actually taken


def test_render_batch_matches_render_and_respects_mask():
    rng = np.random.default_rng(1)
    codes = torch.from_numpy(rng.integers(0, 2048, size=(5, 4, 60)))
    lengths = [60, 0, 17, 33, 1]
    mask = torch.arange(60)[None, :] < torch.tensor(lengths)[:, None]
    garbage = codes.clone()
    garbage[~mask[:, None, :].expand_as(codes)] = -1  # padding is never rendered, whatever it holds
    for fmt in (
        get_format("gemma_rvq", num_levels=4),
        get_format("ichigo"),
        get_format("spire", codebook_size=2048),
    ):
        batch = fmt.render_batch(garbage, mask)
        assert batch == [fmt.render(codes[b, :, : lengths[b]]) for b in range(5)]
        # a non-prefix mask selects exactly the valid frames
        holes = mask.clone()
        holes[0, ::2] = False
        assert fmt.render_batch(codes, holes)[0] == fmt.render(codes[0][:, holes[0]])


def test_render_accepts_lists_tensors_and_1d():
    fmt = get_format("ichigo")
    assert fmt.render(torch.tensor([5, 5, 5, 7])) == ICHIGO_5557
    assert fmt.render(np.array([[5, 5, 5, 7]], dtype=np.int32)) == ICHIGO_5557
    assert fmt.render_batch([[5, 5, 5, 7]]) == [ICHIGO_5557]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("fmt", "text", "message", "position"),
    [
        (get_format("ichigo"), "<|sound_start|><|sound_0005|>", "missing end marker", 29),
        (get_format("ichigo"), "<|sound_0005|><|sound_end|>", "missing start marker", 0),
        (
            get_format("ichigo"),
            "<|sound_start|><|soun_0005|><|sound_end|>",
            "unknown token '<|soun_0005|>'",
            15,
        ),
        (get_format("ichigo"), "<|sound_start|><|sound_005|><|sound_end|>", "malformed code token", 15),
        (get_format("ichigo"), "<|sound_start|><|sound_2048|><|sound_end|>", "outside [0, 2048)", 15),
        (
            get_format("ichigo"),
            "<|sound_start|><|duration_01|><|sound_0001|><|sound_end|>",
            "malformed duration",
            15,
        ),
        (get_format("ichigo"), "<|sound_start|><|duration_03|><|sound_end|>", "not followed by a frame", 15),
        (get_format("ichigo"), "<|sound_start|><|sound_end|><|sound_0001|>", "after the end marker", 28),
        (get_format("ichigo"), "<|sound_start|><|sound_start|><|sound_end|>", "unexpected start marker", 15),
        (
            get_format("ichigo", dedup=False),
            "<|sound_start|><|duration_03|><|sound_0001|><|sound_end|>",
            "dedup off",
            15,
        ),
        (
            get_format("ichigo", separator=" "),
            "<|sound_start|> <|sound_0001|>x<|sound_end|>",
            "unknown token 'x'",
            30,
        ),
        (
            get_format("ichigo", separator=","),
            "<|sound_start|>,<|sound_0001|><|sound_end|>",
            "expected separator",
            30,
        ),
        (
            get_format("gemma_rvq", num_levels=2),
            "<|rvq_start|><|q1_0001|><|rvq_end|>",
            "level out of order",
            13,
        ),
        (
            get_format("gemma_rvq", num_levels=2),
            "<|rvq_start|><|q0_0001|><|q1_0002|><|q0_0001|><|q0_0002|><|rvq_end|>",
            "expected level 1",
            46,
        ),
        (
            get_format("gemma_rvq", num_levels=2),
            "<|rvq_start|><|q0_0001|><|rvq_end|>",
            "incomplete frame",
            13,
        ),
        (
            get_format("gemma_rvq", num_levels=2),
            "<|rvq_start|><|q2_0001|><|rvq_end|>",
            "level out of order",
            13,
        ),
        (
            get_format("gemma_rvq", num_levels=None, markers=False),
            "<|q0_0001|><|q1_0002|><|q0_0003|>",
            "incomplete frame at the end",
            22,
        ),
        (get_format("spire"), "\U000f0001a", "unknown token 'a'", 1),
        (get_format("spire"), "\U000f0001" + chr(0xF0000 + 5000), "unknown token", 1),
    ],
)
def test_malformed_strings_raise_with_position(fmt, text, message, position):
    with pytest.raises(ValueError, match=r"at character (\d+)") as info:
        fmt.parse(text)
    assert message in str(info.value)
    assert f"at character {position}:" in str(info.value)


def test_render_errors():
    with pytest.raises(
        ValueError, match=r"code 2048 at example 0, level 1, frame 2 is outside the range \[0, 2048\)"
    ):
        get_format("gemma_rvq", num_levels=2).render(np.array([[0, 0, 0], [0, 0, 2048]]))
    with pytest.raises(ValueError, match="outside the range"):
        get_format("ichigo").render([-1])
    with pytest.raises(ValueError, match="renders 8 levels but the codes have only 2"):
        get_format("gemma_rvq").render(np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="must hold integers"):
        get_format("ichigo").render(np.array([0.5]))
    with pytest.raises(ValueError, match="mask must have shape"):
        get_format("ichigo").render_batch(np.zeros((2, 1, 3), dtype=int), np.ones((2, 4), dtype=bool))


def test_invalid_formats_are_rejected():
    with pytest.raises(ValueError, match="unknown token format preset"):
        get_format("whisper")
    with pytest.raises(ValueError, match="unknown token format option"):
        get_format("ichigo", levels=2)
    with pytest.raises(ValueError, match="can only render one level"):
        get_format("ichigo", num_levels=2)
    with pytest.raises(ValueError, match=r"must contain \{code\}"):
        SemanticTokenFormat.from_template("<unit>")
    with pytest.raises(ValueError, match="literal between"):
        SemanticTokenFormat.from_template("<{level}{code}>", num_levels=2)
    with pytest.raises(ValueError, match="is also a code token"):
        get_format("ichigo", start_token="<|sound_0000|>")
    with pytest.raises(ValueError, match="max_duration"):
        get_format("ichigo", max_duration=1)


# ----------------------------------------------------------------------------- vocabulary and identity
def test_vocabulary_sizes_order_and_uniqueness():
    ichigo = get_format("ichigo").vocabulary()
    assert ichigo[:3] == ["<|sound_start|>", "<|sound_end|>", "<|duration_02|>"]
    assert ichigo[2 + 48] == "<|sound_0000|>" and ichigo[-1] == "<|sound_2047|>"
    assert len(ichigo) == 2 + 48 + 2048
    gemma = get_format("gemma_rvq").vocabulary()
    assert len(gemma) == 2 + 8 * 2048
    assert gemma[2 + 2048] == "<|q1_0000|>"
    assert len(get_format("gemma_rvq", dedup=True).vocabulary()) == 2 + 48 + 8 * 2048
    spire = get_format("spire").vocabulary()
    assert spire == [chr(0xF0000 + u) for u in range(5000)]
    for fmt in FORMATS:
        if fmt.codebook_size is None or fmt.num_levels is None:
            with pytest.raises(ValueError, match="vocabulary"):
                fmt.vocabulary()
            continue
        vocab = fmt.vocabulary()
        assert len(set(vocab)) == len(vocab)
        # every token of a rendered string is in the vocabulary
        codes = random_codes_with_runs(np.random.default_rng(2), fmt.num_levels, 300, fmt.codebook_size)
        parsed_tokens = set(vocab)
        text = fmt.render(codes)
        for token in vocab[:3] + vocab[-3:]:
            assert token in parsed_tokens
        remaining = text
        for token in sorted(vocab, key=len, reverse=True):
            remaining = remaining.replace(token, "")
        assert remaining.replace(fmt.separator, "") == ""


def test_serialisation_identity_and_pickle():
    for fmt in [*FORMATS, *PRESETS.values()]:
        data = json.loads(json.dumps(fmt.to_dict()))
        back = SemanticTokenFormat.from_dict(data)
        assert back == fmt and hash(back) == hash(fmt)
        assert get_format(data) == fmt
        assert pickle.loads(pickle.dumps(fmt)) == fmt
    assert get_format("ichigo") != get_format("ichigo", codebook_size=512)
    assert get_format(get_format("ichigo"), dedup=False) == get_format("ichigo", dedup=False)
    # the lookup caches never leak into the object's state (datasets fingerprints the pickle)
    fmt = get_format("ichigo")
    before = pickle.dumps(fmt)
    fmt.render_batch(np.zeros((2, 1, 10), dtype=int))
    fmt.parse(fmt.render([1, 2]))
    assert pickle.dumps(fmt) == before
    # a digest that does not depend on the process (hash() of strings does)
    assert get_format("ichigo").fingerprint() == get_format("ichigo").fingerprint()
    assert get_format("ichigo").fingerprint() != get_format("ichigo", dedup=False).fingerprint()
    # golden values: the digest must not change between processes or releases (caches are keyed by it);
    # if a deliberate change of the format fields breaks this, bump FORMAT_VERSION and update them
    assert get_format("ichigo").fingerprint() == "49bf54a5ff5c61e3"
    assert get_format("gemma_rvq").fingerprint() == "aec609b9f6383081"
    with pytest.raises(ValueError, match="unknown token format fields"):
        SemanticTokenFormat.from_dict({**fmt.to_dict(), "bogus": 1})


def test_parsed_tokens_expand():
    parsed = get_format("ichigo").parse(ICHIGO_5557)
    assert isinstance(parsed, ParsedTokens)
    assert parsed.codes.tolist() == [[5, 7]] and parsed.durations.tolist() == [3, 1]
    assert parsed.expand().tolist() == [[5, 5, 5, 7]]
    # infers the number of levels from the first frame when num_levels is None
    fmt = get_format("gemma_rvq", num_levels=None)
    assert fmt.parse("<|rvq_start|><|q0_0001|><|q1_0002|><|q2_0003|><|rvq_end|>").codes.shape == (3, 1)
    assert fmt.parse("<|rvq_start|><|rvq_end|>").codes.shape == (1, 0)


def test_format_for_model_fits_presets_and_keeps_explicit_formats():
    from gemma_rvq.tokens import format_for_model

    fitted = format_for_model("gemma_rvq", codebook_size=16, num_quantizers=2)
    assert (fitted.num_levels, fitted.codebook_size) == (2, 16)
    assert len(fitted.vocabulary()) == 2 + 2 * 16  # markers + Q x K codes
    ichigo = format_for_model("ichigo", codebook_size=64, num_quantizers=8)
    assert (ichigo.num_levels, ichigo.codebook_size) == (1, 64)
    explicit = get_format("gemma_rvq", num_levels=3)
    assert format_for_model(explicit, codebook_size=16, num_quantizers=2) == explicit


# ----------------------------------------------------------------------------- formats that cannot round-trip
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SemanticTokenFormat.from_template("{code}"), r"\[1, 23\] would read back as \[123\]"),
        (lambda: SemanticTokenFormat.from_template("{code}", separator="0"), "separator '0' starts with a digit"),
        (lambda: SemanticTokenFormat.from_template("<{code}7>"), "followed by the digit '7'"),
        (lambda: SemanticTokenFormat.from_template("<u{code}>", end_token="9"), None),  # an end marker is fine
        (lambda: SemanticTokenFormat.from_template("u{code}", end_token="9e"), "the end marker can follow"),
        (lambda: SemanticTokenFormat.from_template("{code}>", dedup=True, duration_template="<d{duration}"),
         "duration_template '<d{duration}' ends with {duration} and a code token can follow"),
        (lambda: get_format("spire", codepoint_offset=0x80, codebook_size=100), r"U\+0080.*category Cc"),
        (lambda: get_format("spire", codepoint_offset=0x2000, codebook_size=10), r"U\+2000 \(EN QUAD\)"),
        (lambda: get_format("spire", codepoint_offset=0x3000, codebook_size=10), "IDEOGRAPHIC SPACE"),
        (lambda: get_format("spire", codepoint_offset=0x300, codebook_size=10), "category Mn"),  # combining
        (lambda: get_format("spire", codepoint_offset=0xFF01, codebook_size=10), "normalisation"),  # fullwidth
        (lambda: get_format("spire", codebook_size=None), "needs codebook_size"),
        (lambda: get_format("ichigo", start_token="<|sound_"), "cannot parse its own output"),
        (lambda: SemanticTokenFormat.from_template("<a{code}>", start_token="<a"), "cannot parse its own output"),
    ],
)
def test_formats_that_cannot_round_trip_are_refused(make, message):
    if message is None:
        fmt = make()
        assert fmt.parse(fmt.render([1, 23, 9])).codes.tolist() == [[1, 23, 9]]
        return
    with pytest.raises(ValueError, match=message):
        make()


def test_ichigo_reads_the_long_durations_ichigo_writes():
    """Ichigo's own run-length code writes <|duration_50|> and up for runs longer than 49 frames."""
    fmt = get_format("ichigo")
    text = "<|sound_start|><|duration_50|><|sound_0001|><|duration_120|><|sound_0002|><|sound_0003|><|sound_end|>"
    parsed = fmt.parse(text)
    assert parsed.codes.tolist() == [[1, 2, 3]] and parsed.durations.tolist() == [50, 120, 1]
    assert parsed.expand().shape == (1, 171)
    # rendering those frames again splits the runs at max_duration, as the Ichigo vocabulary needs
    assert "<|duration_50|>" not in fmt.render(parsed.expand())
    assert np.array_equal(fmt.parse(fmt.render(parsed.expand())).expand(), parsed.expand())
    with pytest.raises(ValueError, match="malformed duration"):
        fmt.parse("<|sound_start|><|duration_050|><|sound_0001|><|sound_end|>")  # not canonical


# ----------------------------------------------------------------------------- property test (hypothesis)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PIECES = st.text(alphabet="<>|_:-[]()xq0123456789 ,.", min_size=0, max_size=4)
_MARKERS = st.none() | st.text(alphabet="<>|_sx0123456789 ", min_size=1, max_size=5)


@st.composite
def template_formats(draw):
    levels_field = draw(st.booleans())
    a, b, c = draw(_PIECES), draw(_PIECES), draw(_PIECES)
    template = f"{a}{{level}}{b}{{code}}{c}" if levels_field else f"{a}{{code}}{b}"
    durations = draw(st.booleans())
    return dict(
        code_template=template,
        code_width=draw(st.integers(0, 4)),
        codebook_size=draw(st.sampled_from([1, 2, 10, 11, 100, 1000, None])),
        num_levels=draw(st.sampled_from([1, 2, 3, None])) if levels_field else 1,
        start_token=draw(_MARKERS),
        end_token=draw(_MARKERS),
        dedup=draw(st.booleans()),
        duration_template=f"{draw(_PIECES)}{{duration}}{draw(_PIECES)}" if durations else None,
        duration_width=draw(st.integers(0, 3)),
        max_duration=draw(st.integers(2, 60)),
        separator=draw(st.sampled_from(["", " ", ",", ", ", "|", "0", "\n", "x", " 1"])),
    )


@st.composite
def codepoint_formats(draw):
    size = draw(st.integers(1, 600))
    levels = draw(st.integers(1, 2))
    offset = draw(st.sampled_from([0x80, 0x100, 0x300, 0x2000, 0x3000, 0x4E00, 0xE000, 0xFF00, 0xF0000])
                  | st.integers(0x80, 0x10FFFF - size * levels))
    return dict(codepoint_offset=offset, codebook_size=size, num_levels=levels, dedup=draw(st.booleans()),
                start_token=draw(_MARKERS), end_token=draw(_MARKERS), separator=draw(st.sampled_from(["", " ", "|"])))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=template_formats() | codepoint_formats(), data=st.data())
def test_every_accepted_format_round_trips(fields, data):
    """For every format the constructor accepts, parse(render(codes)) gives the codes back."""
    try:
        fmt = SemanticTokenFormat(**fields)
    except ValueError:
        return  # refused at construction: fine, that is the point
    levels = fmt.num_levels or data.draw(st.integers(1, 3))
    size = fmt.codebook_size or 1200
    frames = data.draw(st.integers(0, 40))
    runs = data.draw(st.lists(st.integers(1, 70), min_size=1, max_size=6))
    values = data.draw(st.lists(st.lists(st.integers(0, size - 1), min_size=levels, max_size=levels),
                                min_size=len(runs), max_size=len(runs)))
    codes = np.repeat(np.array(values, dtype=np.int64).T, runs, axis=1)[:, :frames]
    text = fmt.render(codes)
    if fmt.codepoint_offset is not None:  # nothing that str.split or NFKC would remove or change
        import unicodedata

        assert unicodedata.normalize("NFKC", text) == text
        body = text if fmt.separator.strip() or not fmt.separator else text.replace(fmt.separator, "")
        assert "".join(body.split()) == body or fmt.start_token or fmt.end_token
    if codes.shape[1] == 0 and fmt.num_levels is None:
        return
    parsed = fmt.parse(text)
    if fmt.dedup and not fmt.uses_durations and codes.shape[1]:
        keep = np.ones(codes.shape[1], dtype=bool)
        keep[1:] = (codes[:, 1:] != codes[:, :-1]).any(axis=0)
        expected = codes[:, keep]
        assert parsed.codes.shape == expected.shape and np.array_equal(parsed.codes, expected), text
    else:
        got = parsed.expand()
        assert got.shape == codes.shape and np.array_equal(got, codes), (fields, text)
