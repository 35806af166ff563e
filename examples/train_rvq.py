#!/usr/bin/env python
"""Stage 1: train a gemma-rvq residual quantizer on frozen-encoder embeddings of real speech.

    python examples/train_rvq.py --config examples/configs/train_rvq_tiny.yaml          # offline smoke run
    accelerate launch examples/train_rvq.py --config examples/configs/train_rvq_gemma4.yaml  # several GPUs

Every ``RVQTrainingConfig`` field is also a command-line flag (``--batch_size 8192``) and overrides the
YAML file. The run caches the encoder's frame embeddings once (resumable), trains with accelerate,
evaluates on the dev split, and exports ``best``, ``final`` and ``averaged`` ``save_pretrained``
folders with model cards to ``output_dir`` (pushed with ``--push_to_hub --hub_model_id you/name``).
Resume a killed run with ``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import json
import sys

from gemma_rvq.training import parse_args, train_rvq


def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    result = train_rvq(config)
    summary = {
        name: {split: {k: m[split][k] for k in ("mse", "fvu", "cosine_similarity", "codebook_utilization",
                                                 "codebook_perplexity") if k in m[split]} for split in m}
        for name, m in result.metrics.items()
    }
    if summary:
        print(json.dumps({"steps": result.steps, "folders": result.folders, "metrics": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
