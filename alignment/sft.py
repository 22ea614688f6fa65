"""sft: distilled supervised fine-tuning on teacher-written conversations (TRL SFTTrainer).

usage: smoe-align sft --config recipes/tiny/sft.yaml [--key value ...]

Loss on assistant turns only. Full fine-tuning, or LoRA with `use_peft: true` (TRL ModelConfig keys).
`packing: true` (TRL, best-fit decreasing) or `padding_free: true` puts a batch's conversations in one row
without padding; attention then stays inside each conversation (alignment.models.packing).
"""

import time
from dataclasses import dataclass

from datasets import Dataset
from trl import ModelConfig, SFTConfig, SFTTrainer

from alignment.data import keep_answerable, to_conversation
from alignment.distributed import check_before_loading
from alignment.models.packing import use_packed_attention
from alignment.models.checkpointing import CheckpointingArgs, use_checkpointing_policy
from alignment.models.onednn import MatmulArgs, use_cpu_matmul
from alignment.models.router import MoEArgs, RouterLossMixin, attach_router_losses
from alignment.train_common import DataArgs, check_training_setup, load_student, train_and_save, trainer_refusals


@dataclass
class SFTDataArgs(DataArgs):
    messages_field: str = "messages"  # `chosen` trains on a preference set's chosen conversations


RECIPE_CLASSES = (SFTDataArgs, SFTConfig, ModelConfig, MoEArgs, CheckpointingArgs, MatmulArgs)


class MoESFTTrainer(RouterLossMixin, SFTTrainer):
    """SFTTrainer plus router losses and router health (see alignment.models.router)."""


def conversations(rows: list[dict], field: str, where: str) -> list[dict]:
    return [{"messages": to_conversation(r, field, where, i)} for i, r in enumerate(rows, 1)]


def run(data_args: SFTDataArgs, training_args: SFTConfig, model_args: ModelConfig, moe: MoEArgs, checkpointing: CheckpointingArgs | None = None, matmul: MatmulArgs | None = None):
    started = time.time()
    check_before_loading(training_args, model_args)
    use_cpu_matmul(matmul, training_args, model_args)
    use_checkpointing_policy(training_args, checkpointing, peft=model_args.use_peft)  # refused before the model loads
    train, held_out, where = data_args.rows()
    check_training_setup(training_args, held_out)
    rows = conversations(train, data_args.messages_field, where)
    eval_rows = conversations(held_out, data_args.messages_field, f"{where} (evaluation rows)") if held_out else None
    model, tokenizer, peft_config = load_student(model_args, data_args)
    dataset = Dataset.from_list(keep_answerable(rows, tokenizer, training_args, where, "sft"))
    eval_dataset = Dataset.from_list(keep_answerable(eval_rows, tokenizer, training_args, f"{where} (evaluation rows)", "sft")) if eval_rows else None
    trainer = build_trainer(model, tokenizer, peft_config, training_args, dataset, moe, eval_dataset, checkpointing)
    return train_and_save(trainer, "sft", started, rows=len(dataset), dropped_truncated=len(rows) - len(dataset))


def build_trainer(model, tokenizer, peft_config, training_args: SFTConfig, dataset: Dataset, moe: MoEArgs, eval_dataset: Dataset | None = None, checkpointing: CheckpointingArgs | None = None) -> MoESFTTrainer:
    use_checkpointing_policy(training_args, checkpointing, peft=peft_config is not None)
    with trainer_refusals():
        trainer = MoESFTTrainer(model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config)
    attach_router_losses(trainer, moe, "sft")
    if trainer.padding_free:  # one row of many sequences: SDPA attends within each, not over the whole row
        use_packed_attention(trainer.model)
    return trainer
