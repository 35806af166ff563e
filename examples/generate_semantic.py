"""Turn text into semantic tokens with a stage-2 (Speechless) model: text-only data -> stage-3 training data.

Single process (or ``gemma-rvq generate ...``, the same parser):

    python examples/generate_semantic.py --model_name_or_path out/speechless \\
        --dataset_name my-org/instructions-sw --text_column instruction --output_dir data/instructions-sw-tokens

Across GPUs (rows are split between processes and gathered; the main process writes the dataset):

    accelerate launch --num_processes 8 examples/generate_semantic.py --model_name_or_path ... (same arguments)

The arguments (``GenerateSemanticArguments``), the parser and ``main`` live in ``gemma_rvq.commands.generate``.
"""

from __future__ import annotations

from gemma_rvq.commands.generate import GenerateSemanticArguments, main, make_parser

__all__ = ["GenerateSemanticArguments", "main", "make_parser"]

if __name__ == "__main__":
    (arguments,) = make_parser().parse_args_and_config()
    main(arguments)
