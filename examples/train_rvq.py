#!/usr/bin/env python
"""Stage 1: train a gemma-rvq residual quantizer on frozen-encoder embeddings of real speech.

    python examples/train_rvq.py --config examples/configs/train_rvq_tiny.yaml          # offline smoke run
    accelerate launch examples/train_rvq.py --config examples/configs/train_rvq_gemma4.yaml  # several GPUs

Every ``RVQTrainingConfig`` field is also a command-line flag (``--batch_size 8192``) and overrides the
YAML file. The run caches the encoder's frame embeddings once (resumable), trains with accelerate,
evaluates on the dev split, and exports ``best``, ``final`` and ``averaged`` ``save_pretrained``
folders with model cards to ``output_dir`` (pushed with ``--push_to_hub --hub_model_id you/name``).
Resume a killed run with ``--resume_from_checkpoint latest``. The parser is the one ``gemma-rvq train``
uses: ``gemma_rvq.commands.train.make_parser``.
"""

from __future__ import annotations

import sys

from gemma_rvq.commands.train import main as train_main
from gemma_rvq.commands.train import make_parser


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (``--config`` and flags), train, and return the exported folders' metrics."""
    (config,) = make_parser(prog="train_rvq.py").parse_args_and_config(argv)
    return train_main(config)


if __name__ == "__main__":
    main(sys.argv[1:])
