"""Semantic token strings: render RVQ codes ``[Q, T]`` as text an LLM can read, and parse them back.

A :class:`SemanticTokenFormat` is a small frozen, JSON-serialisable description of how codes become a
string. Presets:

- ``gemma_rvq``  ``<|rvq_start|><|q0_0513|><|q1_0007|>...<|rvq_end|>``: every level named, frames
  interleaved (t0q0 t0q1 ... t1q0 ...), optional run-length collapse with ``<|rvq_dur_NN|>`` tokens.
- ``ichigo``     ``<|sound_start|><|duration_03|><|sound_0005|><|sound_0007|><|sound_end|>`` (Ichigo /
  Speechless): one level, runs collapsed, a duration token before each run of 2..49 frames.
- ``spire``      one private-use character ``chr(0xF0000 + unit)`` per unit, duplicates collapsed,
  no markers (SpireLM).
- templates      :meth:`SemanticTokenFormat.from_template` (``"<unit_{code}>"``, ``"<|L{level}_{code}|>"``).

Rendering is table driven (token strings precomputed per level and code, gathered with numpy), so
:meth:`SemanticTokenFormat.render_batch` is cheap on the dataset tokenisation hot path. Parsing is
strict: a malformed string raises ``ValueError`` naming the offending token and its character offset.
See ``docs/token-formats.md`` for every preset, option and error.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import numbers
import re
import string
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["PRESETS", "ParsedTokens", "SemanticTokenFormat", "get_format"]

FORMAT_VERSION = 1
_WHITESPACE = re.compile(r"\s")
_SURROGATES = (0xD800, 0xDFFF)


class ParsedTokens(NamedTuple):
    """Result of :meth:`SemanticTokenFormat.parse`.

    Attributes:
        codes: ``np.ndarray[int64]`` of shape ``[Q, T']``: the rendered frames in order (after run-length
            collapse when the format deduplicates).
        durations: ``np.ndarray[int64]`` of shape ``[T']`` (frames per rendered frame, 1 where no duration
            token was written) for formats with duration tokens and dedup on; ``None`` otherwise.
    """

    codes: np.ndarray
    durations: np.ndarray | None

    def expand(self) -> np.ndarray:
        """Frames ``[Q, T]`` with each rendered frame repeated ``durations`` times (identity without durations)."""
        if self.durations is None:
            return self.codes
        return np.repeat(self.codes, self.durations, axis=1)


def _template_parts(template: str, allowed: Sequence[str], what: str) -> tuple[list[str], list[str], dict]:
    """Split a ``str.format`` template into literal parts and field names.

    Returns (literals, fields, specs): ``literals`` has ``len(fields) + 1`` entries.
    """
    literals: list[str] = []
    fields: list[str] = []
    specs: dict[str, str] = {}
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"invalid {what} template {template!r}: {exc}") from None
    current = ""
    for literal, field, spec, conversion in parsed:
        current += literal
        if field is None:
            continue
        if field not in allowed:
            raise ValueError(
                f"{what} template {template!r} uses {{{field}}}; allowed fields: {list(allowed)}"
            )
        if field in fields:
            raise ValueError(f"{what} template {template!r} uses {{{field}}} more than once")
        if conversion:
            raise ValueError(f"{what} template {template!r}: conversions (!r, !s) are not supported")
        literals.append(current)
        current = ""
        fields.append(field)
        specs[field] = spec or ""
    literals.append(current)
    return literals, fields, specs


def _width_from_spec(spec: str, template: str) -> int | None:
    """``"04d"`` -> 4, ``"d"``/``""`` -> 0; anything else is rejected."""
    if spec in ("", "d"):
        return 0 if spec == "d" else None
    match = re.fullmatch(r"0(\d+)d", spec)
    if not match:
        raise ValueError(
            f"template {template!r}: only zero padding specs like {{code:04d}} are supported, got {spec!r}"
        )
    return int(match.group(1))


def _to_numpy(codes: Any, name: str) -> np.ndarray:
    if hasattr(codes, "detach"):  # torch.Tensor, without importing torch here
        codes = codes.detach().cpu().numpy()
    array = np.asarray(codes)
    if array.dtype == object:
        raise ValueError(f"{name} must be a rectangular array of integers (got ragged or non-numeric input)")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0):
            array = array.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


@dataclass(frozen=True)
class SemanticTokenFormat:
    """How RVQ codes ``[Q, T]`` become a string, and back.

    Frames are interleaved by level: ``t0q0 t0q1 ... t0q(k-1) t1q0 ...``.

    Attributes:
        name: preset name or a user label (part of the identity).
        code_template: token of one code, a ``str.format`` template with ``{code}`` and, for several
            levels, ``{level}`` (levels are written without padding, codes zero padded to ``code_width``).
            Ignored when ``codepoint_offset`` is set.
        code_width: minimum number of digits of ``{code}`` (zero padded; 0 = no padding).
        codepoint_offset: render each code as the single character ``chr(codepoint_offset + level *
            codebook_size + code)`` instead of a template (Spire uses ``0xF0000``).
        codebook_size: number of codes per level ``K``; codes must lie in ``[0, K)``. Needed by
            :meth:`vocabulary`.
        num_levels: render the first ``num_levels`` codebooks (``None``: all levels of the input). Always 1
            for templates without ``{level}``.
        start_token / end_token: markers around the whole sequence, or ``None``.
        dedup: collapse runs of identical frames (all rendered levels equal).
        duration_template: with ``dedup``, a token written before each run of ``2..max_duration`` frames
            (``{duration}`` zero padded to ``duration_width``); longer runs are split. ``None``: runs are
            collapsed without durations (the information is lost).
        duration_width: digits of ``{duration}``.
        max_duration: the longest run one duration token covers when rendering (longer runs are split).
            Parsing also reads longer durations (``<|duration_50|>`` and up), which Ichigo's own code writes.
        separator: written between consecutive tokens (markers included). Whitespace between tokens is
            always tolerated when parsing.
    """

    name: str = "custom"
    code_template: str = "<|q{level}_{code}|>"
    code_width: int = 4
    codepoint_offset: int | None = None
    codebook_size: int | None = None
    num_levels: int | None = None
    start_token: str | None = None
    end_token: str | None = None
    dedup: bool = False
    duration_template: str | None = None
    duration_width: int = 2
    max_duration: int = 49
    separator: str = ""

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        for field_name in ("code_width", "duration_width", "max_duration", "codebook_size", "num_levels"):
            value = getattr(self, field_name)  # numpy / torch integers (e.g. from a config) become ints
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                object.__setattr__(self, field_name, int(value))
        for field_name in ("code_width", "duration_width", "max_duration"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{field_name} must be a non-negative int, got {value!r}")
        if self.max_duration < 2:
            raise ValueError(f"max_duration must be >= 2, got {self.max_duration}")
        if self.codebook_size is not None and (
            not isinstance(self.codebook_size, int)
            or isinstance(self.codebook_size, bool)
            or self.codebook_size < 1
        ):
            raise ValueError(f"codebook_size must be a positive int or None, got {self.codebook_size!r}")
        if self.num_levels is not None and (
            not isinstance(self.num_levels, int) or isinstance(self.num_levels, bool) or self.num_levels < 1
        ):
            raise ValueError(f"num_levels must be a positive int or None, got {self.num_levels!r}")
        if not isinstance(self.separator, str):
            raise ValueError(f"separator must be a string, got {self.separator!r}")
        for marker in ("start_token", "end_token"):
            value = getattr(self, marker)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{marker} must be a non-empty string or None, got {value!r}")
        if self.start_token is not None and self.start_token == self.end_token:
            raise ValueError("start_token and end_token must differ")

        single_level = False
        if self.codepoint_offset is not None:
            if not isinstance(self.codepoint_offset, int) or self.codepoint_offset < 0x80:
                raise ValueError(f"codepoint_offset must be an int >= 0x80, got {self.codepoint_offset!r}")
            if self.codebook_size is None:
                raise ValueError(
                    f"format {self.name!r}: a code point format needs codebook_size (every code point of its "
                    "range is checked to survive str.split and tokenizer normalisation)"
                )
            if self.num_levels is None:
                raise ValueError(f"format {self.name!r}: a code point format needs num_levels (its code point range)")
            last = self.codepoint_offset + (self.num_levels or 1) * self.codebook_size - 1
            if last > 0x10FFFF:
                raise ValueError(f"codepoint_offset + levels * codebook_size exceeds U+10FFFF ({last:#x})")
            if self.codepoint_offset <= _SURROGATES[1] and last >= _SURROGATES[0]:
                raise ValueError("the code point range overlaps the UTF-16 surrogates (U+D800..U+DFFF)")
            _check_code_points(self.name, self.codepoint_offset, last)
        else:
            _, fields, specs = _template_parts(self.code_template, ("code", "level"), "code")
            if "code" not in fields:
                raise ValueError(f"code_template {self.code_template!r} must contain {{code}}")
            if specs.get("level"):
                raise ValueError(f"code_template {self.code_template!r}: {{level}} takes no format spec")
            if specs.get("code"):
                raise ValueError(
                    f"code_template {self.code_template!r}: give the padding as code_width, not a format spec "
                    "(SemanticTokenFormat.from_template converts {code:04d} for you)"
                )
            literals, _, _ = _template_parts(self.code_template, ("code", "level"), "code")
            if "level" in fields and not literals[1]:
                raise ValueError(
                    f"code_template {self.code_template!r}: put a literal between {{level}} and {{code}} "
                    "(adjacent numbers cannot be parsed back)"
                )
            if "level" not in fields:
                single_level = True
                if self.num_levels not in (None, 1):
                    raise ValueError(
                        f"code_template {self.code_template!r} has no {{level}}: it can only render one level, "
                        f"got num_levels={self.num_levels}"
                    )
        if single_level:
            object.__setattr__(self, "num_levels", 1)

        if self.duration_template is not None:
            _, fields, specs = _template_parts(self.duration_template, ("duration",), "duration")
            if fields != ["duration"]:
                raise ValueError(f"duration_template {self.duration_template!r} must contain {{duration}}")
            if specs.get("duration"):
                raise ValueError("give the duration padding as duration_width, not a format spec")
        if self.codepoint_offset is None or self.duration_template is not None:
            _check_number_ends(self)
        # all token kinds must be distinguishable; checked on the rendered strings of the lookup tables
        _compiled(self)
        # and the parser must read back what the renderer writes (probe strings of every adjacency)
        _check_round_trip(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SemanticTokenFormat:
        """A preset (``"gemma_rvq"``, ``"ichigo"``, ``"spire"``) with fields overridden.

        ``markers=False`` is accepted as a shorthand for ``start_token=None, end_token=None``.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown token format preset {name!r}; available: {sorted(PRESETS)}")
        return _replace(PRESETS[name], overrides)

    @classmethod
    def from_template(
        cls,
        template: str,
        *,
        name: str = "template",
        start_token: str | None = None,
        end_token: str | None = None,
        codebook_size: int | None = None,
        num_levels: int | None = None,
        dedup: bool = False,
        duration_template: str | None = None,
        separator: str = "",
        **kwargs: Any,
    ) -> SemanticTokenFormat:
        """A format from a user template such as ``"<unit_{code}>"`` or ``"<|L{level}:{code:04d}|>"``.

        ``{code:0Nd}`` sets ``code_width=N`` (default: no padding); ``{level}`` is required for more than
        one level. Other fields (``code_width``, ``max_duration``, ...) pass through ``kwargs``.
        """
        _, fields, specs = _template_parts(template, ("code", "level"), "code")
        width = _width_from_spec(specs.get("code", ""), template) if "code" in fields else None
        plain = template
        if width is not None and specs.get("code"):
            plain = template.replace("{code:" + specs["code"] + "}", "{code}")
        kwargs.setdefault("code_width", width or 0)
        if duration_template is not None:
            _, _, dspecs = _template_parts(duration_template, ("duration",), "duration")
            dwidth = _width_from_spec(dspecs.get("duration", ""), duration_template)
            if dspecs.get("duration"):
                duration_template = duration_template.replace(
                    "{duration:" + dspecs["duration"] + "}", "{duration}"
                )
            kwargs.setdefault("duration_width", dwidth or 0)
        return cls(
            name=name,
            code_template=plain,
            start_token=start_token,
            end_token=end_token,
            codebook_size=codebook_size,
            num_levels=num_levels,
            dedup=dedup,
            duration_template=duration_template,
            separator=separator,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (saved next to datasets and models)."""
        out = dataclasses.asdict(self)
        out["format_version"] = FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SemanticTokenFormat:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer format this version can't read)."""
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"token format version {version} is not supported (this gemma-rvq reads {FORMAT_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown token format fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def fingerprint(self) -> str:
        """A digest of the fields that is stable across processes and Python versions (``hash()`` is not).

        For cache keys and file names; ``datasets`` fingerprints the pickle, which holds only the fields.
        """
        payload = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(payload.encode("ascii")).hexdigest()[:16]

    # ------------------------------------------------------------------ properties
    @property
    def uses_durations(self) -> bool:
        """True when rendered strings may contain duration tokens (dedup on and a duration template)."""
        return self.dedup and self.duration_template is not None

    def code_token(self, code: int, level: int = 0) -> str:
        """The token string of one code at one level."""
        if self.codepoint_offset is not None:
            return chr(self.codepoint_offset + level * (self.codebook_size or 0) + code)
        return self.code_template.format(level=level, code=str(code).zfill(self.code_width))

    def duration_token(self, duration: int) -> str:
        """The duration token for a run of ``duration`` (2..max_duration) frames."""
        if self.duration_template is None:
            raise ValueError(f"format {self.name!r} has no duration tokens")
        if not 2 <= duration <= self.max_duration:
            raise ValueError(f"duration must be in [2, {self.max_duration}], got {duration}")
        return self.duration_template.format(duration=str(duration).zfill(self.duration_width))

    def vocabulary(self) -> list[str]:
        """Every token string this format can emit, in a stable order.

        Markers (start, end), then duration tokens 2..max_duration (only when dedup uses them), then the
        codes of level 0 (0..K-1), level 1, ... For code point formats these are single characters.
        """
        if self.codebook_size is None:
            raise ValueError(f"format {self.name!r}: vocabulary() needs codebook_size")
        if self.num_levels is None:
            raise ValueError(
                f"format {self.name!r}: vocabulary() needs num_levels (how many codebooks are rendered)"
            )
        vocab = [t for t in (self.start_token, self.end_token) if t is not None]
        if self.uses_durations:
            vocab += [self.duration_token(d) for d in range(2, self.max_duration + 1)]
        table = _code_table(self, self.num_levels, self.codebook_size)
        vocab += table.ravel().tolist()
        return vocab

    # ------------------------------------------------------------------ rendering
    def _levels_for(self, available: int) -> int:
        if self.num_levels is None:
            return available
        if available < self.num_levels:
            raise ValueError(
                f"format {self.name!r} renders {self.num_levels} levels but the codes have only {available}; "
                f"pass num_levels={available} (get_format(..., num_levels={available})) or more codebooks"
            )
        return self.num_levels

    def render(self, codes: Any) -> str:
        """Render the codes of ONE example: ``[Q, T]`` or ``[T]`` (numpy, torch or nested lists)."""
        array = _to_numpy(codes, "codes")
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise ValueError(
                f"render() takes codes [Q, T] or [T] of one example, got shape {tuple(array.shape)}"
            )
        return self.render_batch(array[None])[0]

    def render_batch(self, codes: Any, mask: Any = None) -> list[str]:
        """Render a batch: codes ``[B, Q, T]`` (or ``[B, T]`` for one level), mask ``[B, T]`` (True = valid).

        Only valid frames are rendered (padding may hold any value). Returns ``B`` strings.
        """
        array = _to_numpy(codes, "codes")
        if array.ndim == 2:
            array = array[:, None]
        if array.ndim != 3:
            raise ValueError(f"render_batch() takes codes [B, Q, T], got shape {tuple(array.shape)}")
        batch, available, frames = array.shape
        levels = self._levels_for(available)
        array = array[:, :levels]
        if mask is None:
            valid = np.ones((batch, frames), dtype=bool)
        else:
            valid = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask).astype(bool)
            if valid.shape != (batch, frames):
                raise ValueError(f"mask must have shape [B, T] = {(batch, frames)}, got {tuple(valid.shape)}")
        if batch == 0:
            return []
        safe = np.where(valid[:, None, :], array, 0)
        self._check_range(safe, valid)
        size = self.codebook_size or (int(safe.max()) + 1 if safe.size else 1)
        table = _code_table(self, levels, _round_up(size))
        frames_first = safe.transpose(0, 2, 1)  # [B, T, Q]
        tokens = table[np.arange(levels)[None, None, :], frames_first]  # [B, T, Q] object, contiguous
        lengths = valid.sum(axis=1)
        # the usual mask is a prefix (padding at the end): slicing beats boolean indexing
        prefix = bool((valid == (np.arange(frames)[None, :] < lengths[:, None])).all())
        start = [self.start_token] if self.start_token is not None else []
        end = [self.end_token] if self.end_token is not None else []
        sep = self.separator
        out = []
        for b in range(batch):
            frame_tokens = tokens[b, : lengths[b]] if prefix else tokens[b][valid[b]]  # [T_b, Q]
            if self.dedup and len(frame_tokens):
                frame_codes = frames_first[b, : lengths[b]] if prefix else frames_first[b][valid[b]]
                parts = self._dedup_tokens(frame_codes, frame_tokens)
            else:
                parts = frame_tokens.ravel().tolist()
            if start or end:
                parts = start + parts + end
            out.append(sep.join(parts))
        return out

    def _check_range(self, safe: np.ndarray, valid: np.ndarray) -> None:
        if not safe.size:
            return
        low = safe.min()
        high = safe.max()
        limit = self.codebook_size
        if limit is None and self.codepoint_offset is not None:
            limit = 0x10FFFF - self.codepoint_offset + 1
        if low >= 0 and (limit is None or high < limit):
            return
        bad = (safe < 0) if low < 0 else (safe >= limit)
        b, q, t = (int(i) for i in np.argwhere(bad & valid[:, None, :])[0])
        bound = f"[0, {limit})" if limit is not None else ">= 0"
        raise ValueError(
            f"code {int(safe[b, q, t])} at example {b}, level {q}, frame {t} is outside the range {bound} "
            f"of format {self.name!r}"
        )

    def _dedup_tokens(self, codes: np.ndarray, tokens: np.ndarray) -> list[str]:
        """Run-length collapse of one example: codes ``[T, Q]`` ints, tokens ``[T, Q]`` strings."""
        length = codes.shape[0]
        change = np.ones(length, dtype=bool)
        change[1:] = (codes[1:] != codes[:-1]).any(axis=1)
        starts = np.flatnonzero(change)
        if not self.uses_durations:
            return tokens[starts].ravel().tolist()
        run_lengths = np.diff(np.append(starts, length))
        max_d = self.max_duration
        chunks = (run_lengths + max_d - 1) // max_d
        first_chunk = np.cumsum(chunks) - chunks
        index_in_run = np.arange(int(chunks.sum())) - np.repeat(first_chunk, chunks)
        chunk_start = np.repeat(starts, chunks) + index_in_run * max_d
        chunk_len = np.minimum(max_d, np.repeat(starts + run_lengths, chunks) - chunk_start)
        durations = _duration_table(self)[chunk_len][:, None]  # [C, 1]; None for runs of 1
        grid = np.concatenate([durations, tokens[chunk_start]], axis=1)  # [C, 1 + Q]
        keep = np.ones(grid.shape, dtype=bool)
        keep[:, 0] = chunk_len >= 2
        return grid[keep].tolist()

    # ------------------------------------------------------------------ parsing
    def parse(self, text: str) -> ParsedTokens:
        """Parse a string rendered by this format back to codes.

        Returns ``ParsedTokens(codes [Q, T'], durations [T'] | None)``. Whitespace between tokens is
        skipped. Raises ``ValueError`` naming the token and its character offset for an unknown token, a
        level out of order, a code outside ``[0, codebook_size)``, a non-canonical number (wrong zero
        padding), a duration token the format does not emit or that is not followed by a frame, a missing
        or misplaced marker, a missing separator, or an incomplete frame at the end.
        """
        if not isinstance(text, str):
            raise ValueError(f"parse() takes a string, got {type(text).__name__}")
        fast = _fast_parse(self, text)
        return fast if fast is not None else _Parser(self, text).run()


def _fast_parse(fmt: SemanticTokenFormat, text: str) -> ParsedTokens | None:
    """Vectorised parse of a well-formed string; ``None`` whenever anything is unusual.

    Tokens are turned into numbers with ``str.replace`` of their literal parts and ``np.fromstring``
    (C speed), and the result is accepted only if
    re-rendering it gives back the input (up to whitespace between tokens): so this path never accepts
    what the strict :class:`_Parser` rejects, and everything else (errors, non-canonical but valid
    strings, non-whitespace separators) goes to the strict parser.
    """
    if fmt.separator.strip() or not text or text.isspace():
        return None
    fast = _fast_patterns(fmt)
    if fast is None:
        return None
    if fmt.codepoint_offset is not None:
        if fmt.start_token is not None or fmt.end_token is not None or fmt.uses_durations:
            return None
        compact = "".join(text.split())
        points = (
            np.frombuffer(compact.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
            - fmt.codepoint_offset
        )
        if points.min() < 0:
            return None
        size = fmt.codebook_size
        levels, values = (points // size, points % size) if size else (np.zeros_like(points), points)
        durations = None
    else:
        body = text.strip()
        if fast.inner_space is None:
            if any(c.isspace() for c in body):
                return None
        elif _WHITESPACE.search(body) and fast.inner_space.search(body):
            return None  # whitespace that may sit inside a token: the strict parser decides
        if fmt.start_token is not None:
            if not body.startswith(fmt.start_token):
                return None
            body = body[len(fmt.start_token) :]
        if fmt.end_token is not None:
            if not body.endswith(fmt.end_token):
                return None
            body = body[: len(body) - len(fmt.end_token)]
        numeric = body
        if fast.duration_prefix is not None:  # durations become negative numbers: " -NN "
            numeric = numeric.replace(fast.duration_prefix, " -").replace(fast.duration_suffix, " ")
        for literal in fast.code_literals:  # code tokens become " level code " (or " code ")
            numeric = numeric.replace(literal, " ")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (future: raises) on text it cannot read to the end
            try:
                stream = np.fromstring(numeric, dtype=np.int64, sep=" ")  # text mode: C-speed parsing
            except (ValueError, DeprecationWarning):
                return None
        is_duration = stream < 0
        fields = stream[~is_duration]
        if not len(fields) or len(fields) % fast.per_code:
            return None
        fields = fields.reshape(-1, fast.per_code)
        if fast.per_code == 1:
            levels, values = np.zeros(len(fields), dtype=np.int64), fields[:, 0]
        else:
            levels, values = (
                (fields[:, 0], fields[:, 1]) if fast.level_first else (fields[:, 1], fields[:, 0])
            )
        durations = None
        if is_duration.any():
            if not fmt.uses_durations:
                return None
            # the code token after each duration, as an index among code tokens
            durations_at = np.cumsum(~is_duration)[is_duration] // fast.per_code
            if durations_at[-1] >= len(levels) or (levels[durations_at] != 0).any():
                return None
    if not len(levels):
        return None
    q = fmt.num_levels
    if q is None:
        later_zero = np.flatnonzero(levels[1:] == 0)
        q = int(later_zero[0]) + 1 if len(later_zero) else len(levels)
    if len(levels) % q or not np.array_equal(levels, np.tile(np.arange(q), len(levels) // q)):
        return None
    if fmt.codebook_size is not None and values.max() >= fmt.codebook_size:
        return None
    codes = values.reshape(-1, q).T.copy()
    if fmt.codepoint_offset is None and fmt.uses_durations:
        durations = np.ones(codes.shape[1], dtype=np.int64)
        if is_duration.any():
            durations[durations_at // q] = -stream[is_duration]
        if ((durations < 1) | (durations > fmt.max_duration)).any():
            return None
    parsed = ParsedTokens(codes, durations)
    rendered = _render_parsed(fmt, parsed)
    if rendered is None or "".join(rendered.split()) != "".join(text.split()):
        return None
    return parsed


def _render_parsed(fmt: SemanticTokenFormat, parsed: ParsedTokens) -> str | None:
    """The canonical rendering of parsed codes (durations expanded), or None if it cannot be rendered."""
    try:
        return fmt.render(parsed.expand())
    except ValueError:
        return None


class _FastPlan(NamedTuple):
    duration_prefix: str | None
    duration_suffix: str | None
    code_literals: tuple[str, ...]
    per_code: int  # numbers per code token: 1 (code) or 2 (level and code)
    level_first: bool
    inner_space: re.Pattern | None  # finds whitespace not between two tokens; None: cannot tell


@functools.lru_cache(maxsize=64)
def _fast_patterns(fmt: SemanticTokenFormat) -> _FastPlan | None:
    """How :func:`_fast_parse` turns tokens into numbers with plain ``str.replace`` (C speed).

    ``None`` for the rare templates it cannot handle (a duration template starting with its number).
    """
    prefix = suffix = None
    if fmt.duration_template is not None:
        literals, _, _ = _template_parts(fmt.duration_template, ("duration",), "duration")
        if not literals[0]:
            return None
        prefix, suffix = literals[0], literals[1] or " "
    code_literals: tuple[str, ...] = ()
    per_code, level_first = 1, True
    if fmt.codepoint_offset is None:
        literals, fields, _ = _template_parts(fmt.code_template, ("code", "level"), "code")
        code_literals = tuple(sorted({lit for lit in literals if lit}, key=len, reverse=True))
        per_code = len(fields)
        level_first = fields[0] == "level"
    # whitespace is tolerated between tokens only: find any that is not (after a token's last character
    # and before a token's first character); possible when those characters are not digits or spaces
    tokens = [t for t in (fmt.start_token, fmt.end_token) if t is not None]
    if fmt.duration_template is not None:
        tokens.append(fmt.duration_token(2))
    if fmt.codepoint_offset is None:
        tokens.append(fmt.code_token(0, 0))
    inner_space = None
    if tokens and not any(c.isspace() for t in tokens for c in t):
        firsts, lasts = {t[0] for t in tokens}, {t[-1] for t in tokens}
        if not any(c.isdigit() for c in firsts | lasts):
            ends = "".join(re.escape(c) for c in sorted(lasts))
            starts = "".join(re.escape(c) for c in sorted(firsts))
            inner_space = re.compile(f"[^{ends}\\s]\\s|\\s[^{starts}\\s]")
    return _FastPlan(prefix, suffix, code_literals, per_code, level_first, inner_space)


class _Parser:
    """State machine of :meth:`SemanticTokenFormat.parse` (one instance per string)."""

    def __init__(self, fmt: SemanticTokenFormat, text: str) -> None:
        self.fmt = fmt
        self.text = text
        self.levels = fmt.num_levels  # None: fixed by the first frame
        self.frames: list[list[int]] = []
        self.durations: list[int] = []
        self.current: list[int] = []
        self.frame_start = 0
        self.pending: tuple[int, int] | None = None  # (duration, position)

    def fail(self, message: str, at: int) -> ValueError:
        return ValueError(f"invalid {self.fmt.name!r} token string at character {at}: {message}")

    def close_frame(self) -> None:
        self.frames.append(self.current)
        self.current = []
        if self.fmt.uses_durations:
            self.durations.append(self.pending[0] if self.pending else 1)
        self.pending = None

    def end_of_frame_boundary(self, what: str, at: int) -> None:
        """A token that cannot continue a frame: the frame in progress must be complete."""
        if self.current and self.levels is None:
            self.levels = len(self.current)  # the first frame fixes the number of levels
            self.close_frame()
        if self.current:
            raise self.fail(
                f"incomplete frame before {what} (has levels 0..{len(self.current) - 1}, needs {self.levels})",
                self.frame_start,
            )

    def run(self) -> ParsedTokens:
        fmt, text = self.fmt, self.text
        scanner = _compiled(fmt)
        sep = fmt.separator.strip()
        seen_start = fmt.start_token is None
        seen_end = False
        pos, n, first = 0, len(text), True
        while True:
            while pos < n and text[pos].isspace():
                pos += 1
            if pos >= n:
                break
            if not first and sep:
                if not text.startswith(sep, pos):
                    raise self.fail(f"expected separator {sep!r} before {_snippet(text, pos)!r}", pos)
                pos += len(sep)
                while pos < n and text[pos].isspace():
                    pos += 1
                if pos >= n:
                    raise self.fail("dangling separator", pos - len(sep))
            first = False
            if seen_end:
                raise self.fail(f"token {_snippet(text, pos)!r} after the end marker {fmt.end_token!r}", pos)
            token_pos = pos
            kind, level, value, pos = scanner.next_token(text, pos)
            if kind is None:
                raise self.fail(f"unknown token {_snippet(text, token_pos)!r}", token_pos)
            token = text[token_pos:pos]
            if kind == "start":
                if seen_start:
                    raise self.fail(f"unexpected start marker {token!r}", token_pos)
                seen_start = True
                continue
            if not seen_start:
                raise self.fail(f"missing start marker {fmt.start_token!r}: got {token!r}", token_pos)
            if kind == "end":
                self.end_of_frame_boundary("the end marker", token_pos)
                if self.pending is not None:
                    raise self.fail("duration token not followed by a frame", self.pending[1])
                seen_end = True
                continue
            if kind == "duration":
                if not fmt.uses_durations:
                    raise self.fail(
                        f"duration token {token!r} but format {fmt.name!r} writes none (dedup off)", token_pos
                    )
                self.end_of_frame_boundary(f"duration token {token!r}", token_pos)
                if self.pending is not None:
                    raise self.fail(f"two duration tokens in a row ({token!r})", token_pos)
                if value is None:
                    raise self.fail(
                        f"malformed duration token {token!r} (expected a run length >= 2 written with "
                        f"{fmt.duration_width} digits or more, without extra zeros)",
                        token_pos,
                    )
                self.pending = (value, token_pos)
                continue
            if value is None:
                raise self.fail(f"malformed code token {token!r} (non-canonical number)", token_pos)
            if level == 0 and self.current and self.levels is None:
                self.end_of_frame_boundary(f"token {token!r}", token_pos)
            expected = len(self.current)
            if level != expected:
                where = "a frame starts at level 0" if expected == 0 else f"expected level {expected}"
                raise self.fail(f"level out of order: {token!r} is level {level}, {where}", token_pos)
            if fmt.codebook_size is not None and value >= fmt.codebook_size:
                raise self.fail(f"code {value} of {token!r} is outside [0, {fmt.codebook_size})", token_pos)
            if not self.current:
                self.frame_start = token_pos
            self.current.append(value)
            if self.levels is not None and len(self.current) == self.levels:
                self.close_frame()
        if self.current and self.levels is None:
            self.levels = len(self.current)
            self.close_frame()
        if self.current:
            raise self.fail(
                f"incomplete frame at the end (has levels 0..{len(self.current) - 1}, needs {self.levels})",
                self.frame_start,
            )
        if self.pending is not None:
            raise self.fail("duration token not followed by a frame", self.pending[1])
        if not seen_start:
            raise self.fail(f"missing start marker {fmt.start_token!r} (empty string)", 0)
        if fmt.end_token is not None and not seen_end:
            raise self.fail(f"missing end marker {fmt.end_token!r}", n)
        q = self.levels if self.levels is not None else 1
        codes = np.array(self.frames, dtype=np.int64).reshape(len(self.frames), q).T.copy()
        durations = np.array(self.durations, dtype=np.int64) if fmt.uses_durations else None
        return ParsedTokens(codes, durations)


_DIGITS = frozenset("0123456789")
# Unicode categories a code point token may have: letters, numbers, punctuation, symbols, private use.
# Refused: whitespace and separators (Z*), controls and format characters (Cc, Cf: invisible, often
# stripped), combining marks (M*: they merge with the character before them), surrogates and unassigned
# code points (Cs, Cn).
_CODE_POINT_CATEGORIES = frozenset(
    ["Lu", "Ll", "Lt", "Lm", "Lo", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk",
     "So", "Co"]
)


@functools.lru_cache(maxsize=64)
def _check_code_points(name: str, first: int, last: int) -> None:
    """Every code point in ``[first, last]`` must survive ``str.split`` and Unicode normalisation unchanged.

    A character that is whitespace, invisible, combining, or changed by NFKC/NFD (the normalisers that
    tokenizers apply) would be lost or merged before the string is parsed again.
    """
    import unicodedata

    for point in range(first, last + 1):
        char = chr(point)
        category = unicodedata.category(char)
        reason = None
        if char.isspace() or category not in _CODE_POINT_CATEGORIES:
            reason = f"Unicode category {category}" + (" (whitespace)" if char.isspace() else "")
        elif unicodedata.normalize("NFKC", char) != char or unicodedata.normalize("NFD", char) != char:
            reason = "Unicode normalisation (NFKC/NFD) changes it"
        if reason is not None:
            raise ValueError(
                f"format {name!r}: code {point - first} would be rendered as U+{point:04X} "
                f"({unicodedata.name(char, 'unnamed')}), which str.split or a tokenizer's normaliser would drop "
                f"or change ({reason}). Choose a codepoint_offset whose range holds only letters, symbols or "
                "private-use characters, e.g. 0xF0000 (Spire) or 0xE000 (6400 codes)"
            )


def _check_number_ends(fmt: SemanticTokenFormat) -> None:
    """A number inside a token must end where the token says: never directly before a digit.

    Numbers are read greedily, so ``{code}`` followed by a digit (a literal, a separator or the next token)
    would swallow it: ``from_template("{code}")`` renders ``[1, 23]`` as ``"123"``.
    """
    code_first = None  # first character of a code token, "0" standing for any digit
    templates = []
    if fmt.codepoint_offset is None:
        literals, fields, _ = _template_parts(fmt.code_template, ("code", "level"), "code")
        code_first = literals[0][:1] or "0"
        templates.append(("code_template", fmt.code_template, literals, fields))
    if fmt.duration_template is not None:
        literals, fields, _ = _template_parts(fmt.duration_template, ("duration",), "duration")
        templates.append(("duration_template", fmt.duration_template, literals, fields))
    followers = {}  # which token kinds can follow a token of each template, with their first character
    if code_first is not None:
        followers["code_template"] = [("a code token", code_first)]
        if fmt.end_token is not None:
            followers["code_template"].append(("the end marker", fmt.end_token[0]))
        if fmt.uses_durations:
            duration_first = _template_parts(fmt.duration_template, ("duration",), "duration")[0][0][:1] or "0"
            followers["code_template"].append(("a duration token", duration_first))
        followers["duration_template"] = [("a code token", code_first)]
    separator = fmt.separator.strip()
    for option, template, literals, fields in templates:
        for field, after in zip(fields, literals[1:]):
            if after:
                if after[0] in _DIGITS:
                    raise ValueError(
                        f"{option} {template!r}: {{{field}}} is followed by the digit {after[0]!r}; numbers are "
                        "read greedily, so put a non-digit right after it"
                    )
                continue
            if fmt.separator and not separator:
                continue  # whitespace ends the number
            if separator:
                if separator[0] in _DIGITS:
                    raise ValueError(
                        f"{option} {template!r} ends with {{{field}}} and the separator {fmt.separator!r} starts "
                        "with a digit: the number would swallow it"
                    )
                continue
            for what, first in followers.get(option, []):
                if first in _DIGITS:
                    raise ValueError(
                        f"{option} {template!r} ends with {{{field}}} and {what} can follow it starting with a "
                        f"digit, without a separator: e.g. codes [1, 23] would read back as [123]. End the "
                        "template with a non-digit (\"<unit_{code}>\") or set a separator (separator=\" \")"
                    )


def _probe_codes(fmt: SemanticTokenFormat, levels: int) -> list[np.ndarray]:
    """Code sequences ``[levels, T]`` that put every kind of token next to every other one.

    Codes of 1, 2 and 3+ digits (and the largest code), runs of every interesting length when the format
    collapses runs (1, 2, 9, 10, max_duration, max_duration + 1), and the empty sequence.
    """
    size = fmt.codebook_size or 1024
    values = sorted({v for v in (0, 1, 9, 10, 11, 99, 100, 101, size // 2, size - 1) if 0 <= v < size})
    count = len(values)
    frames = np.array([[values[(t + 3 * level) % count] for t in range(count + 1)] for level in range(levels)])
    out = [frames, np.zeros((levels, 0), dtype=np.int64)]
    if fmt.dedup:
        runs = [1, 2, 9, 10, fmt.max_duration, fmt.max_duration + 1, 1, 3]
        n = min(len(runs), frames.shape[1])
        out.append(np.repeat(frames[:, :n], runs[:n], axis=1))
    return out


@functools.lru_cache(maxsize=256)
def _check_round_trip(fmt: SemanticTokenFormat) -> None:
    """Render probe codes and parse them back (strict parser and :meth:`parse`); refuse the format otherwise."""
    level_counts = [fmt.num_levels] if fmt.num_levels is not None else [1, 3]
    for levels in level_counts:
        for codes in _probe_codes(fmt, levels):
            if codes.shape[1] == 0 and fmt.num_levels is None:
                continue  # no frame tells the number of levels
            text = fmt.render(codes)
            expected = codes
            if fmt.dedup and not fmt.uses_durations and codes.shape[1]:
                keep = np.ones(codes.shape[1], dtype=bool)
                keep[1:] = (codes[:, 1:] != codes[:, :-1]).any(axis=0)
                expected = codes[:, keep]
            try:
                results = [_Parser(fmt, text).run(), fmt.parse(text)]
            except ValueError as error:
                raise ValueError(
                    f"format {fmt.name!r} cannot parse its own output {_short(text)!r}: {error}"
                ) from None
            for parsed in results:
                got = parsed.expand() if fmt.uses_durations else parsed.codes
                if got.shape != expected.shape or not np.array_equal(got, expected):
                    raise ValueError(
                        f"format {fmt.name!r} is ambiguous: {_short(text)!r} (rendered from codes "
                        f"{expected.tolist()[:3]}...) parses back as {got.tolist()[:3]}...; make the tokens "
                        "self-delimiting (a non-digit after each number, distinct markers) or add a separator"
                    )


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _round_up(size: int) -> int:
    """Lookup tables for formats without codebook_size grow in powers of two (few cache entries)."""
    return 1 << max(0, int(size - 1).bit_length())


def _snippet(text: str, pos: int) -> str:
    """The would-be token at ``pos``: up to the next ``>`` for ``<...>`` tokens, else up to whitespace."""
    if text[pos] == "<":
        close = text.find(">", pos)
        nxt = text.find("<", pos + 1)
        if close != -1 and (nxt == -1 or close < nxt):
            return text[pos : close + 1][:60]
        return text[pos : nxt if nxt != -1 else pos + 30][:30]
    match = re.match(r"[^\s<]{1,30}", text[pos:])
    return match.group(0) if match and len(match.group(0)) > 1 and not _is_private(text[pos]) else text[pos]


def _is_private(char: str) -> bool:
    cp = ord(char)
    return 0xE000 <= cp <= 0xF8FF or cp >= 0xF0000


@functools.lru_cache(maxsize=64)
def _code_table(fmt: SemanticTokenFormat, levels: int, size: int) -> np.ndarray:
    """Object array ``[levels, size]`` of code token strings."""
    table = np.empty((levels, size), dtype=object)
    if fmt.codepoint_offset is not None:
        stride = fmt.codebook_size or 0
        for level in range(levels):
            base = fmt.codepoint_offset + level * stride
            table[level] = [chr(base + c) for c in range(size)]
        return table
    literals, fields, _ = _template_parts(fmt.code_template, ("code", "level"), "code")
    codes = [str(c).zfill(fmt.code_width) for c in range(size)]
    for level in range(levels):
        values = {"level": str(level)}
        rendered = []
        for c in codes:
            values["code"] = c
            rendered.append("".join(lit + values[f] for lit, f in zip(literals, fields)) + literals[-1])
        table[level] = rendered
    return table


@functools.lru_cache(maxsize=64)
def _duration_table(fmt: SemanticTokenFormat) -> np.ndarray:
    """Object array ``[max_duration + 1]``: index d -> duration token (None for 0 and 1)."""
    table = np.empty(fmt.max_duration + 1, dtype=object)
    for d in range(2, fmt.max_duration + 1):
        table[d] = fmt.duration_token(d)
    return table


class _Scanner:
    """Recognises one token at a position: markers, durations, codes (regex or code point)."""

    def __init__(self, fmt: SemanticTokenFormat) -> None:
        self.fmt = fmt
        alternatives = []
        if fmt.start_token is not None:
            alternatives.append(f"(?P<start>{re.escape(fmt.start_token)})")
        if fmt.end_token is not None:
            alternatives.append(f"(?P<end>{re.escape(fmt.end_token)})")
        if fmt.duration_template is not None:
            literals, _, _ = _template_parts(fmt.duration_template, ("duration",), "duration")
            alternatives.append(
                f"(?P<duration>{re.escape(literals[0])}(?P<dvalue>[0-9]+){re.escape(literals[1])})"
            )
        if fmt.codepoint_offset is not None:
            span = 0x10FFFF - fmt.codepoint_offset + 1
            if fmt.codebook_size:
                levels = fmt.num_levels or span // fmt.codebook_size
                span = levels * fmt.codebook_size
            lo, hi = fmt.codepoint_offset, fmt.codepoint_offset + span - 1
            alternatives.append(f"(?P<char>[{_char_class(lo)}-{_char_class(hi)}])")
        else:
            literals, fields, _ = _template_parts(fmt.code_template, ("code", "level"), "code")
            pattern = re.escape(literals[0])
            for field, literal in zip(fields, literals[1:]):
                group = "cvalue" if field == "code" else "lvalue"
                pattern += f"(?P<{group}>[0-9]+)" + re.escape(literal)
            alternatives.append(f"(?P<code>{pattern})")
        self.regex = re.compile("|".join(alternatives))

    def next_token(self, text: str, pos: int) -> tuple[str | None, int | None, int | None, int]:
        """(kind, level, value, end): kind in start/end/duration/code/None; value None if not canonical."""
        match = self.regex.match(text, pos)
        if match is None:
            return None, None, None, pos
        kind = match.lastgroup if match.lastgroup in ("start", "end", "duration", "code", "char") else None
        if kind is None:  # lastgroup is an inner group: find the outer one
            for name in ("duration", "code"):
                if match.group(name) is not None:
                    kind = name
                    break
        fmt = self.fmt
        if kind == "duration":
            digits = match.group("dvalue")
            value = int(digits)
            # durations above max_duration are read too (never written): Ichigo's own run-length code
            # writes <|duration_50|> and up for runs longer than 49 frames
            ok = digits == str(value).zfill(fmt.duration_width) and value >= 2
            return "duration", None, value if ok else None, match.end()
        if kind == "char":
            offset = ord(match.group("char")) - fmt.codepoint_offset
            size = fmt.codebook_size
            if size is None:
                return "code", 0, offset, match.end()
            return "code", offset // size, offset % size, match.end()
        if kind == "code":
            digits = match.group("cvalue")
            value = int(digits)
            level_digits = match.group("lvalue") if "lvalue" in self.regex.groupindex else None
            level = int(level_digits) if level_digits is not None else 0
            canonical = digits == str(value).zfill(fmt.code_width) and (
                level_digits is None or level_digits == str(level)
            )
            return "code", level, value if canonical else None, match.end()
        return kind, None, None, match.end()


def _char_class(codepoint: int) -> str:
    return re.escape(chr(codepoint))


@functools.lru_cache(maxsize=64)
def _compiled(fmt: SemanticTokenFormat) -> _Scanner:
    scanner = _Scanner(fmt)
    # the markers and durations must not themselves look like code tokens (parsing would be ambiguous)
    specials = [t for t in (fmt.start_token, fmt.end_token) if t is not None]
    if fmt.duration_template is not None:
        specials.append(fmt.duration_token(2))
    code_only = (
        _Scanner(dataclasses.replace(fmt, start_token=None, end_token=None, duration_template=None))
        if (specials)
        else None
    )
    for token in specials:
        if code_only is not None:
            kind, _, _, end = code_only.next_token(token, 0)
            if kind == "code" and end == len(token):
                raise ValueError(f"format {fmt.name!r}: marker/duration token {token!r} is also a code token")
    return scanner


def _replace(fmt: SemanticTokenFormat, overrides: Mapping[str, Any]) -> SemanticTokenFormat:
    overrides = dict(overrides)
    if "markers" in overrides and not overrides.pop("markers"):
        overrides.setdefault("start_token", None)
        overrides.setdefault("end_token", None)
    known = {f.name for f in dataclasses.fields(SemanticTokenFormat)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown token format option(s) {unknown}; known: {sorted(known | {'markers'})}")
    return dataclasses.replace(fmt, **overrides) if overrides else fmt


PRESETS: dict[str, SemanticTokenFormat] = {
    # The default: every level named, frames interleaved, markers; codebook of the seed model (Q=8, K=2048).
    "gemma_rvq": SemanticTokenFormat(
        name="gemma_rvq",
        code_template="<|q{level}_{code}|>",
        code_width=4,
        codebook_size=2048,
        num_levels=8,
        start_token="<|rvq_start|>",
        end_token="<|rvq_end|>",
        dedup=False,
        duration_template="<|rvq_dur_{duration}|>",
        duration_width=2,
        max_duration=49,
    ),
    # Ichigo / Speechless: level 0 only, runs collapsed with <|duration_NN|> (02..49) before runs >= 2.
    "ichigo": SemanticTokenFormat(
        name="ichigo",
        code_template="<|sound_{code}|>",
        code_width=4,
        codebook_size=2048,
        num_levels=1,
        start_token="<|sound_start|>",
        end_token="<|sound_end|>",
        dedup=True,
        duration_template="<|duration_{duration}|>",
        duration_width=2,
        max_duration=49,
    ),
    # SpireLM: one private-use character per unit (HuBERT k-means, 5000 units), duplicates collapsed.
    "spire": SemanticTokenFormat(
        name="spire",
        codepoint_offset=0xF0000,
        codebook_size=5000,
        num_levels=1,
        dedup=True,
    ),
}


def get_format(
    name_or_format: str | SemanticTokenFormat | Mapping[str, Any], **overrides: Any
) -> SemanticTokenFormat:
    """Resolve a preset name, a format, or a :meth:`SemanticTokenFormat.to_dict` dict, with overrides.

    Example:
        ```python
        >>> get_format("ichigo", codebook_size=512).vocabulary()[:3]
        ['<|sound_start|>', '<|sound_end|>', '<|duration_02|>']
        ```
    """
    if isinstance(name_or_format, SemanticTokenFormat):
        return _replace(name_or_format, overrides)
    if isinstance(name_or_format, str):
        return SemanticTokenFormat.from_preset(name_or_format, **overrides)
    if isinstance(name_or_format, Mapping):
        return _replace(SemanticTokenFormat.from_dict(name_or_format), overrides)
    raise ValueError(
        f"expected a preset name {sorted(PRESETS)}, a SemanticTokenFormat or its dict, got {type(name_or_format).__name__}"
    )


def format_for_model(
    name_or_format: str | SemanticTokenFormat | Mapping[str, Any],
    *,
    codebook_size: int,
    num_quantizers: int,
) -> SemanticTokenFormat:
    """The format a model's codes are rendered in.

    A preset *name* is fitted to the model: its ``codebook_size`` becomes the model's K and a multi-level
    preset (``gemma_rvq``) renders the model's ``num_quantizers`` levels; single-level presets (``ichigo``,
    ``spire``) render level 0. A :class:`SemanticTokenFormat` or its dict is the user's explicit choice and
    is returned unchanged.
    """
    if not isinstance(name_or_format, str):
        return get_format(name_or_format)
    preset = get_format(name_or_format)
    levels = preset.num_levels if preset.num_levels == 1 else num_quantizers
    return get_format(preset, codebook_size=codebook_size, num_levels=levels)
