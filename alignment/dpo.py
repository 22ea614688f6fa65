"""dpo: distilled DPO of the dSFT model on the teacher's preferences (TRL DPOTrainer).

usage: smoe-align dpo --config recipes/tiny/dpo.yaml [--key value ...]

Reads ultrafeedback_binarized or TRL preference rows. With LoRA the reference is the base with the
adapter disabled; with full fine-tuning, a frozen copy. `precompute_ref_log_probs: true` runs the reference
once over the data before training, in batches of `precompute_ref_batch_size` (adapters too), and drops it
from every step.
"""

import time
from dataclasses import dataclass

from datasets import Dataset
from trl import DPOConfig, DPOTrainer, ModelConfig

from alignment.data import to_preference
from alignment.models.router import MoEArgs, RouterLossMixin, attach_router_losses
from alignment.train_common import DataArgs, load_student, take_trl_router_coef, train_and_save


@dataclass
class DPODataArgs(DataArgs):
    pass


RECIPE_CLASSES = (DPODataArgs, DPOConfig, ModelConfig, MoEArgs)


class MoEDPOTrainer(RouterLossMixin, DPOTrainer):
    """DPOTrainer plus JetMoE's router losses on the policy's pass (see alignment.models.router)."""


def run(data_args: DPODataArgs, training_args: DPOConfig, model_args: ModelConfig, moe: MoEArgs):
    started = time.time()
    rows, where = data_args.rows()
    dataset = Dataset.from_list([to_preference(r, where, i) for i, r in enumerate(rows, 1)])
    model, tokenizer, peft_config = load_student(model_args, data_args)
    take_trl_router_coef(training_args, moe, model)
    trainer = build_trainer(model, tokenizer, peft_config, training_args, dataset, moe)
    return train_and_save(trainer, "dpo", started, rows=len(dataset))


def build_trainer(model, tokenizer, peft_config, training_args: DPOConfig, dataset: Dataset, moe: MoEArgs) -> MoEDPOTrainer:
    trainer = MoEDPOTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    attach_router_losses(trainer, moe)
    return trainer
