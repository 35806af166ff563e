"""Codebook perplexity of an RVQ speech tokenizer, from code counts over everything added."""

import inspect

import datasets
import evaluate

from gemma_rvq.metrics.functional import (
    code_counts,
    codes_input,
    perplexity_from_counts,
    pooled_perplexity,
    reject_unknown_options,
    stack_codes,
)

_DESCRIPTION = """\
Per codebook (RVQ level), exp(entropy) (natural log) of its code histogram over all the codes added
(not averaged per batch); then averaged over codebooks. 1 = a single code, K = uniform use of all K codes.
Also `pooled_perplexity`: exp(entropy) of the histogram summed over all levels.
"""

_KWARGS_DESCRIPTION = """
Args:
    codes (or predictions): per example, the codes [Q, T] (levels x valid frames; lengths may differ
        between examples). Give them under one name; references are not taken.
    codebook_size (int, load or compute keyword, required): entries per codebook, K.
Returns:
    codebook_perplexity: mean over levels of exp(-sum_k p_k ln p_k), in [1, K].
    codebook_perplexity_per_level: the Q per-level values.
    pooled_perplexity: exp(entropy) of the counts summed over levels, in [1, K].
    num_frames: frames counted.
Examples:
    >>> metric = evaluate.load("codebook_perplexity", codebook_size=4)
    >>> metric.compute(codes=[[[0, 1, 2, 3], [0, 0, 0, 0]]])
    {'codebook_perplexity': 2.5, 'codebook_perplexity_per_level': [4.0, 1.0], 'pooled_perplexity': 2.9257265599673192, 'num_frames': 4}
"""

_BASE_ARGS = set(inspect.signature(evaluate.EvaluationModule.__init__).parameters) - {"self", "kwargs"}


class CodebookPerplexity(evaluate.Metric):
    def __init__(self, codebook_size=None, **kwargs):
        unknown = sorted(set(kwargs) - _BASE_ARGS)
        if unknown:
            raise ValueError(f"codebook_perplexity's option is `codebook_size`, got {unknown}")
        self.codebook_size = codebook_size
        super().__init__(**kwargs)
        # Read the stored rows back as numpy arrays, not nested Python lists (~20x faster for [T, D] frames).
        # MetricInfo(format=...) rejects nested features at construction, so it is set afterwards.
        self.info.format = "numpy"

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.List(datasets.List(datasets.Value("int64")))}
            ),
            codebase_urls=["https://github.com/gemma-rvq/gemma-rvq"],
        )

    # `codes=` is accepted wherever evaluate takes `predictions=` (the stored column stays `predictions`)
    def add(self, *, predictions=None, references=None, codes=None, **kwargs):
        """Add one example's codes [Q, T], as ``codes=`` or ``predictions=``."""
        return super().add(predictions=codes_input("codebook_perplexity", predictions, references, codes), **kwargs)

    def add_batch(self, *, predictions=None, references=None, codes=None, **kwargs):
        """Add a batch of examples' codes, as ``codes=`` or ``predictions=``."""
        return super().add_batch(
            predictions=codes_input("codebook_perplexity", predictions, references, codes), **kwargs
        )

    def compute(self, *, predictions=None, references=None, codes=None, **kwargs):
        """Compute the metric over everything added (plus these codes: ``codes=`` or ``predictions=``).

        Options: see below.
        """
        return super().compute(
            predictions=codes_input("codebook_perplexity", predictions, references, codes), **kwargs
        )

    def _compute(self, predictions, codebook_size=None, **unknown):
        reject_unknown_options("codebook_perplexity", unknown, ("codebook_size",))
        codebook_size = self.codebook_size if codebook_size is None else codebook_size
        if codebook_size is None:
            raise ValueError("codebook_perplexity needs codebook_size= (at load or compute)")
        codes = stack_codes(predictions)
        counts = code_counts(codes, codebook_size=codebook_size)
        return {
            "codebook_perplexity": perplexity_from_counts(counts),
            "codebook_perplexity_per_level": perplexity_from_counts(counts, per_level=True),
            "pooled_perplexity": pooled_perplexity(counts),
            "num_frames": int(codes.shape[-1]),
        }
