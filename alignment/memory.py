"""estimate-memory: predicted peak training memory of a recipe for full fine-tuning, LoRA and QLoRA.

usage: smoe-align estimate-memory --config recipes/jetmoe-8b/sft/qlora.yaml [--key value ...]

Parameter counts are exact (the model is built on the meta device from its config). The rest is a
model of what training keeps in memory, per GiB:
  weights      bf16 (2 B); QLoRA: expert banks in NF4 with double quantisation (4.13 bits, FINDINGS),
               everything else bf16
  trainable    full: bf16 weights' gradients (2 B) + AdamW moments in fp32 (8 B) per parameter, and for
               DPO a frozen bf16 reference copy unless its log-probs are precomputed;
               LoRA / QLoRA: fp32 adapters (4 B) + fp32 gradients (4 B) + AdamW (8 B) per adapter parameter
  activations  with checkpointing: every layer's input (hidden x 2 B per token) + one layer recomputed in
               full + the logits in fp32 (two copies: logits and their gradient); without it, every
               layer in full. DPO runs chosen and rejected together: twice the tokens.
The total predicts `torch.cuda.max_memory_allocated`; what `nvidia-smi` shows adds the allocator's
reserve and the CUDA context, given as `with_margin` (10% more plus 0.5 GiB).
Checked on an H100 (bench/memory_gpu.py): JetMoE-8B, 24 layers, bf16, checkpointing, SDPA, sequence
2048: activations measured 1.01 GiB (batch 1) and 1.95 GiB (batch 2) against 0.98 and 1.96 predicted.
One layer's activations are an upper bound on what its backward holds at once: the attention and MLP
expert inputs and outputs for top-k routed copies of each token, queries, keys, values, the SDPA output
and log-sum-exp, norms and residuals.
"""

from dataclasses import dataclass

import torch

from alignment.errors import SmoeError
from alignment.models.jetmoe import root_model

GIB = 1024**3
NF4_BITS = 4.13
# JetMoE-8B, known here so that estimates need no download (transformers' JetMoeConfig() has 12 layers)
JETMOE_8B = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_key_value_heads=16, kv_channels=128, intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=True)


def model_config(name: str, overrides: dict):
    from transformers import AutoConfig, JetMoeConfig

    if "jetmoe-8b" in name.lower():
        return JetMoeConfig(**{**JETMOE_8B, **overrides})
    name = root_model(name)  # an adapter directory (or chain): the architecture is its base model's
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError:
        raise SmoeError(f"cannot read the model config of {name}", "estimate-memory", "point model_name_or_path at a local model directory") from None
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def parameter_counts(config) -> dict:
    """Exact counts by kind: expert banks (3-D weights), everything else, and per-expert-bank shapes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = {"experts": 0, "dense": 0, "banks": []}
    for name, p in model.named_parameters():
        if p.dim() == 3:
            counts["experts"] += p.numel()
            counts["banks"].append(tuple(p.shape))  # [E, out, in]
        else:
            counts["dense"] += p.numel()
    return counts


def lora_parameters(counts: dict, config, rank: int) -> int:
    """Rank `rank` per expert on every expert bank, and on each layer's key-value projection."""
    experts = sum(e * rank * (out + inp) for e, out, inp in counts["banks"])
    kv = config.num_hidden_layers * rank * (config.hidden_size + 2 * config.num_key_value_heads * config.kv_channels)
    return experts + kv


def layer_activation_bytes(config, tokens: int) -> int:
    """What one JetMoE layer's backward holds at once, bf16, per `tokens` (an upper bound)."""
    h, k = config.hidden_size, config.num_experts_per_tok
    attn = config.num_key_value_heads * config.kv_channels
    per_token = (
        6 * h  # norms' inputs and outputs, residual stream
        + 2 * config.num_local_experts  # router logits and probabilities (fp32 counted as two bf16)
        + k * (h + attn)  # attention expert inputs (top-k copies) and query outputs
        + 2 * attn  # keys and values
        + k * (2 * attn + h)  # SDPA output, log-sum-exp slack, output-expert outputs
        + k * (h + 3 * config.intermediate_size + h)  # MLP expert inputs, GLU (2x width) and product, outputs
    )
    return 2 * per_token * tokens


def estimate(config, counts: dict, method: str, stage: str, seq_len: int, batch: int, checkpointing: bool, rank: int, precomputed_reference: bool = False) -> dict:
    tokens = seq_len * batch * (2 if stage == "dpo" else 1)
    total_params = counts["experts"] + counts["dense"]
    if method == "qlora":
        weights = counts["experts"] * NF4_BITS / 8 + counts["dense"] * 2
    else:
        weights = total_params * 2
    if method == "full":
        trainable, gradients, optimizer = total_params, total_params * 2, total_params * 8
        if stage == "dpo" and not precomputed_reference:
            weights += total_params * 2  # a frozen reference copy; LoRA disables its adapter instead
    else:
        trainable = lora_parameters(counts, config, rank)
        gradients, optimizer = trainable * 4, trainable * 8
        weights += trainable * 4
    layer = layer_activation_bytes(config, tokens)
    logits = 2 * tokens * config.vocab_size * 4
    if checkpointing:
        activations = config.num_hidden_layers * tokens * config.hidden_size * 2 + layer + logits
    else:
        activations = config.num_hidden_layers * layer + logits
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations}
    parts["total"] = sum(parts.values())
    parts["with_margin"] = 1.1 * parts["total"] + 0.5 * GIB
    result = {k: v / GIB for k, v in parts.items()}
    result["trainable_parameters"] = trainable
    result["parameters"] = total_params
    return result


@dataclass
class MemoryArgs:
    """estimate-memory reads an sft or dpo recipe; these keys override what it says."""

    stage: str | None = None  # sft or dpo; guessed from the recipe (DPO keys) when unset
    seq_len: int | None = None
    batch_size: int | None = None
    model_config: dict | None = None  # config keys to override, e.g. {num_hidden_layers: 24}


def guess_stage(recipe: dict) -> str:
    return "dpo" if {"beta", "loss_type", "precompute_ref_log_probs"} & set(recipe) else "sft"


def run_estimate(recipe: dict, args: MemoryArgs) -> dict:
    stage = args.stage or guess_stage(recipe)
    config = model_config(recipe.get("model_name_or_path", ""), args.model_config or {})
    counts = parameter_counts(config)
    seq_len = args.seq_len or recipe.get("max_length", 1024)
    batch = args.batch_size or recipe.get("per_device_train_batch_size", 8)
    checkpointing = recipe.get("gradient_checkpointing", True)  # TRL's default
    rank = recipe.get("lora_r", 16)
    chosen = "qlora" if recipe.get("load_in_4bit") else "lora" if recipe.get("use_peft") else "full"
    precomputed = recipe.get("precompute_ref_log_probs", False)
    table = {m: estimate(config, counts, m, stage, seq_len, batch, checkpointing, rank, precomputed) for m in ("full", "lora", "qlora")}
    return {"stage": stage, "seq_len": seq_len, "batch": batch, "checkpointing": checkpointing, "lora_r": rank, "recipe_method": chosen, "estimates": table}


def format_estimate(result: dict) -> str:
    lines = [
        f"{result['stage']} at sequence length {result['seq_len']}, batch {result['batch']}, checkpointing {'on' if result['checkpointing'] else 'off'}, LoRA rank {result['lora_r']} (GiB)",
        f"{'method':<8}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'TOTAL':>8}{'+margin':>9}   trainable",
    ]
    for method, e in result["estimates"].items():
        mark = "  <- this recipe" if method == result["recipe_method"] else ""
        lines.append(f"{method:<8}{e['weights']:9.2f}{e['gradients']:8.2f}{e['optimizer']:8.2f}{e['activations']:8.2f}{e['total']:8.2f}{e['with_margin']:9.2f}   {e['trainable_parameters'] / 1e6:,.1f}M{mark}")
    return "\n".join(lines)
