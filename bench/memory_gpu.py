"""Measured peak GPU memory of JetMoE-8B QLoRA steps against `estimate-memory`'s prediction.

usage (on a CUDA machine, bitsandbytes installed): python bench/memory_gpu.py [--layers 24] [--seq 2048]

A random-initialised 24-layer JetMoE-8B is built from its config (no download) in bf16, its expert
banks quantised to NF4 (alignment.models.quant), expert LoRA r16 on every expert bank and key-value
projection (alignment.models.lora), activation checkpointing, SDPA. Measured with
`torch.cuda.max_memory_allocated` over a second full step (forward, backward, AdamW):
  dSFT  batch 1
  dDPO  chosen and rejected together (batch 2), plus the reference pass with the adapter disabled
Printed beside `alignment.memory.estimate` for the same settings.
"""

import argparse
import json

import torch
from peft import LoraConfig, get_peft_model
from transformers import JetMoeConfig, JetMoeForCausalLM

from alignment.memory import GIB, JETMOE_8B, estimate, parameter_counts
from alignment.models.experts import use_fast_experts
from alignment.models.lora import expert_lora_config
from alignment.models.quant import quantize_experts


def build(layers: int):
    config = JetMoeConfig(**{**JETMOE_8B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = JetMoeForCausalLM(config).to(torch.bfloat16)
    quantize_experts(model, torch.bfloat16)
    torch.cuda.empty_cache()
    model.supports_gradient_checkpointing = True
    model.config._attn_implementation = "sdpa"
    lora = expert_lora_config(LoraConfig(r=16, lora_alpha=32, target_modules=["kv_proj", "input_linear", "output_linear"], task_type="CAUSAL_LM"))
    model = get_peft_model(model, lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return config, model


def step(model, optimizer, ids, dpo: bool):
    if dpo:  # the reference: the same model with its adapter off, no graph
        with torch.no_grad(), model.disable_adapter():
            model(input_ids=ids).logits.float().log_softmax(-1)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    use_fast_experts()
    config, model = build(args.layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    counts = parameter_counts(config)
    results = {"layers": args.layers, "seq": args.seq, "weights_gib": torch.cuda.memory_allocated() / GIB}
    for stage, batch in (("sft", 1), ("dpo", 2)):
        ids = torch.randint(0, config.vocab_size, (batch, args.seq), device="cuda")
        for _ in range(2):  # the second step is measured: optimizer states exist, the allocator has settled
            torch.cuda.reset_peak_memory_stats()
            step(model, optimizer, ids, stage == "dpo")
            torch.cuda.synchronize()
        predicted = estimate(config, counts, "qlora", stage, args.seq, 1, True, 16)
        measured = torch.cuda.max_memory_allocated() / GIB
        results[stage] = {"measured_peak_gib": round(measured, 2), "predicted_gib": round(predicted["total"], 2), "ratio": round(measured / predicted["total"], 3), "predicted_with_margin_gib": round(predicted["with_margin"], 2)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
