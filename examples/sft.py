"""Supervised fine-tuning for the gemma-rvq recipes (stage 2 Speechless, stage 3 speech instructions, ASR), and
continued pretraining on packed speech/text documents (``--recipe cpt``, see docs/continued-pretraining.md).

Single process:

    python examples/sft.py --config examples/recipes/speechless_llama3.2_1b.yaml

Several GPUs (DDP), or DeepSpeed / FSDP with an accelerate config file (see docs/scaling.md):

    accelerate launch --num_processes 8 examples/sft.py --config examples/recipes/speechless_llama3.2_1b.yaml
    accelerate launch --config_file examples/recipes/accelerate_deepspeed_zero3.yaml examples/sft.py --config ...

Arguments: ``gemma_rvq.recipes.SemanticSFTArguments`` (recipe, dataset, token format, columns, templates),
``trl.SFTConfig`` (training) and ``trl.ModelConfig`` (model, LoRA). Any of them can be set in the YAML
file and overridden on the command line. The logic lives in ``gemma_rvq.recipes.run_sft``.
"""

from __future__ import annotations

from trl import ModelConfig, SFTConfig, TrlParser

from gemma_rvq.recipes import SemanticSFTArguments, run_sft


def main(script_args: SemanticSFTArguments, training_args: SFTConfig, model_args: ModelConfig):
    """Train with the recipe named by ``script_args.recipe``; returns the trainer (after saving)."""
    trainer = run_sft(script_args, training_args, model_args)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    return trainer


def make_parser() -> TrlParser:
    return TrlParser((SemanticSFTArguments, SFTConfig, ModelConfig))


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
