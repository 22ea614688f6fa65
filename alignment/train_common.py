"""What the sft and dpo stages share: training data, model set-up, resuming, and the manifest after training."""

import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from trl import ModelConfig, get_peft_config

from alignment.data import read_mixture, read_rows
from alignment.distributed import check_launch, describe, prepare_final_save
from alignment.errors import SmoeError
from alignment.manifest import is_main_process, write_manifest
from alignment.models.jetmoe import load_causal_lm, load_tokenizer, model_type
from alignment.models.lora import expert_lora_config, lora_targets
from alignment.models.quant import is_quantized, quantize_experts, usable_bitsandbytes


@dataclass
class DataArgs:
    """Where the training rows come from: one dataset, or an alignment-handbook mixture; and the eval rows."""

    dataset_path: str = ""
    dataset_mixture: dict | None = None  # {datasets: [{id, config, split, columns, weight}], test_split_size, seed}
    dataset_mixer: dict | None = None  # the older handbook form, {id: weight}, with dataset_splits
    dataset_splits: list | None = None  # train splits, and test splits (their names hold "test") for evaluation
    eval_dataset_path: str = ""  # evaluation rows from their own dataset
    chat_template: str | None = None  # replaces the tokenizer's template
    max_train_samples: int | None = None

    def rows(self) -> tuple[list[dict], list[dict], str]:
        """(training rows, evaluation rows, where they came from, for error messages)."""
        if self.dataset_mixer:
            splits = self.dataset_splits or [None]
            mixture = lambda names: {"datasets": [{"id": k, "weight": w, "split": s} for k, w in self.dataset_mixer.items() for s in names]}  # noqa: E731
            train = read_mixture(mixture([s for s in splits if s is None or "test" not in s]), "dataset_mixer")
            test = [s for s in splits if s is not None and "test" in s]
            held_out = read_mixture(mixture(test), "dataset_mixer") if test else []
            where = "dataset_mixer"
        elif self.dataset_mixture:
            train, held_out = hold_out(read_mixture(self.dataset_mixture, "dataset_mixture"), self.dataset_mixture.get("test_split_size"))
            where = "dataset_mixture"
        elif self.dataset_path:
            train, held_out, where = read_rows(self.dataset_path), [], self.dataset_path
        else:
            raise SmoeError("no training data", "recipe", "set dataset_path, or dataset_mixture as in alignment-handbook")
        if self.eval_dataset_path:
            held_out = read_rows(self.eval_dataset_path)
        return train[: self.max_train_samples], held_out, where


def hold_out(rows: list[dict], size: int | float | None) -> tuple[list[dict], list[dict]]:
    """alignment-handbook's `test_split_size`: a count, or a fraction below 1, of the (shuffled) rows kept for evaluation."""
    if not size:
        return rows, []
    count = int(size) if size >= 1 else round(size * len(rows))
    if not 0 < count < len(rows):
        raise SmoeError(f"test_split_size {size} leaves no training or no evaluation rows out of {len(rows)}", "dataset_mixture", "choose a count between 1 and the number of rows, or a fraction")
    return rows[count:], rows[:count]


@contextmanager
def trainer_refusals():
    """What TRL, transformers or PEFT refuse while building a trainer from the recipe (a setting that needs
    another, a chat template that does not parse, LoRA targets that match nothing) as our error."""
    from jinja2 import TemplateError

    try:
        yield
    except (ValueError, TypeError, KeyError, TemplateError) as err:
        raise SmoeError(f"the trainer refused this recipe: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else err!r}", "recipe", "change the key the message names (`smoe-align <stage> --help` lists the keys)") from None


def check_training_setup(training_args, held_out: list[dict]):
    """What the recipe asks of the run that this machine or the data cannot give: the hub, evaluation rows."""
    if training_args.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise SmoeError("push_to_hub is set but the hub is offline here (HF_HUB_OFFLINE)", "recipe key push_to_hub", "set push_to_hub: false, or unset HF_HUB_OFFLINE where the hub is reachable")
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)  # an enum once parsed
    if strategy != "no" and not held_out:
        raise SmoeError(
            f"eval_strategy is {strategy} but there are no evaluation rows",
            "recipe key eval_strategy",
            "set dataset_mixture.test_split_size, test splits in dataset_splits, or eval_dataset_path; or eval_strategy: no",
        )


def load_student(model_args: ModelConfig, data_args: DataArgs):
    path, peft_config = model_args.model_name_or_path, get_peft_config(model_args)
    if model_args.load_in_4bit and peft_config is None:
        raise SmoeError("4-bit weights train adapters only", "recipe key load_in_4bit", "set use_peft: true with lora_target_modules")
    if model_args.load_in_4bit:
        usable_bitsandbytes()  # before the model loads: a missing or unusable package is reported at once
    if model_args.dtype == "float16" and not torch.cuda.is_available():
        raise SmoeError("float16 weights do not train on the CPU (autocast there is bfloat16 only)", "recipe key dtype (torch_dtype)", "use bfloat16 or float32 on the CPU")
    extra = {}
    if model_args.load_in_4bit and model_type(path) != "jetmoe":
        extra["quantization_config"] = linear_4bit_config(model_args, path)
    model = load_causal_lm(path, model_args.dtype, attn_implementation=model_args.attn_implementation, **extra)
    if peft_config is not None:  # expert weights adapted per expert (JetMoE banks, fused experts); all-linear resolved for MoEs
        expert_lora_config(peft_config, model)
        print(f"LoRA targets: {lora_targets(peft_config)}", file=sys.stderr)
    if is_quantized(model) and peft_config is None:  # a checkpoint saved by `smoe-align quantize`
        raise SmoeError("4-bit expert banks train adapters only", f"model_name_or_path {path} (a 4-bit model)", "set use_peft: true with lora_target_modules")
    if model.config.model_type == "jetmoe":
        if model_args.load_in_4bit and not is_quantized(model):  # QLoRA: the expert banks in NF4 (stock 4-bit loading leaves them untouched)
            quantize_experts(model, compute_dtype=model.dtype)
    tokenizer = load_tokenizer(path)
    if data_args.chat_template:
        tokenizer.chat_template = data_args.chat_template
        check_chat_template(tokenizer)
    return model, tokenizer, peft_config


def check_chat_template(tokenizer):
    from jinja2 import TemplateError

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False)
    except TemplateError as err:
        raise SmoeError(f"chat_template does not render ({type(err).__name__}: {err})", "recipe key chat_template", "fix the Jinja template, or drop the key to keep the tokenizer's own") from None


# kept in the model's dtype by 4-bit loading (transformers' rule: a suffix, or a name from the start); estimate-memory reads it too
LINEAR_4BIT_SKIP = ["gate", "router", "lm_head"]


def linear_4bit_config(model_args: ModelConfig, path: str):
    """transformers' own 4-bit loading (NF4 nn.Linear layers) for models without JetMoE expert banks;
    routers and lm_head stay in full precision. Its quantizer also takes 3-D fused expert weights (not nn.Linear) to NF4 as they load."""
    from alignment.models.fused_4bit import Fused4bitConfig

    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "bfloat16"
    print(f"note: load_in_4bit quantizes the nn.Linear layers of {path} to {model_args.bnb_4bit_quant_type}; routers and lm_head keep {dtype}; fused 3-D experts go to NF4 per expert as they load, double-quantised{'' if model_args.use_bnb_nested_quant else ' (use_bnb_nested_quant applies to the nn.Linear layers only)'}", file=sys.stderr)
    return Fused4bitConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
        llm_int8_skip_modules=list(LINEAR_4BIT_SKIP),
    )


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint written to its end: trainer_state.json is the last file the trainer writes into
    one. Those cut off while being written are removed, so that neither resuming nor rotation picks them."""
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for checkpoint in reversed(checkpoints):
        if (checkpoint / "trainer_state.json").is_file():
            return str(checkpoint)
        if is_main_process():
            print(f"[resume] {checkpoint} was cut off while being written; removing it", file=sys.stderr)
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def train_and_save(trainer, stage: str, started: float, **info):
    """Resume from the newest checkpoint if a run was cut off, then save the model and the manifest."""
    output_dir = trainer.args.output_dir
    check_launch(trainer)
    if hasattr(trainer.model, "peft_config"):
        info["lora_targets"] = lora_targets(trainer.model.peft_config["default"])
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(output_dir))
    prepare_final_save(trainer)
    trainer.save_model(output_dir)
    logs = trainer.state.log_history
    if trainer.is_world_process_zero():  # under torchrun / accelerate every rank runs this
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
        write_manifest(output_dir, stage, started, log_history=logs, global_step=trainer.state.global_step, world_size=trainer.args.world_size, **describe(trainer), **info)
    return logs
