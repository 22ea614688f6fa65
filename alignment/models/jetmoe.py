"""Loading JetMoE (and any causal LM) for training and generation, with the fixes JetMoE needs.

JetMoE declares `supports_gradient_checkpointing = False`, yet its decoder layers are checkpointing
layers and gradients with checkpointing equal those without it (FINDINGS), so the flag is lifted.
Expert banks run through `experts.experts_forward` (grouped matmul). A PEFT adapter directory is loaded onto its base model and merged, so every later stage sees one model.
"""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.data import is_hub_id
from alignment.errors import SmoeError
from alignment.models.experts import use_fast_experts


def _dtype(name: str | None):
    if name in (None, "auto"):
        return "auto"
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise SmoeError(f"unknown dtype {name!r}", "recipe key dtype", "use float32, bfloat16, float16 or auto")
    return getattr(torch, name)


def check_model_path(path: str):
    if not Path(path).exists() and not is_hub_id(path):
        raise SmoeError("model not found", path, "run the stage that writes it first, or fix the path")


def load_causal_lm(path: str, dtype: str | None = None, **kwargs):
    """A model directory, a hub id, or a PEFT adapter directory (merged into its base)."""
    check_model_path(path)
    adapter_config = Path(path) / "adapter_config.json"
    try:
        if adapter_config.is_file():
            from peft import LoraConfig, PeftModel

            from alignment.models.lora import expert_lora_config

            base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
            model = AutoModelForCausalLM.from_pretrained(base, dtype=_dtype(dtype), **kwargs)
            config = LoraConfig.from_pretrained(path)
            if model.config.model_type == "jetmoe":
                expert_lora_config(config)
            model = PeftModel.from_pretrained(model, path, config=config).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), **kwargs)
    except OSError as err:
        raise SmoeError(f"cannot load the model ({err})", path, "point model_name_or_path at a model directory, adapter or hub id") from None
    if model.config.model_type == "jetmoe":
        model.supports_gradient_checkpointing = True
        use_fast_experts()
    return model


def load_tokenizer(path: str):
    check_model_path(path)
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file() and not (Path(path) / "tokenizer_config.json").is_file():
        path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise SmoeError(f"cannot load the tokenizer ({err})", path, "point at a model directory that holds its tokenizer, or a hub id") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
