"""Cosine similarity of reconstructed frame embeddings, raw and centred by the data mean."""

import inspect

import datasets
import evaluate

from gemma_rvq.metrics.functional import (
    check_pairs,
    reconstruction_metrics,
    reject_unknown_options,
    stack_frames,
)

_DESCRIPTION = """\
Mean over every frame added of cos(x_hat, x) and of the centred cosine cos(x_hat - mu, x - mu), where mu
is the mean of all reference frames added (or the `mean` option). Raw cosine is inflated by the large
constant offset of speech features; the centred cosine is not.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per example, the reconstructed frames [T, D] (valid frames only; lengths may differ).
    references: per example, the original frames [T, D], same shapes as predictions.
    mean (optional, load or compute keyword): centring vector [D]; default the mean of the references.
    eps (optional): cosine epsilon, default 1e-8.
Returns:
    cosine_similarity: mean per-frame cosine, in [-1, 1].
    centred_cosine_similarity: mean per-frame cosine after centring both by mu, in [-1, 1].
    num_frames: frames counted.
Examples:
    >>> metric = evaluate.load("cosine_similarity")
    >>> metric.compute(predictions=[[[1.0, 0.0], [0.0, 1.0]]], references=[[[1.0, 0.0], [1.0, 1.0]]])
    {'cosine_similarity': 0.8535533845424652, 'centred_cosine_similarity': 0.7236067950725555, 'num_frames': 2}
"""

_BASE_ARGS = set(inspect.signature(evaluate.EvaluationModule.__init__).parameters) - {"self", "kwargs"}


class CosineSimilarity(evaluate.Metric):
    def __init__(self, mean=None, eps=1e-8, **kwargs):
        unknown = sorted(set(kwargs) - _BASE_ARGS)
        if unknown:
            raise ValueError(f"cosine_similarity options are `mean` and `eps`, got {unknown}")
        self.mean, self.eps = mean, eps
        super().__init__(**kwargs)
        # Read the stored rows back as numpy arrays, not nested Python lists (~20x faster for [T, D] frames).
        # MetricInfo(format=...) rejects nested features at construction, so it is set afterwards.
        self.info.format = "numpy"

    def _info(self):
        frames = datasets.List(datasets.List(datasets.Value("float32")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": frames, "references": frames}),
            codebase_urls=["https://github.com/gemma-rvq/gemma-rvq"],
        )

    def _compute(self, predictions, references, mean=None, eps=None, **unknown):
        reject_unknown_options("cosine_similarity", unknown, ("mean", "eps"))
        mean = self.mean if mean is None else mean
        eps = self.eps if eps is None else eps
        pred = stack_frames(predictions, name="predictions")
        ref = stack_frames(references, name="references")
        check_pairs(predictions, references)
        out = reconstruction_metrics(pred, ref, mean=mean, eps=eps)
        return {key: out[key] for key in ("cosine_similarity", "centred_cosine_similarity", "num_frames")}
