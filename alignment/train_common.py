"""What the sft and dpo stages share: training data, model set-up, resuming, and the manifest after training."""

from dataclasses import dataclass

from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, get_peft_config

from alignment.data import read_mixture, read_rows
from alignment.distributed import check_launch, describe, prepare_final_save
from alignment.errors import SmoeError
from alignment.manifest import write_manifest
from alignment.models.jetmoe import load_causal_lm, load_tokenizer
from alignment.models.lora import expert_lora_config
from alignment.models.quant import quantize_experts


@dataclass
class DataArgs:
    """Where the training rows come from: one dataset, or an alignment-handbook mixture."""

    dataset_path: str = ""
    dataset_mixture: dict | None = None  # {datasets: [{id, split, columns, weight}], seed}
    dataset_mixer: dict | None = None  # the older handbook form, {id: weight}, with dataset_splits
    dataset_splits: list | None = None
    chat_template: str | None = None  # replaces the tokenizer's template
    max_train_samples: int | None = None

    def rows(self) -> tuple[list[dict], str]:
        """(rows, where they came from, for error messages)."""
        if self.dataset_mixer:
            split = (self.dataset_splits or [None])[0]
            mixture = {"datasets": [{"id": k, "weight": w, "split": split} for k, w in self.dataset_mixer.items()]}
            return read_mixture(mixture, "dataset_mixer")[: self.max_train_samples], "dataset_mixer"
        if self.dataset_mixture:
            return read_mixture(self.dataset_mixture, "dataset_mixture")[: self.max_train_samples], "dataset_mixture"
        if not self.dataset_path:
            raise SmoeError("no training data", "recipe", "set dataset_path, or dataset_mixture as in alignment-handbook")
        return read_rows(self.dataset_path)[: self.max_train_samples], self.dataset_path


def load_student(model_args: ModelConfig, data_args: DataArgs):
    model = load_causal_lm(model_args.model_name_or_path, model_args.dtype, attn_implementation=model_args.attn_implementation)
    peft_config = get_peft_config(model_args)
    if model.config.model_type == "jetmoe":
        if peft_config is not None:
            expert_lora_config(peft_config)  # lora_target_modules may name the expert banks: input_linear, output_linear
        if model_args.load_in_4bit:  # QLoRA: the expert banks in NF4 (stock 4-bit loading leaves them untouched)
            if peft_config is None:
                raise SmoeError("load_in_4bit trains adapters only", "recipe", "set use_peft: true with lora_target_modules")
            quantize_experts(model, compute_dtype=model.dtype)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    if data_args.chat_template:
        tokenizer.chat_template = data_args.chat_template
    return model, tokenizer, peft_config


def take_trl_router_coef(training_args, moe, model):
    """TRL's `router_aux_loss_coef` crashes inside JetMoE: for JetMoE it becomes our load-balancing loss."""
    if model.config.model_type == "jetmoe" and training_args.router_aux_loss_coef:
        moe.moe_aux_loss_coef = moe.moe_aux_loss_coef or training_args.router_aux_loss_coef
        training_args.router_aux_loss_coef = None


def train_and_save(trainer, stage: str, started: float, **info):
    """Resume from the newest checkpoint if a run was cut off, then save the model and the manifest."""
    output_dir = trainer.args.output_dir
    check_launch(trainer)
    trainer.train(resume_from_checkpoint=get_last_checkpoint(output_dir))
    prepare_final_save(trainer)
    trainer.save_model(output_dir)
    logs = trainer.state.log_history
    if trainer.is_world_process_zero():  # under torchrun / accelerate every rank runs this
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
        write_manifest(output_dir, stage, started, log_history=logs, global_step=trainer.state.global_step, world_size=trainer.args.world_size, **describe(trainer), **info)
    return logs
