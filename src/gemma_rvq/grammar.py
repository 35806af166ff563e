"""Grammar-constrained generation of semantic token strings (stage 2, Speechless).

:class:`SemanticGrammarLogitsProcessor` is a ``transformers.LogitsProcessor`` that lets a causal LM write
only strings its :class:`~gemma_rvq.tokens.SemanticTokenFormat` parses:

- the start marker first (when the format has one);
- frames as ``q0 q1 ... q(Q-1)``, level by level;
- a duration token only at a frame boundary, only when the format writes durations, and only
  ``2..max_duration``; it is followed by a frame;
- with ``dedup``, a frame never repeats the previous one unless that run was ``max_duration`` long (the
  canonical form :meth:`~gemma_rvq.tokens.SemanticTokenFormat.render` writes);
- the format's separator between tokens (its token ids, as the tokenizer writes them);
- the end marker (or EOS for a format without one) only after a complete frame, then EOS;
- with ``max_new_tokens``, a new frame (or duration) is allowed only while it and the closing tokens
  still fit, so every row closes its string in time.

The grammar is a small deterministic automaton over token *classes* (start, end, EOS, duration, code of
level ``l``); per step the processor advances every row with two table lookups and masks the logits with
one gathered row of a precomputed ``[budget, state, columns]`` table: no Python loop over rows or tokens.
It works with greedy search, sampling and beam search (rows reordered by beam search are matched to
their parents by their generated tokens). One processor serves one ``generate`` call at a time; it
restarts by itself when a new call begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

__all__ = ["SemanticGrammarLogitsProcessor", "semantic_token_ids"]

# token classes
_OTHER, _START, _END, _EOS, _DUR, _CODE0 = 0, 1, 2, 3, 4, 5


class SemanticGrammarLogitsProcessor(LogitsProcessor):
    """Mask every token that would make the generated string unparseable by ``token_format``.

    Args:
        tokenizer: a tokenizer holding every token of the format (``gemma_rvq.llm.add_semantic_tokens``).
        token_format: the format the model writes (name, dict or ``SemanticTokenFormat``; it needs
            ``codebook_size`` and ``num_levels``).
        eos_token_id: the stop ids passed to ``generate`` (int or list; default: the tokenizer's EOS). When
            the end marker is among them, the string is closed by the end marker alone; otherwise EOS
            follows it.
        max_new_tokens: the ``max_new_tokens`` of the ``generate`` call: frames are only started while they
            and the closing tokens fit. ``None``: no length budget.
        canonical: with ``dedup``, forbid a frame equal to the previous one unless that run reached
            ``max_duration`` (the renderer never writes such a string).

    Shapes: ``input_ids`` ``[N, S]`` (N = batch x beams), ``scores`` ``[N, V]`` (V may exceed the
    tokenizer's length when embeddings are padded); returns new scores ``[N, V]`` with ``-inf`` outside the
    grammar.

    Raises:
        ValueError: a token of the format missing from the tokenizer, a separator the tokenizer does not
            write as a fixed id sequence between semantic tokens, no stop token, or a ``max_new_tokens``
            too small for one frame.
    """

    def __init__(
        self,
        tokenizer: Any,
        token_format: Any,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        max_new_tokens: int | None = None,
        canonical: bool = True,
    ) -> None:
        from .tokens import get_format

        fmt = get_format(token_format)
        self.format = fmt
        vocab = fmt.vocabulary()
        ids = semantic_token_ids(tokenizer, fmt)
        levels, size = fmt.num_levels, fmt.codebook_size
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
        stops = sorted({int(i) for i in ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
                        if i is not None})
        marker_ids = dict(zip([t for t in (fmt.start_token, fmt.end_token) if t is not None], ids))
        start_id = marker_ids.get(fmt.start_token) if fmt.start_token is not None else None
        end_id = marker_ids.get(fmt.end_token) if fmt.end_token is not None else None
        eos_ids = [i for i in stops if i != end_id]
        if end_id is None and not eos_ids:
            raise ValueError(f"format {fmt.name!r} has no end marker and no EOS id was given: nothing can stop "
                             "the string (pass eos_token_id)")
        self.end_is_stop = end_id is not None and end_id in stops
        self.separator_ids = _separator_ids(tokenizer, fmt, ids)
        s = len(self.separator_ids)
        n_markers = len(marker_ids)
        n_durations = fmt.max_duration - 1 if fmt.uses_durations else 0
        duration_ids = ids[n_markers:n_markers + n_durations]
        code_ids = torch.tensor(ids[n_markers + n_durations:], dtype=torch.long).view(levels, size)
        assert len(vocab) == n_markers + n_durations + levels * size

        # columns the grammar can ever allow, and the class / value of each token id
        columns = sorted({*ids, *stops, *self.separator_ids})
        self._columns = torch.tensor(columns, dtype=torch.long)
        column_of = {token_id: c for c, token_id in enumerate(columns)}
        table_size = max(columns) + 1
        classes = torch.full((table_size,), _OTHER, dtype=torch.long)
        for i in eos_ids:
            classes[i] = _EOS
        if start_id is not None:
            classes[start_id] = _START
        if end_id is not None:
            classes[end_id] = _END
        durations = torch.ones(table_size, dtype=torch.long)
        for d, token_id in zip(range(2, fmt.max_duration + 1), duration_ids):
            classes[token_id] = _DUR
            durations[token_id] = d
        values = torch.zeros(table_size, dtype=torch.long)
        for level in range(levels):
            classes[code_ids[level]] = _CODE0 + level
            values[code_ids[level]] = torch.arange(size)
        self._classes, self._durations, self._values = classes, durations, values
        self._code_columns = torch.tensor([[column_of[int(i)] for i in row] for row in code_ids.tolist()])
        self._code_ids = code_ids  # [Q, K] token ids
        self._largest_id = int(columns[-1])

        # the automaton: states, their allowed columns per budget level, their transitions
        has_start, has_end = start_id is not None, end_id is not None
        states: list[tuple] = [("start",)] if has_start else []
        for h in (0, 1):
            for level in range(levels):
                for pending in ((0, 1) if level == 0 and fmt.uses_durations else (0,)):
                    states.append(("slot", level, pending, h))
                    states += [("sep", j, level, pending, h) for j in range(s)]
        states += [("end",), ("done",)]
        index = {state: i for i, state in enumerate(states)}

        def after_token(slot: tuple) -> int:
            """The state after a semantic token when ``slot`` comes next (separator first, if any)."""
            return index[("sep", 0, *slot[1:])] if s else index[slot]

        n_classes = _CODE0 + levels
        transitions = torch.full((len(states), n_classes), index[("done",)], dtype=torch.long)
        stop_columns = [column_of[i] for i in eos_ids] or [column_of[end_id]]
        masks = torch.zeros(4, len(states), len(columns), dtype=torch.bool)
        last_level = torch.zeros(len(states), dtype=torch.bool)
        for i, state in enumerate(states):
            kind = state[0]
            allowed: list[list[int]] = [[] for _ in range(4)]  # per budget level
            if kind == "start":
                for b in range(4):
                    allowed[b] = [column_of[start_id]]
                transitions[i, _START] = after_token(("slot", 0, 0, 0))
            elif kind == "slot":
                _, level, pending, h = state
                codes = self._code_columns[level].tolist()
                last_level[i] = level == levels - 1
                if level > 0 or pending:
                    allowed = [codes] * 4
                else:
                    for b in range(4):
                        allowed[b] = (codes if b <= 2 else []) + (
                            [column_of[t] for t in duration_ids] if b == 0 else [])
                        if h and has_end:
                            allowed[b] = allowed[b] + [column_of[end_id]]
                        elif h and not s:
                            allowed[b] = allowed[b] + [column_of[t] for t in eos_ids]
                    if fmt.uses_durations:
                        transitions[i, _DUR] = after_token(("slot", 0, 1, h))
                    transitions[i, _END] = index[("end",)]
                    transitions[i, _EOS] = index[("done",)]
                complete = level == levels - 1
                transitions[i, _CODE0 + level] = after_token(("slot", 0, 0, 1) if complete else ("slot", level + 1, 0, h))
            elif kind == "sep":
                _, j, level, pending, h = state
                following = index[("sep", j + 1, level, pending, h)] if j + 1 < s else index[("slot", level, pending, h)]
                transitions[i, :] = following
                closable = j == 0 and level == 0 and not pending and h and not has_end
                for b in range(4):
                    allowed[b] = [column_of[self.separator_ids[j]]] if (not closable or b <= 1) else []
                    if closable:
                        allowed[b] = allowed[b] + [column_of[t] for t in eos_ids]
                if closable:
                    transitions[i, _EOS] = index[("done",)]
            else:  # end marker written, or finished: only stop tokens (a finished row's scores are ignored)
                allowed = [stop_columns] * 4
            for b in range(4):
                masks[b, i, allowed[b] or stop_columns] = True
        self._states = states
        self._initial = index[("start",)] if has_start else index[("slot", 0, 0, 0)]
        self._transitions, self._masks, self._last_level = transitions, masks, last_level

        # length budget: tokens needed after a level-0 code to finish the frame and close the string
        close = (s + 1 + (0 if self.end_is_stop else 1)) if has_end else 1
        self._after_code0 = (levels - 1) * (1 + s) + close
        self._separator_length = s
        shortest = (1 + s if has_start else 0) + 1 + self._after_code0
        if max_new_tokens is not None and max_new_tokens < shortest:
            raise ValueError(f"max_new_tokens={max_new_tokens} cannot hold one frame of format {fmt.name!r}: "
                             f"the shortest string takes {shortest} tokens")
        self.max_new_tokens = max_new_tokens
        self.minimum_new_tokens = shortest
        self.canonical = bool(canonical and fmt.dedup and size > 1)
        self._device = self._width = None
        self._rows = self._length = self._prompt_length = None
        self._state = self._generated = None

    # ------------------------------------------------------------------ per step
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        width = scores.shape[-1]
        if self._largest_id >= width:
            raise ValueError(f"token id {self._largest_id} is outside the logits ({width})")
        if self._device != scores.device or self._width != width:
            self._prepare(scores.device, width)
        rows, length = input_ids.shape
        if self._state is None or rows != self._rows or length != self._length + 1 or not self._advance(input_ids):
            self._begin(input_ids)
        self._rows, self._length = rows, length
        self._generated = input_ids[:, self._prompt_length:]  # generate builds a new tensor every step
        blocked = self._blocked[self._budget(length - self._prompt_length)].index_select(0, self._state)  # [N, V]
        out = scores.masked_fill(blocked, float("-inf"))
        return self._forbid_repeat(out) if self.canonical else out

    def _budget(self, generated: int) -> int:
        """0: anything fits; 1: no duration token; 2: a frame fits but no separator before it; 3: close."""
        if self.max_new_tokens is None:
            return 0
        left = self.max_new_tokens - generated
        s, need = self._separator_length, self._after_code0
        if left >= 2 + s + need:
            return 0
        if left >= 1 + s + need:
            return 1
        return 2 if left >= 1 + need else 3

    def _begin(self, input_ids: torch.LongTensor) -> None:
        """A new ``generate`` call: everything so far is the prompt."""
        rows, length = input_ids.shape
        device = input_ids.device
        self._prompt_length = length
        self._state = torch.full((rows,), self._initial, dtype=torch.long, device=device)
        if self.canonical:
            levels = self.format.num_levels
            self._prev = torch.full((rows, levels), -1, dtype=torch.long, device=device)
            self._cur = torch.zeros((rows, levels), dtype=torch.long, device=device)
            self._same = torch.ones(rows, dtype=torch.bool, device=device)
            self._prev_dur = torch.ones(rows, dtype=torch.long, device=device)
            self._cur_dur = torch.ones(rows, dtype=torch.long, device=device)

    def _advance(self, input_ids: torch.LongTensor) -> bool:
        """Advance every row by its last token; False when the rows are not continuations of the last call."""
        prefix = input_ids[:, self._prompt_length:-1]
        if not torch.equal(prefix, self._generated):
            # beam search reorders rows: a row's state depends only on its generated tokens, so any previous
            # row with the same tokens is its parent
            same = (prefix[:, None, :] == self._generated[None, :, :]).all(-1)  # [N, N]
            if not bool(same.any(1).all()):
                return False
            parent = same.to(torch.int8).argmax(1)
            self._state = self._state[parent]
            if self.canonical:
                for name in ("_prev", "_cur", "_same", "_prev_dur", "_cur_dur"):
                    setattr(self, name, getattr(self, name)[parent])
        token = input_ids[:, -1]
        cls = self._token_classes[token]
        if self.canonical:
            self._track_frames(token, cls)
        self._state = self._transitions_flat[self._state * self._n_classes + cls]
        return True

    def _track_frames(self, token: torch.Tensor, cls: torch.Tensor) -> None:
        """Keep the previous frame, the frame in progress and their durations (dedup formats only)."""
        levels = self.format.num_levels
        is_code = (cls >= _CODE0) & (cls < _CODE0 + levels)
        level = (cls - _CODE0).clamp(0, levels - 1)[:, None]
        value = self._token_values[token]
        matches = value == self._prev.gather(1, level).squeeze(1)
        self._same = torch.where(is_code, ((level.squeeze(1) == 0) | self._same) & matches, self._same)
        current = torch.where(is_code, value, self._cur.gather(1, level).squeeze(1))
        self._cur = self._cur.scatter(1, level, current[:, None])
        complete = is_code & (level.squeeze(1) == levels - 1)
        self._prev = torch.where(complete[:, None], self._cur, self._prev)
        self._prev_dur = torch.where(complete, self._cur_dur, self._prev_dur)
        self._cur_dur = torch.where(cls == _DUR, self._token_durations[token],
                                    torch.where(complete, torch.ones_like(self._cur_dur), self._cur_dur))
        self._same = self._same | complete

    def _forbid_repeat(self, scores: torch.Tensor) -> torch.Tensor:
        """At the last level of a frame equal so far to the previous one, forbid completing the copy."""
        levels = self.format.num_levels
        active = self._last_level[self._state] & self._same & (self._prev[:, 0] >= 0)
        if self.format.uses_durations:
            active &= self._prev_dur < self.format.max_duration
        column = self._code_ids[levels - 1][self._prev[:, levels - 1].clamp(min=0)][:, None]
        kept = scores.gather(1, column)
        return scores.scatter(1, column, torch.where(active[:, None], float("-inf"), kept))

    def _prepare(self, device: torch.device, width: int) -> None:
        """Full-width tables for logits of ``width`` columns on ``device`` (built once per generate setup).

        ``_blocked [4, S, V]``: True where a token is forbidden, per budget level and state (for a Gemma-size
        vocabulary of 262k and ~20 states, ~20 MB); ``_token_classes [V]``: the class of every id.
        """
        for name in ("_code_ids", "_last_level"):
            setattr(self, name, getattr(self, name).to(device))
        allowed = torch.zeros(4, len(self._states), width, dtype=torch.bool)
        allowed[:, :, self._columns] = self._masks
        self._blocked = (~allowed).to(device)
        classes = torch.full((width,), _OTHER, dtype=torch.long)
        classes[: self._classes.shape[0]] = self._classes
        self._token_classes = classes.to(device)
        self._n_classes = self._transitions.shape[1]
        self._transitions_flat = self._transitions.reshape(-1).to(device)
        self._token_durations = self._pad(self._durations, width, 1).to(device)
        self._token_values = self._pad(self._values, width, 0).to(device)
        self._device, self._width = device, width
        self._state = None  # state tensors live on the old device: start again

    @staticmethod
    def _pad(table: torch.Tensor, width: int, fill: int) -> torch.Tensor:
        out = torch.full((width,), fill, dtype=table.dtype)
        out[: table.shape[0]] = table.cpu()
        return out


def semantic_token_ids(tokenizer: Any, token_format: Any) -> list[int]:
    """Ids of ``token_format.vocabulary()`` in ``tokenizer``; ``ValueError`` if any token is missing."""
    from .tokens import get_format

    fmt = get_format(token_format)
    vocab = fmt.vocabulary()
    known = tokenizer.get_vocab()
    missing = [t for t in vocab if t not in known]
    if missing:
        raise ValueError(
            f"the tokenizer lacks {len(missing)} of the {len(vocab)} tokens of format {fmt.name!r} "
            f"({fmt.num_levels} levels x {fmt.codebook_size} codes; e.g. {missing[:3]}): is it the format the "
            "model was trained on? A model saved by examples/sft.py carries its format (semantic_format.json), "
            "so leave token_format out; otherwise add the tokens with gemma_rvq.llm.add_semantic_tokens"
        )
    return [known[t] for t in vocab]


def _separator_ids(tokenizer: Any, fmt: Any, ids: list[int]) -> list[int]:
    """The ids the tokenizer writes for the format's separator between two semantic tokens ([] if none)."""
    if not fmt.separator:
        return []
    vocab = fmt.vocabulary()
    encoded = tokenizer(fmt.separator.join([vocab[0], vocab[-1], vocab[-2]]), add_special_tokens=False)["input_ids"]
    if encoded[:1] == [ids[0]] and ids[-1] in encoded:
        separator = encoded[1:encoded.index(ids[-1])]
        if separator and encoded == [ids[0], *separator, ids[-1], *separator, ids[-2]]:
            return separator
    raise ValueError(
        f"the tokenizer does not write the separator {fmt.separator!r} of format {fmt.name!r} as one fixed id "
        f"sequence between semantic tokens (got {encoded}): constrained generation cannot enforce it. Use a "
        "format without a separator for LLM training"
    )
