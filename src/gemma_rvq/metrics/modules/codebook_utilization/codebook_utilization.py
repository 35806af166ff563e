"""Codebook utilization of an RVQ speech tokenizer, from code counts over everything added."""

import inspect

import datasets
import evaluate

from gemma_rvq.metrics.functional import (
    batch_utilization,
    code_counts,
    codes_input,
    reject_unknown_options,
    stack_codes,
    utilization_from_counts,
)

_DESCRIPTION = """\
Per codebook (RVQ level), the fraction of its codebook_size entries used at least once over all the
codes added (not averaged per batch); then averaged over codebooks. With `batch_frames`, also the
utilization counted per consecutive batch of that many frames (the "per training batch" reading).
"""

_KWARGS_DESCRIPTION = """
Args:
    codes (or predictions): per example, the codes [Q, T] (levels x valid frames; lengths may differ
        between examples). Give them under one name; references are not taken.
    codebook_size (int, load or compute keyword, required): entries per codebook, K.
    batch_frames (int, optional, load or compute keyword): also report `batch_utilization`.
Returns:
    codebook_utilization: mean over levels of (used codes / K), in [0, 1].
    codebook_utilization_per_level: the Q per-level values.
    batch_utilization: (with batch_frames) the same, counted per batch of batch_frames frames and averaged.
    num_frames: frames counted.
Examples:
    >>> metric = evaluate.load("codebook_utilization", codebook_size=4)
    >>> metric.compute(codes=[[[0, 1, 1], [2, 2, 2]]])
    {'codebook_utilization': 0.375, 'codebook_utilization_per_level': [0.5, 0.25], 'num_frames': 3}
"""

_BASE_ARGS = set(inspect.signature(evaluate.EvaluationModule.__init__).parameters) - {"self", "kwargs"}


class CodebookUtilization(evaluate.Metric):
    def __init__(self, codebook_size=None, batch_frames=None, **kwargs):
        unknown = sorted(set(kwargs) - _BASE_ARGS)
        if unknown:
            raise ValueError(
                f"codebook_utilization options are `codebook_size` and `batch_frames`, got {unknown}"
            )
        self.codebook_size, self.batch_frames = codebook_size, batch_frames
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
        return super().add(predictions=codes_input("codebook_utilization", predictions, references, codes), **kwargs)

    def add_batch(self, *, predictions=None, references=None, codes=None, **kwargs):
        """Add a batch of examples' codes, as ``codes=`` or ``predictions=``."""
        return super().add_batch(
            predictions=codes_input("codebook_utilization", predictions, references, codes), **kwargs
        )

    def compute(self, *, predictions=None, references=None, codes=None, **kwargs):
        """Compute the metric over everything added (plus these codes: ``codes=`` or ``predictions=``).

        Options: see below.
        """
        return super().compute(
            predictions=codes_input("codebook_utilization", predictions, references, codes), **kwargs
        )

    def _compute(self, predictions, codebook_size=None, batch_frames=None, **unknown):
        reject_unknown_options("codebook_utilization", unknown, ("codebook_size", "batch_frames"))
        codebook_size = self.codebook_size if codebook_size is None else codebook_size
        batch_frames = self.batch_frames if batch_frames is None else batch_frames
        if codebook_size is None:
            raise ValueError("codebook_utilization needs codebook_size= (at load or compute)")
        codes = stack_codes(predictions)
        counts = code_counts(codes, codebook_size=codebook_size)
        out = {
            "codebook_utilization": utilization_from_counts(counts),
            "codebook_utilization_per_level": utilization_from_counts(counts, per_level=True),
            "num_frames": int(codes.shape[-1]),
        }
        if batch_frames is not None:
            out["batch_utilization"] = batch_utilization(
                codes, codebook_size=codebook_size, batch_frames=batch_frames
            )
        return out
