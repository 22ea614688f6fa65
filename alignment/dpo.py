"""dpo: distilled DPO of the dSFT model on the teacher's preferences (TRL DPOTrainer).

usage: smoe-align dpo --config recipes/tiny/dpo.yaml [--key value ...]

Reads ultrafeedback_binarized or TRL preference rows. With LoRA the reference is the base with the
adapter disabled; with full fine-tuning, a frozen copy of the starting model, dSFT adapters merged.
`precompute_ref_log_probs: true` runs the reference once over the data before training, in batches of
`precompute_ref_batch_size` (adapters too), and drops it from every step. Completions end at the
end-of-turn token: what a chat template writes after it (a newline) is not part of the answer and is not trained.
"""

import copy
import time
from dataclasses import dataclass

from datasets import Dataset
from trl import DPOConfig, DPOTrainer, ModelConfig

from alignment.data import keep_answerable, to_preference
from alignment.errors import SmoeError
from alignment.distributed import check_before_loading
from alignment.models.checkpointing import CheckpointingArgs, use_checkpointing_policy
from alignment.models.onednn import MatmulArgs, use_cpu_matmul
from alignment.models.router import MoEArgs, RouterLossMixin, attach_router_losses
from alignment.train_common import DataArgs, check_training_setup, load_student, train_and_save, trainer_refusals


@dataclass
class DPODataArgs(DataArgs):
    pass


RECIPE_CLASSES = (DPODataArgs, DPOConfig, ModelConfig, MoEArgs, CheckpointingArgs, MatmulArgs)


class MoEDPOTrainer(RouterLossMixin, DPOTrainer):
    """DPOTrainer plus router losses and router health on the policy's pass (see alignment.models.router)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        eos = self._tokenizer.eos_token_id
        return dataset.map(lambda row: {key: end_at_eos(row[key], eos) for key in ("chosen_ids", "rejected_ids")})


# the loss types TRL 1.16's DPOTrainer computes (its own list, in the error it raises at the first step)
LOSS_TYPES = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}


def end_at_eos(ids: list[int], eos: int | None) -> list[int]:
    """Token ids up to and including the last end-of-turn token (unchanged when there is none)."""
    if eos is None or eos not in ids:
        return ids
    return ids[: len(ids) - ids[::-1].index(eos)]


def run(data_args: DPODataArgs, training_args: DPOConfig, model_args: ModelConfig, moe: MoEArgs, checkpointing: CheckpointingArgs | None = None, matmul: MatmulArgs | None = None):
    started = time.time()
    check_before_loading(training_args, model_args)
    use_cpu_matmul(matmul, training_args, model_args)
    use_checkpointing_policy(training_args, checkpointing, peft=model_args.use_peft)  # refused before the model loads
    train, held_out, where = data_args.rows()
    check_training_setup(training_args, held_out)
    rows = [to_preference(r, where, i) for i, r in enumerate(train, 1)]
    eval_rows = [to_preference(r, f"{where} (evaluation rows)", i) for i, r in enumerate(held_out, 1)] if held_out else None
    model, tokenizer, peft_config = load_student(model_args, data_args)
    dataset = Dataset.from_list(keep_answerable(rows, tokenizer, training_args, where, "dpo"))
    eval_dataset = Dataset.from_list(keep_answerable(eval_rows, tokenizer, training_args, f"{where} (evaluation rows)", "dpo")) if eval_rows else None
    trainer = build_trainer(model, tokenizer, peft_config, training_args, dataset, moe, eval_dataset, checkpointing)
    return train_and_save(trainer, "dpo", started, rows=len(dataset), dropped_truncated=len(rows) - len(dataset))


def build_trainer(model, tokenizer, peft_config, training_args: DPOConfig, dataset: Dataset, moe: MoEArgs, eval_dataset: Dataset | None = None, checkpointing: CheckpointingArgs | None = None) -> MoEDPOTrainer:
    # TRL would reload the reference from the path in the model's config, which for a merged adapter is not this model
    unknown = [t for t in training_args.loss_type if t not in LOSS_TYPES]
    if unknown:  # TRL finds out only at the first step
        raise SmoeError(f"unknown loss_type {unknown}", "recipe key loss_type", f"use some of {sorted(LOSS_TYPES)}")
    needs_reference = peft_config is None and not training_args.precompute_ref_log_probs
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if needs_reference else None
    use_checkpointing_policy(training_args, checkpointing, peft=peft_config is not None)
    with trainer_refusals():
        trainer = MoEDPOTrainer(model=model, ref_model=ref_model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config)
    attach_router_losses(trainer, moe, "dpo")
    return trainer
