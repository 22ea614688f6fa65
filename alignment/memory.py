"""estimate-memory: predicted peak training memory of a recipe for full fine-tuning, LoRA and QLoRA.

usage: smoe-align estimate-memory --config recipes/qwen3-30b-a3b/sft/qlora.yaml [--key value ...]

The model is built on the meta device from its config (the published shape for the hub ids in KNOWN,
so no download; else the local config), and what the stages would do to it is done to it there too:
the LoRA adapters are created by the project's own resolution of `lora_target_modules` (PEFT plus
alignment.models.lora) and counted, and the layers that 4-bit loading converts are picked by
transformers' own rule. The rest is a model of what training keeps in memory, per GiB:
  weights      bf16 (2 B). QLoRA: expert weights (JetMoE banks, fused 3-D experts) in NF4 with double
               quantisation (4.127 bits: 4 + 8/64 + 32/(64*256)); on every family but JetMoE, the
               nn.Linear layers too (transformers' BitsAndBytesConfig; 4.127 bits with
               use_bnb_nested_quant, else 4.5), except routers and lm_head; embeddings and norms bf16
  trainable    full: bf16 weights' gradients (2 B) + AdamW moments in fp32 (8 B) per parameter, and for
               DPO a frozen bf16 reference copy unless its log-probs are precomputed.
               LoRA: the adapters, their gradients and two AdamW moments, all in the adapters' dtype:
               fp32 (PEFT upcasts them), except on a model loaded through transformers' 4-bit path,
               where TRL 1.16 casts them to bf16 (SFTTrainer / DPOTrainer, "_is_quantized_model")
  activations  with checkpointing: every layer's input (hidden x 2 B per token) + one layer recomputed
               in full (selective checkpointing: + every other layer's kept matmul / attention outputs, `kept_bytes`) + the LM head + every layer's router logits (the load-balancing loss). TRL 1.16's fused LM head (`add_fused_lm_head`) never builds the
               [tokens, vocabulary] logits: it projects tiles of 4,096 tokens x 32,768 entries (bf16
               under autocast) and keeps an fp32 gradient of the hidden states. DPO runs chosen and
               rejected together: twice the tokens; precomputed reference log-probs run once before
               training, without gradients, at `precompute_ref_batch_size` pairs: a peak of its own
               (`precompute` below), which the total takes when it is higher.
The total predicts `torch.cuda.max_memory_allocated`; what `nvidia-smi` shows adds the allocator's
reserve and the CUDA context, given as `with_margin` (10% more plus 0.5 GiB).
Checked on an H100 (bench/memory_gpu.py): JetMoE-8B, 24 layers, bf16, checkpointing, SDPA, sequence
2048: activations measured 1.01 GiB (batch 1) and 1.95 GiB (batch 2) against 0.98 and 1.96 predicted.
One layer's activations are the tensors its forward saves for backward (tests/test_memory.py counts
them with saved_tensors_hooks on tiny models of each family) plus the gradients its backward holds.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from alignment.errors import SmoeError
from alignment.models.checkpointing import CheckpointingArgs
from alignment.models.jetmoe import root_model

GIB = 1024**3
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # packed weights, uint8 block scales (64), fp32 scales of those (256 blocks)
NF4_PLAIN_BITS = 4 + 32 / 64  # without double quantisation: an fp32 scale per block of 64
# TRL 1.16 kernels/chunked_logprob.py: TOKEN_CHUNK_SIZE and trainer/utils.py: _CHUNKED_LOGPROB_CHUNK_SIZE
LM_HEAD_TILE = (4096, 32768)

# Published shapes (config.json on the hub), so that estimates need no download. transformers' config
# defaults are not these models (JetMoeConfig() has 12 layers, Qwen3MoeConfig() 24 and head_dim 64,
# OlmoeConfig() an expert width of 2048); MixtralConfig()'s defaults are Mixtral-8x7B's.
# jetmoe/jetmoe-8b: FINDINGS ("JetMoE in transformers").
JETMOE_8B = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_key_value_heads=16, kv_channels=128, intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=True)
# mistralai/Mixtral-8x7B-v0.1 config.json (as quoted by vLLM-style hardware tests and llm-foundry fixtures).
MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
# Qwen/Qwen3-30B-A3B config.json (model card: 48 layers, 32 Q / 4 KV heads, 128 experts, 8 active;
# Megatron conversion scripts: head_dim 128, moe_ffn_hidden_size 768, untied embeddings).
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False)
# allenai/OLMoE-1B-7B-0924 config.json (quoted by several engines' test fixtures): qk-norm over the whole projection.
OLMOE_1B_7B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, tie_word_embeddings=False)
KNOWN = {"jetmoe-8b": ("JetMoeConfig", JETMOE_8B), "mixtral-8x7b": ("MixtralConfig", MIXTRAL_8X7B), "qwen3-30b-a3b": ("Qwen3MoeConfig", QWEN3_30B_A3B), "olmoe-1b-7b": ("OlmoeConfig", OLMOE_1B_7B)}


def model_config(name: str, overrides: dict):
    import transformers
    from transformers import AutoConfig

    for key, (config_class, shape) in KNOWN.items():
        if key in name.lower() and not Path(name).exists():  # a hub id, or a run not yet made, named after the model
            return getattr(transformers, config_class)(**{**shape, **overrides})
    name = root_model(name)  # an adapter directory (or chain): the architecture is its base model's
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        raise SmoeError(f"cannot read the model config of {name}", "estimate-memory", f"point model_name_or_path at a local model directory, or at one of the known shapes ({', '.join(KNOWN)})") from None
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def linear_4bit_names(model) -> set[str]:
    """The nn.Linear layers transformers' 4-bit loading converts under the stages' BitsAndBytesConfig
    (train_common.linear_4bit_config): its own matching rule, its own skip list plus the model's fp32 modules."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from alignment.train_common import LINEAR_4BIT_SKIP

    skip = LINEAR_4BIT_SKIP + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {name for name, m in model.named_modules() if type(m) is torch.nn.Linear and should_convert_module(name, skip)}


def parameter_counts(config) -> dict:
    """Exact counts by kind: expert weights (3-D), nn.Linear weights that 4-bit loading converts (every
    family but JetMoE, whose 4-bit path quantises only its banks), everything else; the expert shapes."""
    model = meta_model(config)
    four_bit = linear_4bit_names(model) if config.model_type != "jetmoe" else set()
    counts = {"experts": 0, "dense": 0, "linear_4bit": 0, "banks": []}
    for name, p in model.named_parameters():
        if p.dim() == 3:
            counts["experts"] += p.numel()
            counts["banks"].append(tuple(p.shape))
        else:
            counts["dense"] += p.numel()
            if name.endswith(".weight") and name.removesuffix(".weight") in four_bit:
                counts["linear_4bit"] += p.numel()
    return counts


@dataclass
class Adapter:
    """What LoRA adds: trainable parameters and the bytes of one in its dtype."""

    parameters: int
    bytes_each: int
    targets: dict | None = None


def lora_adapter(config, recipe: dict, quantized: bool) -> Adapter:
    """The adapters the stages would create, counted on the meta-device model: TRL's LoraConfig from the
    recipe's keys, resolved by alignment.models.lora (expert weights per expert, all-linear for MoEs),
    applied by PEFT. On a model loaded through transformers' 4-bit path TRL casts them to bf16."""
    from peft import get_peft_model
    from trl import ModelConfig, get_peft_config

    from alignment.models.lora import expert_lora_config, lora_targets

    keys = {f.name for f in fields(ModelConfig)}
    lora = {k: v for k, v in recipe.items() if k in keys and k.startswith(("lora_", "use_"))}
    if not recipe.get("use_peft"):  # a full fine-tuning recipe: what LoRA on every linear layer and expert weight would add
        lora.update(lora_target_modules=lora.get("lora_target_modules") or "all-linear", lora_dropout=0.0)
    model_args = ModelConfig(**{**lora, "use_peft": True})
    peft_config = expert_lora_config(get_peft_config(model_args), model := meta_model(config))
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as err:  # what PEFT refuses here, the stage's trainer refuses too
        raise SmoeError(f"LoRA cannot be applied as the recipe says ({str(err).splitlines()[0]})", "recipe key lora_target_modules", "name the layers to adapt, or all-linear (every attention projection and expert weight)") from None
    trainable = [p for p in model.parameters() if p.requires_grad]
    bnb_loaded = quantized and config.model_type != "jetmoe"  # train_common.load_student: BitsAndBytesConfig for all but JetMoE
    return Adapter(sum(p.numel() for p in trainable), 2 if bnb_loaded else trainable[0].element_size() if trainable else 4, lora_targets(peft_config))


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, key-value heads, head dim)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim


def expert_width(config) -> int:
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def jetmoe_layer_bytes(config, tokens: int) -> int:
    """What one JetMoE layer's backward holds at once, bf16, per `tokens` (an upper bound; measured on an H100)."""
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


def fused_layer_saved_bytes(config, tokens: int, masked: bool) -> int:
    """Bytes one decoder layer of a fused-experts family saves for backward, bf16 under autocast, with its
    experts run by alignment.models.moe.fused_experts_forward (expert LoRA or NF4 experts): per token
      norms         RMSNorm keeps its fp32 input and bf16 output: 6 B x width, twice, and on q / k with qk-norm
      attention     queries, keys, values after rotary (keys and values repeated to every head when a padding
                    mask makes SDPA leave its GQA path), SDPA output and its fp32 log-sum-exp, o_proj's input
      router        fp32 probabilities
      experts       for each of the top-k copies: the gathered input, gate/up output (2 x width), the
                    activation of the gate and its product with up (the down projection's input), the
                    expert output (scaled by the routing weight)."""
    h, k, width = config.hidden_size, config.num_experts_per_tok, expert_width(config)
    heads, kv_heads, head_dim = attention_shape(config)
    q, kv = heads * head_dim, (heads if masked else kv_heads) * head_dim
    qk_norm = config.model_type in ("qwen3_moe", "olmoe")
    per_token = (
        2 * 6 * h
        + (6 * (q + kv_heads * head_dim) if qk_norm else 0)
        + 2 * (q + 2 * kv) + 2 * 2 * q + 4 * heads
        + 4 * num_experts(config)
        + 2 * k * (h + 2 * width + width + width + h)
    )
    return per_token * tokens


def dequantized_expert_bytes(config) -> int:
    """The bf16 NF4 expert weights alive at once: alignment.models.quant dequantises the experts that
    receive tokens (at these lengths, all of them) in groups of at most DEQUANT_GROUP_BYTES, gate/up the larger."""
    from alignment.models.quant import DEQUANT_GROUP_BYTES

    per_expert = 2 * 2 * expert_width(config) * config.hidden_size
    return per_expert * min(num_experts(config), max(1, DEQUANT_GROUP_BYTES // per_expert))


def fused_layer_bytes(config, tokens: int, masked: bool = False, quantized: bool = False) -> int:
    """A layer's saved tensors plus what its backward computes at once: the gradients of the expert input
    and of the gate/up output for every top-k copy, and (NF4 experts) the expert weights dequantised for the product."""
    h, k, width = config.hidden_size, config.num_experts_per_tok, expert_width(config)
    backward = 2 * k * (h + 2 * width) * tokens + (dequantized_expert_bytes(config) if quantized else 0)
    return fused_layer_saved_bytes(config, tokens, masked) + backward


def router_bytes(config, tokens: int) -> int:
    """Every layer's router logits that alignment.models.router keeps for its per-sequence load-balancing
    loss (the model's own loss is off): bf16 as the router returns them, and their softmax saved for
    backward (fp32, an upper bound). Training passes only: the hooks record nothing without gradients,
    nor while checkpointing recomputes a layer in backward (kept, those would hold the recomputed layers)."""
    if config.model_type == "jetmoe":
        return 0  # JetMoE's router logits: counted in the layer
    return config.num_hidden_layers * tokens * num_experts(config) * (2 + 4)


def layer_bytes(config, tokens: int, masked: bool = False, quantized: bool = False) -> int:
    if config.model_type == "jetmoe":
        return jetmoe_layer_bytes(config, tokens)
    return fused_layer_bytes(config, tokens, masked, quantized)



def kept_bytes(config, tokens: int, kinds: list[str]) -> int:
    """What selective checkpointing (alignment.models.checkpointing) keeps of one decoder layer besides its
    input, bf16: the outputs of the kept op kinds, per token
      matmul          dense projections: JetMoE's kv_proj and two routers; q, k, v, o and the router elsewhere
      grouped_matmul  expert banks, for each top-k copy: JetMoE's attention experts in and out, and every
                      family's gate/up (2 x width) and down
      attention       the attention kernel's output (its fp32 log-sum-exp counted as two bf16 per head)
    NF4 banks (JetMoE's and fused) multiply by grouped matmuls too: they count as grouped_matmul. LoRA adds
    nothing that counts: its B products (reduction = rank) are recomputed, its A products are rank-wide."""
    h, k, experts = config.hidden_size, config.num_experts_per_tok, num_experts(config)
    if config.model_type == "jetmoe":
        attn = config.num_key_value_heads * config.kv_channels
        heads = k * config.num_key_value_heads
        dense, banks, attention = 2 * attn + 2 * experts, k * (attn + h + 2 * config.intermediate_size + h), k * attn + 2 * heads
    else:
        heads, kv_heads, head_dim = attention_shape(config)
        q, kv = heads * head_dim, kv_heads * head_dim
        dense, banks, attention = q + 2 * kv + h + experts, k * (2 * expert_width(config) + h), q + 2 * heads
    per_kind = {"matmul": dense, "grouped_matmul": banks, "attention": attention}
    return 2 * tokens * sum(per_kind[kind] for kind in kinds)


def no_grad_layer_bytes(config, tokens: int, quantized: bool = False) -> int:
    """Peak of one layer's forward without gradients (reference log-probs): the residual stream and the
    widest moment of the expert block: for each top-k copy, the gathered input and, at once, either the
    gate/up output with the GLU product or the expert output, the zeros it is scattered into and the result."""
    h, k = config.hidden_size, config.num_experts_per_tok
    if config.model_type == "jetmoe":
        return 2 * tokens * (4 * h + k * (2 * h + 3 * config.intermediate_size))
    width = expert_width(config)
    return 2 * tokens * (4 * h + k * (h + max(3 * width, 3 * h))) + (dequantized_expert_bytes(config) if quantized else 0)


def lm_head_bytes(config, tokens: int, gradients: bool) -> int:
    """TRL's fused LM head: one bf16 tile of logits (allocated 32,768 wide whatever the vocabulary), the
    hidden states it keeps, and their fp32 gradient."""
    tile = min(tokens, LM_HEAD_TILE[0]) * LM_HEAD_TILE[1] * 2
    return tile + tokens * config.hidden_size * (2 + (4 if gradients else 0))


def estimate(config, counts: dict, method: str, stage: str, seq_len: int, batch: int, checkpointing: bool, adapter: Adapter, precomputed_reference: bool = False, precompute_batch: int | None = None, nested_quant: bool = True, kept_kinds: list[str] | None = None) -> dict:
    pairs = 2 if stage == "dpo" else 1
    tokens = seq_len * batch * pairs
    total_params = counts["experts"] + counts["dense"]
    if method == "qlora":
        bits = NF4_BITS if nested_quant else NF4_PLAIN_BITS
        weights = counts["experts"] * NF4_BITS / 8 + counts["linear_4bit"] * bits / 8 + (counts["dense"] - counts["linear_4bit"]) * 2
    else:
        weights = total_params * 2
    if method == "full":
        trainable, gradients, optimizer = total_params, total_params * 2, total_params * 8
        if stage == "dpo" and not precomputed_reference:
            weights += total_params * 2  # a frozen reference copy; LoRA disables its adapter instead
    else:
        trainable = adapter.parameters
        bytes_each = adapter.bytes_each if method == "qlora" else 4  # bf16 only where TRL casts a 4-bit model's adapters
        gradients, optimizer = trainable * bytes_each, trainable * 2 * bytes_each
        weights += trainable * bytes_each
    masked = stage == "dpo"  # chosen and rejected padded to one length: a padding mask
    layer = layer_bytes(config, tokens, masked, quantized=method == "qlora")
    logits = lm_head_bytes(config, tokens, gradients=True)
    # every layer's kept outputs but the recomputed one's, which holds them among its own tensors
    kept = (config.num_hidden_layers - 1) * kept_bytes(config, tokens, kept_kinds) if checkpointing and kept_kinds else 0
    routers = router_bytes(config, tokens)
    if checkpointing:
        activations = config.num_hidden_layers * tokens * config.hidden_size * 2 + kept + layer + logits
    else:
        activations = config.num_hidden_layers * layer + logits
    activations += routers
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations}
    parts["total"] = sum(parts.values())
    precompute = 0.0
    if stage == "dpo" and precomputed_reference:  # before training: no gradients, no optimizer state yet
        ref_tokens = seq_len * (precompute_batch or batch) * pairs
        precompute = weights + no_grad_layer_bytes(config, ref_tokens, quantized=method == "qlora") + lm_head_bytes(config, ref_tokens, gradients=False)
        parts["total"] = max(parts["total"], precompute)
    parts["precompute"] = precompute
    parts["with_margin"] = 1.1 * parts["total"] + 0.5 * GIB
    result = {k: v / GIB for k, v in parts.items()}
    result["layer"] = layer / GIB
    result["logits"] = logits / GIB
    result["routers"] = routers / GIB
    result["kept"] = kept / GIB  # all layers together
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
    kept_kinds = CheckpointingArgs(recipe.get("activation_checkpointing_policy", "full")).kinds()
    chosen = "qlora" if recipe.get("load_in_4bit") else "lora" if recipe.get("use_peft") else "full"
    adapter = lora_adapter(config, recipe, quantized=True)
    precomputed = recipe.get("precompute_ref_log_probs", False)
    settings = dict(precomputed_reference=precomputed, precompute_batch=recipe.get("precompute_ref_batch_size"), nested_quant=recipe.get("use_bnb_nested_quant", False), kept_kinds=kept_kinds)
    table = {m: estimate(config, counts, m, stage, seq_len, batch, checkpointing, adapter, **settings) for m in ("full", "lora", "qlora")}
    return {"stage": stage, "seq_len": seq_len, "batch": batch, "checkpointing": checkpointing, "kept_kinds": kept_kinds, "lora_r": recipe.get("lora_r", 16), "recipe_method": chosen, "estimates": table, "config": config, "counts": counts, "adapter": adapter}


def format_estimate(result: dict) -> str:
    lines = [
        f"{result['stage']} at sequence length {result['seq_len']}, batch {result['batch']}, checkpointing {'on' if result['checkpointing'] else 'off'}"
        + (f" keeping the {' / '.join(result['kept_kinds'])} outputs" if result["checkpointing"] and result["kept_kinds"] else "")
        + f", LoRA rank {result['lora_r']} (GiB)",
        f"{'method':<8}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'TOTAL':>8}{'+margin':>9}   trainable",
    ]
    for method, e in result["estimates"].items():
        mark = "  <- this recipe" if method == result["recipe_method"] else ""
        lines.append(f"{method:<8}{e['weights']:9.2f}{e['gradients']:8.2f}{e['optimizer']:8.2f}{e['activations']:8.2f}{e['total']:8.2f}{e['with_margin']:9.2f}   {e['trainable_parameters'] / 1e6:,.1f}M{mark}")
    chosen = result["estimates"][result["recipe_method"]]
    kept = f", kept by selective checkpointing {chosen['kept']:.2f}" if chosen["kept"] else ""
    lines.append(f"activations of this recipe: one layer {chosen['layer']:.2f}, LM head {chosen['logits']:.2f}, router logits {chosen['routers']:.2f}{kept}" + (f"; reference log-probs before training peak at {chosen['precompute']:.2f}" if chosen["precompute"] else ""))
    return "\n".join(lines)
