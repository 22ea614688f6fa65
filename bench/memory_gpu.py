"""Measured peak GPU memory of JetMoE-8B training steps against `estimate-memory`'s activation model.

usage (on a CUDA machine): python bench/memory_gpu.py [--layers 24] [--seq 2048]

A random-initialised 24-layer JetMoE-8B is built from its config (no download) in bf16 on the GPU with
every weight frozen except the RMSNorm scales (a few hundred thousand parameters), so the measured
peak minus the weights is the activation memory of one step with activation checkpointing and SDPA:
batch 1 (a dSFT step) and batch 2 (a dDPO step: chosen and rejected together). Printed beside the
estimator's activation term.
"""

import argparse
import json

import torch
from transformers import JetMoeConfig, JetMoeForCausalLM

from alignment.memory import GIB, JETMOE_8B, layer_activation_bytes
from alignment.models.experts import use_fast_experts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    config = JetMoeConfig(**{**JETMOE_8B, "num_hidden_layers": args.layers})
    use_fast_experts()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = JetMoeForCausalLM(config).to(torch.bfloat16)
    model.supports_gradient_checkpointing = True
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config._attn_implementation = "sdpa"
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    results = {"parameters": sum(p.numel() for p in model.parameters()), "weights_gib": weights / GIB}
    for stage, batch in (("sft", 1), ("dpo", 2)):
        ids = torch.randint(0, config.vocab_size, (batch, args.seq), device="cuda")
        for _ in range(2):  # the second step is the one measured: allocator state settled
            torch.cuda.reset_peak_memory_stats()
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        tokens = batch * args.seq
        predicted = config.num_hidden_layers * tokens * config.hidden_size * 2 + layer_activation_bytes(config, tokens) + 2 * tokens * config.vocab_size * 4
        results[stage] = {"peak_gib": peak / GIB, "activations_measured_gib": (peak - weights) / GIB, "activations_predicted_gib": predicted / GIB}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
