"""MoE training components against the stock stack, as ratios measured in one run on this machine.

Mid size: hidden 1024, expert width 2816, 8 experts top-2 in both banks, 2048 tokens (2 x 1024).
1. 4-bit experts: bytes of an MLP expert bank in NF4 (per expert, double quantisation) against bf16,
   and its forward (dequantised one expert at a time) against the bf16 bank forward.
2. Expert LoRA, rank 8 on both expert banks, fp32: a training step (forward, backward) of a 2-layer
   JetMoE against the frozen-base step, and against PEFT `target_parameters` with the same factors
   (whose outputs it must match to 1e-5), run as a TRL + PEFT user runs it (transformers' expert loop)
   and, for a fair view of the LoRA part alone, on our grouped experts too.

3. The same two on transformers' fused experts (a Mixtral-style model, same sizes, transformers'
   grouped_mm experts): NF4 bytes and forward of one experts module; a training step with expert LoRA
   (ours: per expert on its own tokens) against the frozen step and against PEFT `target_parameters`
   on the same grouped_mm experts, with the same factors. All three back-propagate to the input
   embeddings (TRL's PEFT path under checkpointing, or any LoRA on attention, does), so the frozen step
   is the LoRA step's own backward without the adapters.

4. Loading memory: the CPU peak resident memory of loading a saved Mixtral-style model (8 layers, the
   same widths, bf16 safetensors shards) with `load_in_4bit` (nn.Linear through bitsandbytes, fused
   experts to NF4 as they load) against a plain bf16 load, each in a fresh process, above the
   process's resident memory before loading.

usage: python bench/moe_bench.py [--rounds 3] [--layers 2] [--threads N] [--only jetmoe|fused|load] [--readme README.md]
(--readme puts the fused-expert figures, as printed, between the README's <!-- moe_bench:fused --> markers)
(--threads 1 on a machine that other jobs share: with more threads than free cores, every small
matmul waits for a descheduled thread and the ratios measure the scheduler)
"""

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import JetMoeConfig, JetMoeForCausalLM
from transformers.models.jetmoe.modeling_jetmoe import JetMoeParallelExperts

from alignment.models.experts import STOCK_FORWARD, experts_forward, use_fast_experts
from alignment.models.lora import expert_lora_config
from alignment.models.moe import fused_experts_forward
from alignment.models.quant import NF4Experts, QuantizedExperts, quantize_fused_experts
from alignment.report import write_between_markers

HIDDEN, WIDTH, EXPERTS, TOP_K, TOKENS = 1024, 2816, 8, 2, 2048
BANKS = ["mlp.input_linear.weight", "mlp.output_linear.weight", "experts.input_linear.weight", "experts.output_linear.weight"]


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def routed_sizes(tokens: int) -> list[int]:
    torch.manual_seed(0)
    choice = torch.rand(tokens, EXPERTS).topk(TOP_K, dim=-1).indices.flatten()
    return torch.bincount(choice, minlength=EXPERTS).tolist()


def four_bit(rounds: int):
    torch.manual_seed(0)
    bank = JetMoeParallelExperts(EXPERTS, HIDDEN, 2 * WIDTH)
    torch.nn.init.normal_(bank.weight, std=0.02)
    bank = bank.to(torch.bfloat16)
    quantised = QuantizedExperts.from_bank(bank, torch.bfloat16)
    sizes = routed_sizes(TOKENS)
    x = torch.randn(sum(sizes), HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        bf16_time = stock_time = q_time = float("inf")
        for _ in range(rounds):  # interleaved
            bf16_time = min(bf16_time, best(lambda: experts_forward(bank, x, sizes), 1))
            stock_time = min(stock_time, best(lambda: STOCK_FORWARD(bank, x, sizes), 1))
            q_time = min(q_time, best(lambda: quantised(x, sizes), 1))
    ratio_bytes = quantised.storage_bytes() / (bank.weight.numel() * 2)
    print(f"4-bit MLP expert bank [{EXPERTS}, {2 * WIDTH}, {HIDDEN}], {sum(sizes)} routed rows, bf16")
    print(f"  bytes: NF4 {quantised.storage_bytes() / 2**20:.1f} MiB vs bf16 {bank.weight.numel() * 2 / 2**20:.1f} MiB = {ratio_bytes:.3f}x")
    print(f"  forward: bf16 grouped {bf16_time * 1e3:.1f} ms, bf16 stock loop {stock_time * 1e3:.1f} ms, NF4 per expert {q_time * 1e3:.1f} ms")
    print(f"  ratio NF4 / bf16 grouped: {q_time / bf16_time:.2f}x   NF4 / bf16 stock: {q_time / stock_time:.2f}x")


def mid_model(layers: int):
    config = JetMoeConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=layers, num_key_value_heads=8, kv_channels=64, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    torch.manual_seed(0)
    model = JetMoeForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model


def lora_step(rounds: int, layers: int):
    use_fast_experts()
    frozen = mid_model(layers)
    for name, p in frozen.named_parameters():
        p.requires_grad_("norm" in name)  # a frozen base that still back-propagates through every layer
    ours = get_peft_model(mid_model(layers), expert_lora_config(LoraConfig(r=8, lora_alpha=16, target_modules=["input_linear", "output_linear"], task_type="CAUSAL_LM")))
    theirs = get_peft_model(mid_model(layers), LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=BANKS, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():  # the same non-zero factors in both adapters
        ours_params = dict(ours.named_parameters())
        for name, module in theirs.named_modules():
            if hasattr(module, "num_experts") and "default" in getattr(module, "lora_A", {}):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
                a, b, e = module.lora_A["default"].weight, module.lora_B["default"].weight, module.num_experts
                ours_params[f"{name}.lora_A.default.weight"].copy_(a.reshape(e, -1, a.shape[-1]))
                ours_params[f"{name}.lora_B.default.weight"].copy_(b.reshape(b.shape[0], -1, e).permute(2, 0, 1))
    ids = torch.randint(0, 512, (2, TOKENS // 2))

    def step(model):
        return lambda: model(input_ids=ids, labels=ids).loss.backward()

    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    variants = (("frozen", frozen, True), ("expert_lora", ours, True), ("target_parameters", theirs, True), ("target_parameters_stock", theirs, False))
    times = {name: float("inf") for name, _, _ in variants}
    for _ in range(rounds):  # interleaved, so drift in machine load hits every variant
        for name, model, fast in variants:
            use_fast_experts(fast)  # stock: transformers' own per-expert loop, as a TRL + PEFT user runs it
            model.zero_grad(set_to_none=True)
            times[name] = min(times[name], best(step(model), 1))
    use_fast_experts()
    print(f"expert LoRA r8 on both banks, {layers}-layer JetMoE (hidden {HIDDEN}, expert width {WIDTH}), {TOKENS} tokens, fp32, forward + backward")
    print(f"  frozen base {times['frozen']:.2f} s, expert LoRA {times['expert_lora']:.2f} s")
    print(f"  PEFT target_parameters: {times['target_parameters_stock']:.2f} s with transformers' expert loop (stock), {times['target_parameters']:.2f} s on our grouped experts")
    print(f"  expert LoRA / frozen: {times['expert_lora'] / times['frozen']:.2f}x")
    print(f"  stock PEFT target_parameters / expert LoRA: {times['target_parameters_stock'] / times['expert_lora']:.2f}x   (on our grouped experts: {times['target_parameters'] / times['expert_lora']:.2f}x)")
    print(f"  max |logits difference| expert LoRA vs target_parameters: {diff:.2e}")


def mixtral(layers: int, dtype=torch.float32):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    config._experts_implementation, config._attn_implementation = "grouped_mm", "sdpa"
    torch.manual_seed(0)
    return MixtralForCausalLM(config).to(dtype)


def routing(tokens: int):
    torch.manual_seed(0)
    top_k_weights, top_k_index = torch.rand(tokens, EXPERTS).softmax(-1).topk(TOP_K, dim=-1)
    return top_k_index, top_k_weights


def fused_four_bit(rounds: int):
    experts = mixtral(1, torch.bfloat16).model.layers[0].mlp.experts
    with torch.no_grad():
        for p in (experts.gate_up_proj, experts.down_proj):
            torch.nn.init.normal_(p, std=0.02)
    bf16_bytes = (experts.gate_up_proj.numel() + experts.down_proj.numel()) * 2
    quantised = quantize_fused_experts(__import__("copy").deepcopy(experts), torch.bfloat16)
    nf4_bytes = sum(p.storage_bytes(quantised.parametrizations[name].original) for name in ("gate_up_proj", "down_proj") for p in quantised.parametrizations[name] if isinstance(p, NF4Experts))
    index, weights = routing(TOKENS)
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.bfloat16)
    bf16_time = q_time = float("inf")
    with torch.no_grad():
        for _ in range(rounds):
            bf16_time = min(bf16_time, best(lambda: experts(x, index, weights), 1))
            q_time = min(q_time, best(lambda: fused_experts_forward(quantised, x, index, weights), 1))
    print(f"4-bit fused experts (Mixtral-style gate_up_proj + down_proj, {EXPERTS} x [{2 * WIDTH}, {HIDDEN}] + [{HIDDEN}, {WIDTH}]), {TOKENS} tokens top-{TOP_K}, bf16")
    print(f"  bytes: NF4 {nf4_bytes / 2**20:.1f} MiB vs bf16 {bf16_bytes / 2**20:.1f} MiB = {nf4_bytes / bf16_bytes:.3f}x")
    print(f"  forward: bf16 transformers grouped_mm {bf16_time * 1e3:.1f} ms, NF4 (experts with tokens dequantised together, grouped matmul) {q_time * 1e3:.1f} ms, ratio {q_time / bf16_time:.2f}x")


def fused_lora_step(rounds: int, layers: int):
    """A training step (forward, backward, AdamW step on what trains) of three copies of one model:
    frozen, our expert LoRA and PEFT `target_parameters` with the same factors. Each back-propagates to
    its input embeddings, as TRL's PEFT path does under checkpointing (`enable_input_require_grads`) and
    as any LoRA on attention needs, so the frozen step runs the very backward the LoRA steps run, minus
    the adapters."""
    frozen = mixtral(layers)
    frozen.requires_grad_(False)
    ours = get_peft_model(mixtral(layers), expert_lora_config(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["experts"], task_type="CAUSAL_LM"), mixtral(layers)))
    theirs = get_peft_model(mixtral(layers), LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():  # the same non-zero factors in both: the state-dict keys are the same
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        missing = ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
        assert not missing.unexpected_keys
    ids = torch.randint(0, 512, (2, TOKENS // 2))
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    optimizers = {}
    for model in (frozen, ours, theirs):
        model.enable_input_require_grads()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizers[id(model)] = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

    def step(model):
        def run():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer = optimizers[id(model)]
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run

    variants = (("frozen", frozen), ("expert_lora", ours), ("target_parameters", theirs))
    times = {name: float("inf") for name, _ in variants}
    cpu = dict(times)  # on one thread, the process's CPU seconds: what a step computes, however busy the machine
    for _ in range(rounds):  # interleaved, so drift in machine load hits every variant
        for name, model in variants:
            start = time.process_time()
            times[name] = min(times[name], best(step(model), 1))
            cpu[name] = min(cpu[name], time.process_time() - start)
    print(f"expert LoRA r8 on gate_up_proj and down_proj, {layers}-layer Mixtral-style (hidden {HIDDEN}, expert width {WIDTH}), {TOKENS} tokens, fp32, grouped_mm experts,")
    print(f"  training step (forward, backward to the input embeddings, AdamW on the adapters), best of {rounds} interleaved rounds")
    print(f"  frozen base {times['frozen']:.2f} s, expert LoRA {times['expert_lora']:.2f} s, PEFT target_parameters {times['target_parameters']:.2f} s")
    print(f"  expert LoRA / frozen: {times['expert_lora'] / times['frozen']:.2f}x   PEFT target_parameters / frozen: {times['target_parameters'] / times['frozen']:.2f}x   PEFT target_parameters / expert LoRA: {times['target_parameters'] / times['expert_lora']:.2f}x")
    if torch.get_num_threads() == 1:
        print(f"  CPU seconds: frozen {cpu['frozen']:.2f}, expert LoRA {cpu['expert_lora']:.2f}, PEFT target_parameters {cpu['target_parameters']:.2f}; "
              f"expert LoRA / frozen {cpu['expert_lora'] / cpu['frozen']:.2f}x, PEFT target_parameters / expert LoRA {cpu['target_parameters'] / cpu['expert_lora']:.2f}x")
    print(f"  max |logits difference| expert LoRA vs target_parameters: {diff:.2e}")


LOAD = """
import sys, threading, time, torch
from transformers import AutoModelForCausalLM
from alignment.models.fused_4bit import Fused4bitConfig

def resident():  # anonymous memory (what the process owns) and mapped file pages (the checkpoint), bytes
    fields = dict(line.split(":") for line in open("/proc/self/status") if line.startswith(("RssAnon", "RssFile")))
    return [int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")]

base, peak, done = resident(), [0, 0], False
def sample():
    while not done:
        peak[:] = [max(p, r) for p, r in zip(peak, resident())]
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
options = dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["gate", "lm_head"])
extra = dict(quantization_config=Fused4bitConfig(**options)) if sys.argv[2] == "4bit" else {}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, **extra)
for p in model.parameters():  # every weight read once, as the first training step will
    p.sum()
time.sleep(0.05)
done = True
print(peak[0] - base[0], peak[1] - base[1])
"""


def loading_memory(layers: int = 8):
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        mixtral(layers, torch.bfloat16).save_pretrained(folder, max_shard_size="100MB")
        bf16_bytes = sum(p.numel() * 2 for p in mixtral(layers, torch.bfloat16).parameters())
        peak = {}
        for kind in ("bf16", "4bit"):
            out = subprocess.run([sys.executable, "-c", LOAD, folder, kind], capture_output=True, text=True, check=True).stdout.split()
            peak[kind] = [int(x) for x in out[-2:]]
    print(f"loading a {layers}-layer Mixtral-style model from bf16 safetensors shards of 100 MB ({bf16_bytes / 2**20:.0f} MiB in bf16) and reading every weight once, CPU,")
    print("  peak resident memory above the process before loading: anonymous (owned) + mapped checkpoint pages")
    for kind, name in (("bf16", "bf16 load"), ("4bit", "load_in_4bit, experts NF4 as they load")):
        print(f"  {name}: {peak[kind][0] / 2**20:.0f} MiB + {peak[kind][1] / 2**20:.0f} MiB mapped")
    print(f"  ratio 4-bit / bf16, anonymous: {peak['4bit'][0] / peak['bf16'][0]:.2f}x   anonymous + mapped: {sum(peak['4bit']) / sum(peak['bf16']):.2f}x")

class _Tee(io.StringIO):
    """Keeps what is printed and still prints it."""

    def write(self, text):
        sys.__stdout__.write(text)
        return super().write(text)


def load_average() -> str:
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--only", choices=["jetmoe", "fused", "load"], default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--readme", type=Path, default=None, help="put the fused-expert figures into this file between <!-- moe_bench:fused --> markers")
    args = parser.parse_args()
    if args.readme and args.only not in (None, "fused"):
        parser.error("--readme writes the fused-expert figures: run them (--only fused, or everything)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only != "fused":
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load_average()}")
    if args.only in (None, "jetmoe"):
        four_bit(args.rounds)
        lora_step(args.rounds, args.layers)
    if args.only in (None, "fused"):
        printed = _Tee()
        with contextlib.redirect_stdout(printed):
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load_average()} at the start")
            fused_four_bit(args.rounds)
            fused_lora_step(args.rounds, args.layers)
            print(f"{load_average()} at the end")
        if args.readme:
            write_between_markers(args.readme, "moe_bench:fused", "```\n" + printed.getvalue() + "```\n")
    if args.only in (None, "load"):
        loading_memory()


if __name__ == "__main__":
    main()
