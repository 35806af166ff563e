"""Stage-2 unit error rate: units generated from text against the units of the same utterance's audio."""

import inspect

import datasets
import evaluate

from gemma_rvq.metrics.functional import unit_error_rate

_DESCRIPTION = """\
Edit distance (substitutions + deletions + insertions) between the units a stage-2 (Speechless) model
generates from an utterance's text and the units stage 1 gives for its audio, divided by the number of
reference units, summed over utterances. A unit is one rendered frame (all levels); the frame-level rate
counts a frame right only when every level matches, the per-level rates compare each level's codes alone.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per utterance, the generated codes [Q, T'] (e.g. SemanticTokenFormat.parse(text).codes).
    references: per utterance, the reference codes [Q, T] (the audio's tokens parsed with the same format).
Returns:
    unit_error_rate: frame-level UER (can exceed 1 with insertions).
    unit_error_rate_per_level: the Q per-level UERs.
    num_reference_units: reference frames counted.
    num_utterances: utterances counted.
Examples:
    >>> metric = evaluate.load("unit_error_rate")
    >>> metric.compute(predictions=[[[1, 2, 3], [5, 5, 5]]], references=[[[1, 2, 4], [5, 5, 6]]])
    {'unit_error_rate': 0.3333333333333333, 'unit_error_rate_per_level': [0.3333333333333333, 0.3333333333333333], 'num_reference_units': 3, 'num_utterances': 1}
"""

_BASE_ARGS = set(inspect.signature(evaluate.EvaluationModule.__init__).parameters) - {"self", "kwargs"}


class UnitErrorRate(evaluate.Metric):
    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - _BASE_ARGS)
        if unknown:
            raise ValueError(f"unit_error_rate takes no options, got {unknown}")
        super().__init__(**kwargs)
        self.info.format = "numpy"

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.List(datasets.List(datasets.Value("int64"))),
                "references": datasets.List(datasets.List(datasets.Value("int64"))),
            }),
            codebase_urls=["https://github.com/gemma-rvq/gemma-rvq"],
        )

    def _compute(self, predictions, references):
        return unit_error_rate(list(predictions), list(references))
