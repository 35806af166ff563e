"""Layer-aligned distillation (TinyWave) of a speech-token LM into a shallower student.

Single process:

    python examples/distill.py --config examples/recipes/tiny_distill.yaml \
        --teacher_model_name_or_path <stage-3 folder> --dataset_name <stage-3 data> --output_dir student

Several GPUs (DDP), or DeepSpeed / FSDP with an accelerate config file (see docs/scaling.md):

    accelerate launch --num_processes 8 examples/distill.py --config my_distill.yaml

Arguments: ``gemma_rvq.recipes.distill.DistillArguments`` (teacher, student, and the data arguments of
``examples/sft.py``) and ``gemma_rvq.recipes.distill.LayerDistillationConfig`` (``trl.SFTConfig`` plus
``ce_weight``, ``kl_weight``, ``hidden_weight``, ``attention_weight``, ``temperature``). Any of them can be set
in the YAML file and overridden on the command line. ``--transfer_dataset_name PROMPTS`` adds a transfer set of
unlabelled prompts that the teacher answers before training (``transfer_ce_weight``, ``transfer_max_new_tokens``). The logic lives in ``gemma_rvq.recipes.distill.run_distill``;
see docs/distillation.md.
"""

from __future__ import annotations

from trl import TrlParser

from gemma_rvq.recipes.distill import DistillArguments, LayerDistillationConfig, run_distill


def main(script_args: DistillArguments, training_args: LayerDistillationConfig):
    """Distil ``script_args.teacher_model_name_or_path`` into a student; returns the trainer (after saving)."""
    trainer = run_distill(script_args, training_args)
    trainer.accelerator.print(f"Student saved to {training_args.output_dir}")
    return trainer


def make_parser() -> TrlParser:
    return TrlParser((DistillArguments, LayerDistillationConfig))


if __name__ == "__main__":
    script_args, training_args = make_parser().parse_args_and_config()
    main(script_args, training_args)
