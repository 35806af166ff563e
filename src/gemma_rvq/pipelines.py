"""``pipeline("speech-instruct", model=stage3_dir)``: speech in, the stage-3 LLM's text answer out.

A custom transformers pipeline, registered with ``PIPELINE_REGISTRY`` when ``gemma_rvq`` is imported. It
reads everything from the folder ``examples/sft.py`` saved (a full model or a LoRA adapter, merged for
inference):

- the recipe (``gemma_rvq_recipe.json``): ``speech_instruct`` models get the chat template with the
  training system prompt and user template; ``asr`` models get their prompt template and language and
  answer with the transcript;
- the token format and the stage-1 speech tokenizer (``semantic_format.json``; pass
  ``speech_tokenizer=`` to use another copy of the same RVQ model).

Each input (a file path, a ``{"array", "sampling_rate"}`` or datasets audio dict, a ``{"bytes"/"path"}``
dict of ``Audio(decode=False)``, or an array with ``sampling_rate=``) is encoded by the RVQ model,
rendered with the format, put in the prompt and answered with ``model.generate``; batches are
left-padded (``batch_size=``), ``generate_kwargs`` (or ``max_new_tokens=``) go to ``generate``.

    from transformers import pipeline
    import gemma_rvq  # registers the task

    answer = pipeline("speech-instruct", model="out/speech-instruct")
    answer("question.wav")                      # {"generated_text": "..."}
    answer(["a.wav", "b.flac"], batch_size=8, max_new_tokens=64)
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from transformers import Pipeline

__all__ = ["SpeechInstructPipeline", "SpeechLLM", "load_speech_llm"]

TASK = "speech-instruct"


def load_speech_llm(path: str | os.PathLike, *, merge_adapter: bool = True, **from_pretrained_kwargs: Any):
    """``(model, tokenizer)`` of a stage-2/3 folder saved by ``examples/sft.py``, ready for inference.

    A LoRA adapter is merged into its base (``merge_adapter``). The model keeps the folder's recipe
    (``model.gemma_rvq_recipe``) and format record (``model.gemma_rvq_format``).
    """
    from .recipes.sft import RECIPE_FILE, load_sft_model

    path = os.fspath(path)
    model, tokenizer = load_sft_model(path, **from_pretrained_kwargs)
    record = model.gemma_rvq_format
    if merge_adapter and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        model.gemma_rvq_format = record
    recipe_path = os.path.join(path, RECIPE_FILE)
    recipe = {}
    if os.path.isfile(recipe_path):
        with open(recipe_path, encoding="utf-8") as handle:
            recipe = json.load(handle)
    model.gemma_rvq_recipe = recipe
    model.eval()
    return model, tokenizer


class SpeechLLM:
    """The loader ``pipeline()`` calls for this task: ``from_pretrained`` returns the merged stage-3 LM."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any):
        dtype = kwargs.get("dtype")
        kwargs = {"dtype": dtype} if dtype not in (None, "auto") else {}
        model, _ = load_speech_llm(path, **kwargs)
        return model


class SpeechInstructPipeline(Pipeline):
    """Audio -> semantic tokens (stage-1 RVQ) -> prompt -> the stage-3 LLM's answer.

    Args (besides the ``Pipeline`` ones):
        speech_tokenizer: the stage-1 model (a ``GemmaRVQModel``, a folder or a Hub id); default: the one
            recorded in the stage-3 folder's ``semantic_format.json``.
        token_format: default the format the stage-3 model carries (a given one must agree).
        recipe: override the recipe record (``recipe``, ``prompt_template``, ``system_prompt``,
            ``user_template``, ``language``).
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, model, tokenizer=None, *, speech_tokenizer: Any = None, token_format: Any = None,
                 recipe: dict | None = None, **kwargs: Any) -> None:
        from .formats import model_format_record, resolve_format

        if isinstance(model, str | os.PathLike):
            model, loaded_tokenizer = load_speech_llm(model)
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("the speech-instruct pipeline needs the stage-3 tokenizer")
        self.recipe = {**getattr(model, "gemma_rvq_recipe", {}), **(recipe or {})}
        kind = self.recipe.get("recipe", "speech_instruct")
        if kind not in ("speech_instruct", "asr"):
            raise ValueError(f"the speech-instruct pipeline answers with speech_instruct or asr models; this one was "
                             f"trained with the {kind!r} recipe (text -> tokens: use generate_semantic_tokens)")
        self.token_format = resolve_format(token_format, model=model)
        record = model_format_record(model)
        speech_tokenizer = speech_tokenizer or (record.speech_tokenizer if record else None)
        if speech_tokenizer is None:
            raise ValueError("no speech tokenizer recorded in the model's semantic_format.json: pass "
                             "speech_tokenizer= (the stage-1 RVQ model folder or Hub id)")
        self.speech_tokenizer = _load_rvq(speech_tokenizer)
        _check_fits(self.token_format, self.speech_tokenizer, speech_tokenizer)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)
        self.speech_tokenizer.to(self.device)

    def _sanitize_parameters(self, sampling_rate=None, max_new_tokens=None, generate_kwargs=None, **kwargs):
        preprocess = {"sampling_rate": sampling_rate} if sampling_rate is not None else {}
        forward = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            forward["max_new_tokens"] = max_new_tokens
        if kwargs:
            raise ValueError(f"unknown speech-instruct pipeline options {sorted(kwargs)}; generation options go in "
                             "generate_kwargs={...}")
        return preprocess, forward, {}

    # ------------------------------------------------------------------ steps
    def semantic_tokens(self, audio: Any, sampling_rate: int | None = None) -> str:
        """The token string of one audio input, as the stage-3 model reads it."""
        rate = self.speech_tokenizer.config.sampling_rate
        wave = _waveform(audio, sampling_rate, rate)
        with torch.no_grad():
            out = self.speech_tokenizer.encode([torch.from_numpy(wave)], sampling_rate=rate)
        return self.token_format.render_batch(out.audio_codes.cpu(), out.codes_mask.cpu())[0]

    def prompt(self, tokens: str) -> str | list[dict]:
        """The prompt of the recipe the model was trained with, around ``tokens``."""
        from .recipes.templates import get_template

        if self.recipe.get("recipe") == "asr":
            template = get_template(self.recipe.get("prompt_template") or "spire_asr")
            return template.render(speech=tokens, language=self.recipe.get("language") or "English")[0]
        messages = [{"role": "system", "content": self.recipe["system_prompt"]}] if self.recipe.get(
            "system_prompt") else []
        user = (self.recipe.get("user_template") or "{speech}").format(speech=tokens)
        return [*messages, {"role": "user", "content": user}]

    def preprocess(self, inputs: Any, sampling_rate: int | None = None) -> dict[str, torch.Tensor]:
        prompt = self.prompt(self.semantic_tokens(inputs, sampling_rate))
        if isinstance(prompt, list):
            encoded = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True,
                                                         return_tensors="pt")
        else:
            encoded = self.tokenizer(prompt, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _forward(self, model_inputs: dict[str, torch.Tensor], **generate_kwargs: Any) -> dict[str, torch.Tensor]:
        generate_kwargs = {"max_new_tokens": 256, "do_sample": False, **generate_kwargs}
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        output = self.model.generate(**model_inputs, **generate_kwargs)
        return {"generated": output[:, model_inputs["input_ids"].shape[1]:]}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> dict[str, str]:
        text = self.tokenizer.decode(model_outputs["generated"][0], skip_special_tokens=True)
        return {"generated_text": text.strip()}


def _load_rvq(reference: Any):
    if isinstance(reference, torch.nn.Module):
        return reference.eval()
    from .convert import load_any

    return load_any(os.fspath(reference)).eval()


def _check_fits(fmt, rvq_model, reference) -> None:
    config = rvq_model.config
    if fmt.codebook_size != config.codebook_size or (fmt.num_levels or 1) > config.num_quantizers:
        raise ValueError(
            f"the stage-3 model reads format {fmt.name!r} ({fmt.num_levels} levels x {fmt.codebook_size} codes) but "
            f"the speech tokenizer {reference!s} makes {config.num_quantizers} levels x {config.codebook_size} "
            "codes: pass the stage-1 model the data was tokenized with"
        )


def _waveform(audio: Any, sampling_rate: int | None, target: int) -> np.ndarray:
    """Any supported audio input -> float32 mono at ``target`` Hz (through :func:`gemma_rvq.audio.load_waveform`)."""
    from .audio import load_waveform, source_name

    if isinstance(audio, np.ndarray | torch.Tensor | list) and sampling_rate is None:
        raise ValueError("an array input needs its sampling rate: pipe(array, sampling_rate=16000)")
    return load_waveform(audio, target, sampling_rate=sampling_rate, name=source_name(audio))


def register() -> None:
    """Register the ``speech-instruct`` task with transformers (done when ``gemma_rvq`` is imported)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=SpeechInstructPipeline, pt_model=SpeechLLM,
                                            type="multimodal")
