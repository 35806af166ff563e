"""Prompt templates of the stage-2 / stage-3 recipes.

A :class:`PromptTemplate` is a pair of ``str.format`` strings: the prompt (what the model reads) and the
completion (what it learns to write). Fields:

- ``{text}``             the transcript / input text
- ``{speech}``           the semantic token string of the utterance
- ``{language}``         a language name (``"English"``, ``"Swahili"``), or the target language of a
                         translation
- ``{language_tag}``     ``"[<language>] "`` when a language is given, ``""`` otherwise

The prompt of a prompt/completion pair must end on a token boundary (TRL finds the completion where the
tokenised prompt and prompt+completion diverge): the presets end the prompt with a newline or a colon and
start the completion with a space or with the format's start marker, an added token.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

__all__ = ["TEMPLATES", "PromptTemplate", "get_template"]

_FIELDS = {"text", "speech", "language", "language_tag"}


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt and a completion template (``str.format`` strings over :data:`_FIELDS`)."""

    name: str
    prompt: str
    completion: str
    description: str = ""

    def __post_init__(self) -> None:
        for part in ("prompt", "completion"):
            unknown = _fields_of(getattr(self, part)) - _FIELDS
            if unknown:
                raise ValueError(
                    f"template {self.name!r}: unknown field(s) {sorted(unknown)} in the {part} "
                    f"{getattr(self, part)!r}; available: {sorted(_FIELDS)}"
                )

    @property
    def fields(self) -> set[str]:
        """The fields used by the prompt and the completion."""
        return _fields_of(self.prompt) | _fields_of(self.completion)

    def render(self, *, text: str = "", speech: str = "", language: str | None = None) -> tuple[str, str]:
        """Return ``(prompt, completion)`` for one example."""
        if "language" in self.fields and not language:
            raise ValueError(f"template {self.name!r} needs a language ({{language}} in {self.prompt!r})")
        values = {
            "text": text,
            "speech": speech,
            "language": language or "",
            "language_tag": f"[{language}] " if language else "",
        }
        return self.prompt.format(**values), self.completion.format(**values)


def _fields_of(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


TEMPLATES: dict[str, PromptTemplate] = {
    # Stage 2 (Speechless): text in, semantic tokens out. The completion is the bare token string: it
    # starts with the format's start marker (an added token), so the boundary is clean.
    "speechless": PromptTemplate(
        name="speechless",
        prompt="{language_tag}{text}\n",
        completion="{speech}",
        description="text (+ optional [language] tag) -> semantic token string (Speechless, stage 2)",
    ),
    # ASR in the SpireLM style: "Speech: <units>\nEnglish: <transcript>".
    "spire_asr": PromptTemplate(
        name="spire_asr",
        prompt="Speech: {speech}\n{language}:",
        completion=" {text}",
        description="SpireLM-style ASR / speech translation: 'Speech: <units>\\n<Language>: <text>'",
    ),
    # A plain ASR prompt for models without a language name at hand.
    "asr": PromptTemplate(
        name="asr",
        prompt="{speech}\nTranscript:",
        completion=" {text}",
        description="semantic tokens -> transcript",
    ),
}


def get_template(name_or_template: str | PromptTemplate, completion: str | None = None) -> PromptTemplate:
    """Resolve a preset name, a :class:`PromptTemplate`, or a literal prompt format string.

    A string that is not a preset name is used as the prompt itself (it must contain ``{``), with
    ``completion`` (required then) as the completion template.
    """
    if isinstance(name_or_template, PromptTemplate):
        return name_or_template
    if name_or_template in TEMPLATES and completion is None:
        return TEMPLATES[name_or_template]
    if "{" not in name_or_template:
        raise ValueError(
            f"unknown prompt template {name_or_template!r}; presets: {sorted(TEMPLATES)} "
            "(or pass a format string such as '{text}\\n')"
        )
    if completion is None:
        raise ValueError(f"a custom prompt template {name_or_template!r} needs a completion template too")
    return PromptTemplate(name="custom", prompt=name_or_template, completion=completion)
