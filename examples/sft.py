"""Supervised fine-tuning for the gemma-rvq recipes (stage 2 Speechless, stage 3 speech instructions, ASR), and
continued pretraining on packed speech/text documents (``--recipe cpt``, see docs/continued-pretraining.md).

Single process (or ``gemma-rvq sft --config ...``, the same parser):

    python examples/sft.py --config examples/recipes/speechless_llama3.2_1b.yaml

Several GPUs (DDP), or DeepSpeed / FSDP with an accelerate config file (see docs/scaling.md):

    accelerate launch --num_processes 8 examples/sft.py --config examples/recipes/speechless_llama3.2_1b.yaml
    accelerate launch --config_file examples/recipes/accelerate_deepspeed_zero3.yaml examples/sft.py --config ...

Arguments: ``gemma_rvq.recipes.SemanticSFTArguments`` (recipe, dataset, token format, columns, templates),
``trl.SFTConfig`` (training) and ``trl.ModelConfig`` (model, LoRA). Any of them can be set in the YAML
file and overridden on the command line. The parser and ``main`` live in ``gemma_rvq.commands.sft``; the
logic in ``gemma_rvq.recipes.run_sft``.
"""

from __future__ import annotations

from gemma_rvq.commands.sft import main, make_parser

__all__ = ["main", "make_parser"]

if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
