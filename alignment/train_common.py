"""What the sft and dpo stages share: model set-up, resuming, and the manifest after training."""


from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, get_peft_config

from alignment.manifest import write_manifest
from alignment.models.jetmoe import load_causal_lm, load_tokenizer
from alignment.errors import SmoeError
from alignment.models.lora import expert_lora_config
from alignment.models.quant import quantize_experts


def load_student(model_args: ModelConfig):
    model = load_causal_lm(model_args.model_name_or_path, model_args.dtype, attn_implementation=model_args.attn_implementation)
    peft_config = get_peft_config(model_args)
    if model.config.model_type == "jetmoe":
        if peft_config is not None:
            expert_lora_config(peft_config)  # lora_target_modules may name the expert banks: input_linear, output_linear
        if model_args.load_in_4bit:  # QLoRA: the expert banks in NF4 (stock 4-bit loading leaves them untouched)
            if peft_config is None:
                raise SmoeError("load_in_4bit trains adapters only", "recipe", "set use_peft: true with lora_target_modules")
            quantize_experts(model, compute_dtype=model.dtype)
    return model, load_tokenizer(model_args.model_name_or_path), peft_config


def take_trl_router_coef(training_args, moe, model):
    """TRL's `router_aux_loss_coef` crashes inside JetMoE: for JetMoE it becomes our load-balancing loss."""
    if model.config.model_type == "jetmoe" and training_args.router_aux_loss_coef:
        moe.moe_aux_loss_coef = moe.moe_aux_loss_coef or training_args.router_aux_loss_coef
        training_args.router_aux_loss_coef = None


def train_and_save(trainer, stage: str, started: float, **info):
    """Resume from the newest checkpoint if a run was cut off, then save the model and the manifest."""
    output_dir = trainer.args.output_dir
    trainer.train(resume_from_checkpoint=get_last_checkpoint(output_dir))
    trainer.save_model(output_dir)
    logs = trainer.state.log_history
    if trainer.is_world_process_zero():  # under torchrun / accelerate every rank runs this
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
        write_manifest(output_dir, stage, started, log_history=logs, global_step=trainer.state.global_step, world_size=trainer.args.world_size, **info)
    return logs
