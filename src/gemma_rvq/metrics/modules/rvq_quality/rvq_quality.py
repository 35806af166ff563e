"""Every RVQ quality metric at once: reconstruction (MSE, NMSE, FVU, cosines) and codebook use."""

import inspect

import datasets
import evaluate
import numpy as np

from gemma_rvq.metrics.functional import (
    batch_utilization,
    check_pairs,
    code_counts,
    code_metrics_from_counts,
    reconstruction_metrics,
    reject_unknown_options,
    stack_codes,
    stack_frames,
)

_DESCRIPTION = """\
Reconstruction quality and codebook use of an RVQ speech tokenizer over everything added:
mse, nmse, fvu, cosine_similarity, centred_cosine_similarity (centred by the mean of the references, or
the `mean` option),
and per codebook utilization and perplexity (exp of the natural-log entropy) from the code counts of all
frames, averaged over codebooks, plus per-level lists and the pooled perplexity.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per example, the reconstructed frames [T, D].
    references: per example, the original frames [T, D], same shapes as predictions.
    codes: per example, the codes [Q, T] of the same frames.
    codebook_size (int, load or compute keyword, required): entries per codebook, K.
    batch_frames (int, optional, load or compute keyword): also report `batch_utilization` per batch of that
        many frames.
    mean (optional, load or compute keyword): centring vector [D] of the centred cosine; default the mean
        of the references.
    eps (optional, load or compute keyword): cosine epsilon, default 1e-8.
Returns:
    mse, nmse, fvu, cosine_similarity, centred_cosine_similarity, num_frames, codebook_utilization,
    codebook_perplexity, codebook_utilization_per_level, codebook_perplexity_per_level,
    pooled_perplexity, num_code_frames (and batch_utilization).
Examples:
    >>> metric = evaluate.load("rvq_quality", codebook_size=2)
    >>> out = metric.compute(predictions=[[[1.0, 0.0], [0.0, 1.0]]], references=[[[1.0, 0.0], [0.0, 2.0]]],
    ...                      codes=[[[0, 1]]])
    >>> out["mse"], out["codebook_perplexity"]
    (0.25, 2.0)
"""

_BASE_ARGS = set(inspect.signature(evaluate.EvaluationModule.__init__).parameters) - {"self", "kwargs"}


class RvqQuality(evaluate.Metric):
    def __init__(self, codebook_size=None, batch_frames=None, mean=None, eps=1e-8, **kwargs):
        unknown = sorted(set(kwargs) - _BASE_ARGS)
        if unknown:
            raise ValueError(
                f"rvq_quality options are `codebook_size`, `batch_frames`, `mean` and `eps`, got {unknown}"
            )
        self.codebook_size, self.batch_frames = codebook_size, batch_frames
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
            features=datasets.Features(
                {
                    "predictions": frames,
                    "references": frames,
                    "codes": datasets.List(datasets.List(datasets.Value("int64"))),
                }
            ),
            codebase_urls=["https://github.com/gemma-rvq/gemma-rvq"],
        )

    def _compute(
        self, predictions, references, codes, codebook_size=None, batch_frames=None, mean=None, eps=None, **unknown
    ):
        reject_unknown_options("rvq_quality", unknown, ("codebook_size", "batch_frames", "mean", "eps"))
        codebook_size = self.codebook_size if codebook_size is None else codebook_size
        batch_frames = self.batch_frames if batch_frames is None else batch_frames
        mean = self.mean if mean is None else mean
        eps = self.eps if eps is None else eps
        if codebook_size is None:
            raise ValueError("rvq_quality needs codebook_size= (at load or compute)")
        pred = stack_frames(predictions, name="predictions")
        ref = stack_frames(references, name="references")
        check_pairs(predictions, references)
        flat_codes = stack_codes(codes, name="codes")
        for i, (c, r) in enumerate(zip(codes, references)):
            if np.shape(c)[-1] != len(r):
                raise ValueError(f"row {i}: codes cover {np.shape(c)[-1]} frames, references {len(r)}")
        out = reconstruction_metrics(pred, ref, mean=mean, eps=eps)
        out.update(code_metrics_from_counts(code_counts(flat_codes, codebook_size=codebook_size)))
        if batch_frames is not None:
            out["batch_utilization"] = batch_utilization(
                flat_codes, codebook_size=codebook_size, batch_frames=batch_frames
            )
        return out
