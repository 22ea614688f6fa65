"""Loading JetMoE (and any causal LM) for training and generation, with the fixes JetMoE needs.

JetMoE declares `supports_gradient_checkpointing = False`, yet its decoder layers are checkpointing
layers and gradients with checkpointing equal those without it (FINDINGS), so the flag is lifted.
Expert banks run through `experts.experts_forward` (grouped matmul). A PEFT adapter directory is loaded
onto its base model and merged, so every later stage sees one model. The base may itself be an adapter
directory (a dDPO adapter trained on a dSFT adapter names it as its base): the chain is merged in order,
and a chain whose base cannot be found is refused rather than loaded in part.
"""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.data import is_hub_id
from alignment.errors import SmoeError
from alignment.models.experts import use_fast_experts
from alignment.models.lora import is_router
from alignment.models.onednn import use_onednn_linears
from alignment.models.quant import dequantize_experts, is_quantized, is_quantized_checkpoint, load_quantized


def _dtype(name: str | None):
    if name in (None, "auto"):
        return "auto"
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise SmoeError(f"unknown dtype {name!r}", "recipe key dtype", "use float32, bfloat16, float16 or auto")
    return getattr(torch, name)


def check_model_path(path: str):
    if not Path(path).exists() and not is_hub_id(path):
        raise SmoeError("model not found", path, "run the stage that writes it first, or fix the path")


def adapter_base(path: str | Path) -> str | None:
    """The base an adapter directory was trained on (a model, a hub id or another adapter), or None for a model."""
    adapter_config = Path(path) / "adapter_config.json"
    if not adapter_config.is_file():
        return None
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base or (not Path(base).exists() and not is_hub_id(base)):
        raise SmoeError(
            f"this adapter was trained on {base!r}, which cannot be found, so it cannot be loaded whole",
            str(path),
            "keep its base (and every adapter it was stacked on) at the recorded path, or set base_model_name_or_path in its adapter_config.json",
        )
    return base


MAX_CHAIN = 16  # adapters stacked on adapters; more than this is a loop in base_model_name_or_path


def chain_too_long(path) -> SmoeError:
    return SmoeError(f"adapter chain longer than {MAX_CHAIN} (a loop?)", str(path), "check base_model_name_or_path in the adapter configs")


def root_model(path: str | Path) -> str:
    """The full model at the bottom of an adapter chain (the path itself for a model)."""
    for _ in range(MAX_CHAIN):
        base = adapter_base(path)
        if base is None:
            return str(path)
        path = base
    raise chain_too_long(path)


def model_type(path: str) -> str | None:
    """The model type of a model directory, hub id or adapter chain (its root model's), None if unreadable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(root_model(path)).model_type
    except (OSError, ValueError):
        return None  # load_causal_lm says what is wrong with the path


def load_causal_lm(path: str, dtype: str | None = None, _depth: int = 0, **kwargs):
    """A model directory, a hub id, or a PEFT adapter directory (merged into its base, chains included)."""
    check_model_path(path)
    try:
        base = adapter_base(path)
        if base is not None and "quantization_config" in kwargs:
            return _merged_then_quantized(path, dtype, _depth, **kwargs)
        if base is not None:
            if _depth >= MAX_CHAIN:
                raise chain_too_long(path)
            from peft import LoraConfig, PeftModel

            from alignment.models.lora import expert_lora_config

            model = load_causal_lm(base, dtype, _depth + 1, **kwargs)
            if is_quantized(model):  # an adapter trained on NF4 experts merges into them dequantised
                dequantize_experts(model)
            config = expert_lora_config(LoraConfig.from_pretrained(path), model)  # expert weights through the grouped path
            model = PeftModel.from_pretrained(model, path, config=config).merge_and_unload()
            for p in model.parameters():  # PEFT froze the base; a full fine-tune of the merged model trains all of it (4-bit weights never train)
                p.requires_grad_(p.is_floating_point())
            model.name_or_path = model.config.name_or_path = str(Path(path).resolve())  # an adapter trained on it records the chain, from any directory
        elif is_quantized_checkpoint(path):
            model = load_quantized(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), **kwargs)
    except (OSError, ValueError) as err:  # ValueError: a directory with no model config transformers knows
        raise SmoeError(f"cannot load the model ({str(err).splitlines()[0]})", path, "point model_name_or_path at a model directory, adapter or hub id") from None
    if getattr(model.config, "output_router_logits", False):
        # TRL saves it switched on after training with its router loss (it sets it again itself when it trains);
        # generating with it fails on padded batches (Mixtral's load-balancing loss against the KV-cache mask)
        model.config.output_router_logits = False
    if model.config.model_type == "jetmoe":
        model.supports_gradient_checkpointing = True
        use_fast_experts()
    return use_onednn_linears(model, leave=is_router)


def _merged_then_quantized(path: str, dtype: str | None, depth: int, quantization_config, **kwargs):
    """An adapter chain in 4-bit: adapters merge into full-precision weights only, so the chain is merged
    first, written to a temporary directory and read back through the 4-bit loader, the same path a model
    directory takes (the merged model is held whole in CPU memory once, and on disk while it is read)."""
    import sys
    import tempfile

    merged = load_causal_lm(path, dtype, depth, **kwargs)
    print(f"note: {path} is an adapter chain: merged, then quantized as it is read back in 4-bit", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="smoe-merged-") as tmp:
        merged.save_pretrained(tmp)
        del merged
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=_dtype(dtype), quantization_config=quantization_config, **kwargs)
    model.name_or_path = model.config.name_or_path = str(Path(path).resolve())
    return model


def load_tokenizer(path: str):
    check_model_path(path)
    while not (Path(path) / "tokenizer_config.json").is_file() and (base := adapter_base(path)) is not None:
        path = base  # an adapter saved without its tokenizer: the one its base has
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SmoeError(f"cannot load the tokenizer ({str(err).splitlines()[0]})", path, "point at a model directory that holds its tokenizer, or a hub id") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
