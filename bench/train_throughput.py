"""Training throughput against stock TRL + transformers + PEFT on JetMoE, side by side in one run.

usage: python bench/train_throughput.py [--device cpu|cuda] [--shape micro|mid|jetmoe-8b|mixtral|mixtral-micro] [--layers N]
           [--seq N] [--batch N] [--steps N] [--rounds N] [--modes sft-full,sft-lora,...,packing] [--model-dir DIR]
           [--profile] [--json PATH] [--markdown PATH] [--readme README.md]
       or: --from-json RUN.json ... --readme README.md      (bench/gpu_run.sh: the whole GPU session)

For each mode (sft / dpo x full / lora / qlora) two trainers train the same random-initialised model on the
same data with the same seed and batch: --steps warm-up steps each (not timed; their losses are compared),
then --rounds timed steps each, one at a time in alternating order; the ratio is the median of the ratios
of adjacent steps, so that the load of a shared machine falls on both sides alike:
  stock    TRL's SFTTrainer / DPOTrainer on transformers' own JetMoE experts (the per-expert loop), LoRA
           through PEFT `target_parameters` on the expert banks, 4-bit through transformers' bitsandbytes path;
           no activation checkpointing (JetMoE refuses it in transformers), so the project runs without it too.
           Mixtral shapes: transformers' fused experts with `experts_implementation="grouped_mm"`, LoRA through
           PEFT `target_parameters` on gate_up_proj / down_proj plus q/k/v/o.
  project  our stage set-up: `alignment.train_common.load_student` and our trainers with the recipe settings
           that pay: grouped experts and MoE layers without scatters, expert LoRA (x A then B per expert in
           the tokens' dtype), NF4 experts, padding-free batches with attention inside each sequence,
           reference log-probs computed once before training (dpo).
Both sides train the same weights (every stock adapter factor is copied into a project one, or the run
stops), on the same rows, with TRL's fused LM head (the [tokens, vocabulary] logits are never built whole).
Printed per mode: tokens/s (sft) or pairs/s (dpo) of each side and their ratio, peak GPU memory, model
FLOPs utilisation (FLOPs by formula: 6 x active parameters per token for full fine-tuning, 4 x for a frozen
base with adapters, plus attention; peak from --peak-tflops) and the largest difference between the two
sides' warm-up losses (fp32 full: 1e-6, LoRA with the same initial factors: 1e-5; bf16: the first step's
loss, see BF16_LOSS_TOLERANCE). With `packing` in
--modes it also prints the project's sft on chat-like mixed lengths (20-2,000 tokens), padded batches
against packed rows: real tokens/s, and the per-token log-probs of both layouts (equal to 1e-5).
"""

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
from trl import DPOConfig, DPOTrainer, ModelConfig, SFTConfig, SFTTrainer

from alignment import dpo, sft
from alignment.memory import JETMOE_8B
from alignment.models.experts import use_fast_experts
from alignment.models.router import MoEArgs
from alignment.models.tiny import build_tokenizer
from alignment.report import machine, write_between_markers
from alignment.train_common import DataArgs, load_student

# model shapes: config keys; `mid` is the 69M-parameter JetMoE of our CPU measurements, `micro` a smoke test,
# `mixtral` Mixtral-8x7B's published shape (transformers' fused experts), `mixtral-micro` its smoke test
SHAPES = {
    "micro": dict(hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    "mid": dict(hidden_size=512, num_hidden_layers=4, num_key_value_heads=8, kv_channels=64, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
    "jetmoe-8b": JETMOE_8B,
    "mixtral": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, rope_theta=1e6, tie_word_embeddings=False),
    "mixtral-micro": dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
}
# per device: dtype, sequence, batch (sequences: sft rows, dpo pairs x 2), torch threads
DEVICE_DEFAULTS = {"cpu": dict(dtype="float32", seq=256, batch=8, threads=2), "cuda": dict(dtype="bfloat16", seq=2048, batch=4, threads=None)}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, no sparsity
MODES = ["sft-full", "sft-lora", "sft-qlora", "dpo-full", "dpo-lora", "dpo-qlora"]
# LoRA targets per family, as (our lora_target_modules, stock PEFT target_modules, stock PEFT target_parameters):
# the same weights on both sides, every expert of every bank included
LORA = dict(r=16, alpha=32)
LORA_TARGETS = {
    "jetmoe": (["kv_proj", "input_linear", "output_linear"], ["kv_proj"], ["mlp.input_linear.weight", "mlp.output_linear.weight", "experts.input_linear.weight", "experts.output_linear.weight"]),
    "mixtral": (["q_proj", "k_proj", "v_proj", "o_proj", "experts"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}
LOSS_TOLERANCE = {"full": 1e-6, "lora": 1e-5, "qlora": None}  # fp32, every warm-up step; stock and project quantise differently
# bf16: the first step's loss (the forward before any update; grouped matmuls sum in another order than one
# matmul per expert). Later steps are printed, not judged: AdamW's first step moves each weight by about
# +-lr whatever its gradient's size, so gradient entries near zero whose sign differs in the last bits move
# by the full step, on bf16 weights only updates that survive rounding move at all, and DPO's summed log-prob
# margins (0.69 -> 2.9 in one step at the JetMoE-8B shape) amplify that. In fp32 the comparison holds at
# 1e-6 over every step.
BF16_LOSS_TOLERANCE = 2e-2


# ---------- model, data, FLOPs


def build_model_dir(shape: str, layers: int | None, out: Path, device: str, dtype: str):
    """Random-initialised model of `shape` saved in `dtype` at `out` (both sides load these exact weights).
    A model this script saved there before with the same shape, layers and dtype is reused (--model-dir):
    on a GPU, building and saving billions of weights takes longer than the timed steps."""
    tokenizer = build_tokenizer()
    keys = {"tie_word_embeddings": True, **SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    keys.setdefault("vocab_size", len(tokenizer))
    config = AutoConfig.for_model(keys.pop("model_type", "jetmoe"), **keys, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.02)
    made_by, wanted = out / "bench_model.json", {"shape": shape, "layers": config.num_hidden_layers, "dtype": dtype}
    if made_by.is_file() and json.loads(made_by.read_text()) == wanted:
        with torch.device("meta"):
            return config, sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    torch.manual_seed(0)
    with torch.device(device):  # random init of billions of weights is much faster on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    made_by.write_text(json.dumps(wanted))
    return config, sum(p.numel() for p in model.parameters())


def sft_rows(n: int, lengths: list[int], vocab: int, seed: int = 0) -> Dataset:
    """Token rows (no tokenizer needed: the model's vocabulary may be larger than the tiny tokenizer's)."""
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": [torch.randint(10, vocab, (lengths[i % len(lengths)],), generator=generator).tolist() for i in range(n)]})


def dpo_rows(n: int, seq: int, seed: int = 0) -> Dataset:
    """Text pairs; the byte-level tokenizer gives one token per letter, so a pair is exactly `seq` tokens per side."""
    generator = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def text(length):
        return "".join(letters[i] for i in torch.randint(0, 26, (length,), generator=generator).tolist())

    prompt_len = seq // 4
    return Dataset.from_list([{"prompt": text(prompt_len), "chosen": text(seq - prompt_len - 1), "rejected": text(seq - prompt_len - 1)} for _ in range(n)])


def attention_width(config) -> int:
    """Query heads x head dimension (JetMoE: top-k attention experts of kv-heads x kv_channels each)."""
    if config.model_type == "jetmoe":
        return config.num_experts_per_tok * config.num_key_value_heads * config.kv_channels
    return config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def active_params(config) -> int:
    """Parameters one token runs through (embedding lookup excluded; the output layer counted once)."""
    h, k, queries = config.hidden_size, config.num_experts_per_tok, attention_width(config)
    if config.model_type == "jetmoe":
        attention = 2 * h * queries // k + 2 * h * queries  # kv_proj, then query and output experts
        routers = 2 * h * config.num_local_experts
    else:  # q, k, v, o
        kv = config.num_key_value_heads * queries // config.num_attention_heads
        attention = 2 * h * queries + 2 * h * kv
        routers = h * config.num_local_experts
    mlp = k * 3 * h * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp + routers) + h * config.vocab_size


def train_flops_per_token(config, seq: int, adapters: bool) -> float:
    """6 x active parameters (full) or 4 x (frozen base: no weight gradients), plus attention scores and
    their weighted sum over the whole sequence (the PaLM convention), forward and backward."""
    attention = 3 * 4 * seq * attention_width(config) * config.num_hidden_layers
    return (4 if adapters else 6) * active_params(config) + attention


# ---------- the two sides


def family(model_dir) -> str:
    return AutoConfig.from_pretrained(model_dir).model_type


def lora_args(mode: str, dtype: str, model_dir: str) -> ModelConfig:
    kind = mode.split("-")[1]
    return ModelConfig(
        model_name_or_path=model_dir, dtype=dtype, attn_implementation="sdpa", use_peft=kind != "full",
        lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, lora_target_modules=LORA_TARGETS[family(model_dir)][0], load_in_4bit=kind == "qlora",
    )


def stock_model(mode: str, dtype: str, model_dir: str, device: str):
    use_fast_experts(False)
    kwargs = {}
    if mode.endswith("qlora"):
        from transformers import BitsAndBytesConfig

        # the 8-wide routers do not fit bitsandbytes' CPU blocks; they stay in full precision, as in our NF4 path
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=getattr(torch, dtype), llm_int8_skip_modules=["router", "lm_head"])
        kwargs["device_map"] = {"": 0} if device == "cuda" else None  # bitsandbytes quantises on the device it loads to
    if family(model_dir) != "jetmoe":
        kwargs["experts_implementation"] = "grouped_mm"  # transformers' fastest stock path for fused experts
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa", **kwargs)
    peft_config = None
    if not mode.endswith("full"):
        from peft import LoraConfig

        _, modules, parameters = LORA_TARGETS[family(model_dir)]
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=modules, target_parameters=parameters, task_type="CAUSAL_LM")
    return model, peft_config


def batch_of(stage: str, args) -> int:
    """Rows per step: `--batch` sequences for sft, half as many pairs for dpo (the same sequences per step)."""
    return args.batch if stage == "sft" else max(1, args.batch // 2)


def training_args(stage: str, side: str, args, steps: int):
    common = dict(
        output_dir=str(args.work / f"{stage}-{side}"), per_device_train_batch_size=batch_of(stage, args), max_steps=steps, learning_rate=1e-4 if stage == "sft" else 1e-5,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", seed=0, data_seed=0, use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16", gradient_checkpointing=False, dataloader_drop_last=True, disable_tqdm=True, max_length=args.seq + 1 if stage == "sft" else 2 * args.seq,
        router_aux_loss_coef=0.0,  # the same loss on both sides: stock TRL balances per batch, the project per sequence
    )
    if side == "project" and getattr(args, "compile", False):
        common["torch_compile"] = True
    if stage == "sft":
        project = dict(padding_free=True, packing=True, packing_strategy="bfd") if side == "project" and args.packed else {}
        return SFTConfig(**common, **project)
    project = dict(precompute_ref_log_probs=True, precompute_ref_batch_size=batch_of(stage, args)) if side == "project" else {}
    return DPOConfig(**common, beta=0.1, **project)


def time_reference_pass(trainer_cls):
    """Record on the trainer how long DPO's precomputed reference pass took (it runs inside __init__)."""
    original = trainer_cls._precompute_ref_logps

    def timed(self, *a, **k):
        started = time.perf_counter()
        out = original(self, *a, **k)
        self.reference_seconds = getattr(self, "reference_seconds", 0.0) + time.perf_counter() - started
        return out

    trainer_cls._precompute_ref_logps = timed


time_reference_pass(dpo.MoEDPOTrainer)


def build_trainer(mode: str, side: str, args, data: Dataset):
    stage = mode.split("-")[0]
    steps = args.steps
    targs = training_args(stage, side, args, steps)
    if side == "stock":
        model, peft_config = stock_model(mode, args.dtype, str(args.model_dir), args.device)
        cls = SFTTrainer if stage == "sft" else DPOTrainer
        trainer = cls(model=model, args=targs, train_dataset=data, processing_class=build_tokenizer(), peft_config=peft_config)
    else:
        use_fast_experts(True)
        model, tokenizer, peft_config = load_student(lora_args(mode, args.dtype, str(args.model_dir)), DataArgs())
        trainer = (sft if stage == "sft" else dpo).build_trainer(model, tokenizer, peft_config, targs, data, MoEArgs())
    return timed_and_recorded(trainer)


def timed_and_recorded(trainer):
    """The trainer with its step times (StepTimer) and each training step's loss in `trainer.losses`."""
    trainer.add_callback(StepTimer())
    trainer.losses = []
    original = trainer.training_step

    def recorded(*a, **k):
        loss = original(*a, **k)
        trainer.losses.append(loss.item())
        return loss

    trainer.training_step = recorded
    return trainer


def same_initial_adapters(stock, project):
    """Copy the stock adapters' random A (and B) factors into ours, so both start from the same model.
    Every factor of ours must receive one: otherwise the two sides would not train the same weights."""
    ours = {name: p for name, p in project.model.named_parameters() if "lora_" in name}
    copied = set()
    with torch.no_grad():
        for name, module in stock.model.named_modules():
            if "default" not in getattr(module, "lora_A", {}):
                continue
            for factor in ("lora_A", "lora_B"):
                key, value = f"{name}.{factor}.default.weight", getattr(module, factor)["default"].weight
                if key not in ours:
                    continue
                if ours[key].dim() == 3:  # our JetMoE expert LoRA, A [E, r, in] and B [E, out, r], from PEFT's A [E*r, in] and B [out, r*E]
                    e = module.num_experts
                    value = value.reshape(e, -1, value.shape[-1]) if factor == "lora_A" else value.reshape(value.shape[0], -1, e).permute(2, 0, 1)
                ours[key].copy_(value.to(ours[key].dtype))
                copied.add(key)
    if copied != set(ours):
        raise SystemExit(f"error: the stock and project adapters differ: ours without a stock counterpart: {sorted(set(ours) - copied)[:4]}")
    return len(copied)


class StepTimer(TrainerCallback):
    """Seconds per optimizer step: forward, backward and the optimizer, without data set-up or logging; and
    the process's CPU seconds in it (on a shared CPU, waiting for a core inflates the first, not the second)."""

    def __init__(self):
        self.times, self.cpu_times, self.started = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.started = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.started[0])
        self.cpu_times.append(time.process_time() - self.started[1])


def timer(trainer) -> StepTimer:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer))


def run_round(trainer, side: str, args) -> float:
    """One train() of trainer.args.max_steps steps; returns the peak GPU memory in GiB (None on the CPU)."""
    use_fast_experts(side == "project")  # the class-level swap is process-wide: set it for whoever runs now
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None


# ---------- one mode


def bitsandbytes_usable(device: str) -> str | None:
    """None if 4-bit works on this device, else why not."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(torch.randn(64, 64, device=device), blocksize=64, quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as err:  # a missing CUDA build or library reads differently on every machine
        return f"bitsandbytes cannot run on {device} ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return None


def run_mode(mode: str, args, config) -> dict:
    stage, kind = mode.split("-")
    if kind == "qlora" and (why := bitsandbytes_usable(args.device)):
        print(f"[{mode}] skipped: {why}")
        return {"mode": mode, "skipped": why}
    batch = batch_of(stage, args)
    rows = batch * args.steps
    data = sft_rows(rows, [args.seq], config.vocab_size) if stage == "sft" else dpo_rows(rows, args.seq)
    trainers = {side: build_trainer(mode, side, args, data) for side in ("stock", "project")}
    copied = same_initial_adapters(trainers["stock"], trainers["project"]) if kind != "full" else 0
    memory = {"stock": 0.0, "project": 0.0}
    first_losses = {}
    for side in ("stock", "project"):  # warm-up (allocator, kernels, optimizer state), and the losses compared
        run_round(trainers[side], side, args)
        first_losses[side] = list(trainers[side].losses)
        timer(trainers[side]).times.clear()
        timer(trainers[side]).cpu_times.clear()
        trainers[side].args.max_steps = 1
    paired, paired_cpu = [], []
    for round_ in range(args.rounds):  # one step each, in alternating order: both sides see the same machine load
        for side in ("stock", "project") if round_ % 2 == 0 else ("project", "stock"):
            peak = run_round(trainers[side], side, args)
            if peak is not None:
                memory[side] = max(memory[side], peak)
        paired.append(timer(trainers["stock"]).times[-1] / timer(trainers["project"]).times[-1])
        paired_cpu.append(timer(trainers["stock"]).cpu_times[-1] / timer(trainers["project"]).cpu_times[-1])
    step = {side: statistics.median(timer(t).times) for side, t in trainers.items()}
    units = batch * (args.seq if stage == "sft" else 1)
    per_s = {side: units / s for side, s in step.items()}
    # the ratio is the median of adjacent steps' ratios, which a busy machine disturbs far less than either median
    result = {"mode": mode, "unit": "tokens/s" if stage == "sft" else "pairs/s", "stock": per_s["stock"], "project": per_s["project"], "ratio": statistics.median(paired), "paired_ratios": paired}
    if args.device == "cpu":  # the same ratio in CPU seconds: what each side costs, whatever else runs on the machine
        result["cpu_seconds_ratio"] = statistics.median(paired_cpu)
    if stage == "dpo":  # the reference pass moved before training: count it, spread over one epoch of the data
        batches = len(data) // batch
        result["project_incl_reference_pass"] = units / (step["project"] + getattr(trainers["project"], "reference_seconds", 0.0) / batches)
        result["ratio_incl_reference_pass"] = result["ratio"] * step["project"] / (step["project"] + getattr(trainers["project"], "reference_seconds", 0.0) / batches)
    tokens_per_step = batch * args.seq * (1 if stage == "sft" else 2)
    flops = train_flops_per_token(config, args.seq, adapters=kind != "full") * tokens_per_step
    result["tflops"] = {side: flops / s / 1e12 for side, s in step.items()}
    if args.peak_tflops:
        result["mfu"] = {side: tf / args.peak_tflops for side, tf in result["tflops"].items()}
    if args.device == "cuda":
        result["peak_memory_gib"] = memory
    diffs = [abs(a - b) for a, b in zip(first_losses["stock"], first_losses["project"])]
    result["losses"] = first_losses
    result["max_loss_diff"] = max(diffs) if diffs else None
    result["first_loss_diff"] = diffs[0] if diffs else None
    if args.dtype == "float32" or kind == "qlora":
        result["losses_equal"] = None if LOSS_TOLERANCE[kind] is None else result["max_loss_diff"] <= LOSS_TOLERANCE[kind]
    else:
        result["losses_equal"] = result["first_loss_diff"] <= BF16_LOSS_TOLERANCE
    if kind != "full":
        result["adapters_copied"] = copied
    print_mode(result)
    if args.profile:
        print_profile(trainers["project"], args)
    free(trainers)
    return result


def print_profile(trainer, args):
    """One more project step under torch.profiler: its top operators by time on the device (by CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities, record_shapes=os.environ.get("PROFILE_SHAPES") == "1") as prof:
        run_round(trainer, "project", args)
    sort_by = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages(group_by_input_shape=os.environ.get("PROFILE_SHAPES") == "1").table(sort_by=sort_by, row_limit=int(os.environ.get("PROFILE_ROWS", 25)), max_name_column_width=60), flush=True)


def free(trainers: dict):
    """Let the next mode have the memory: trainers hold their models, optimizers and data loaders in cycles."""
    trainers.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_mode(r: dict):
    line = f"[{r['mode']}] stock {r['stock']:.4g} {r['unit']}, project {r['project']:.4g}: {r['ratio']:.2f}x"
    if "cpu_seconds_ratio" in r:
        line += f" (in CPU seconds {r['cpu_seconds_ratio']:.2f}x)"
    if "ratio_incl_reference_pass" in r:
        line += f" ({r['ratio_incl_reference_pass']:.2f}x counting the reference pass once per epoch)"
    line += f"; TFLOP/s {r['tflops']['stock']:.3f} / {r['tflops']['project']:.3f}"
    if "mfu" in r:
        line += f", MFU {100 * r['mfu']['stock']:.1f}% / {100 * r['mfu']['project']:.1f}%"
    if "peak_memory_gib" in r:
        line += f", peak {r['peak_memory_gib']['stock']:.2f} / {r['peak_memory_gib']['project']:.2f} GiB"
    equal = {True: "equal", False: "NOT EQUAL", None: "not compared"}[r["losses_equal"]]
    line += f"; losses {equal} (max diff {r['max_loss_diff']:.1e}, first step {r['first_loss_diff']:.1e})"
    print(line, flush=True)


# ---------- packing


def chat_lengths(n: int, low: int = 20, high: int = 2000, seed: int = 0) -> list[int]:
    """Log-uniform lengths: many short conversations, a few long ones, as in chat data."""
    generator = torch.Generator().manual_seed(seed)
    return [int(low * (high / low) ** u) for u in torch.rand(n, generator=generator).tolist()]


def per_token_log_probs(model, batch: dict) -> torch.Tensor:
    """Log-probabilities of the batch's labels at the positions whose label is not -100, in order."""
    batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}  # the collator builds its tensors on the CPU
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep]


def run_packing(args, config, conversations: int = 24, max_length: int = 2048) -> dict:
    """Project sft on chat-like mixed lengths: padded batches against packed rows (best-fit decreasing, padding-free).
    Real (non-padding) tokens per second of step time over one epoch of the same conversations."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    lengths = chat_lengths(conversations)
    data = sft_rows(conversations, lengths, config.vocab_size)
    real_tokens = sum(lengths)
    common = dict(per_device_train_batch_size=args.batch, learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                  seed=0, use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", num_train_epochs=1, disable_tqdm=True, max_length=max_length)
    variants = {"padded": SFTConfig(output_dir=str(args.work / "padded"), **common),
                "packed": SFTConfig(output_dir=str(args.work / "packed"), **{**common, "per_device_train_batch_size": 1}, packing=True, packing_strategy="bfd")}
    use_fast_experts(True)
    seconds = {}
    for name, targs in variants.items():
        model, tokenizer, _ = load_student(lora_args("sft-full", args.dtype, str(args.model_dir)), DataArgs())
        trainer = sft.build_trainer(model, tokenizer, None, targs, data, MoEArgs())
        trainer.add_callback(StepTimer())
        trainer.train()
        seconds[name] = sum(timer(trainer).times)
        if name == "packed":  # the same conversations, padded and packed: per-token losses must agree
            model.eval().float()  # compared in fp32, so that the check sees the layout and not bf16 rounding
            rows = [{"input_ids": r} for r in data[: args.batch]["input_ids"]]
            padded = per_token_log_probs(model, DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows))
            packed = per_token_log_probs(model, DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows))
            # padding-free drops the label of each sequence's first token; so does the shifted padded batch
            diff = (padded - packed).abs().max().item()
        del trainer, model
        gc.collect()
    per_s = {name: real_tokens / s for name, s in seconds.items()}
    result = {"mode": "packing", "unit": "real tokens/s", "lengths": f"{conversations} conversations, {min(lengths)}-{max(lengths)} tokens (log-uniform 20-2000), {real_tokens} tokens",
              "padded": per_s["padded"], "packed": per_s["packed"], "ratio": per_s["packed"] / per_s["padded"], "max_per_token_logprob_diff": diff, "losses_equal": diff <= 1e-5}
    print(f"[packing] {result['lengths']}: padded batch {per_s['padded']:.1f} real tokens/s, packed {per_s['packed']:.1f}: {result['ratio']:.2f}x; "
          f"per-token log-probs packed vs padded: max diff {diff:.1e} ({'equal' if result['losses_equal'] else 'NOT EQUAL'})", flush=True)
    return result


# ---------- report


def markdown_table(results: list[tuple[dict, dict]], header: str) -> str:
    """One row per (setting, result): the mode, and the model when the runs used more than one."""
    models = {f"{model_name(setting['shape'])}, {setting['layers']} layers" for setting, _ in results}
    lines = [header, "", "| mode | stock | project | ratio | losses (max difference) | TFLOP/s stock / project | MFU stock / project | peak GiB stock / project |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for setting, r in results:
        mode = f"{r['mode']} ({model_name(setting['shape'])}, {setting['layers']} layers)" if len(models) > 1 else r["mode"]
        if "--compile" in setting.get("command", ""):
            mode += ", project under torch.compile"
        if "skipped" in r:
            lines.append(f"| {mode} | | | skipped: {r['skipped']} | | | | |")
            continue
        equal = {True: "equal", False: "NOT equal", None: "not compared"}[r["losses_equal"]]
        if r["mode"] == "packing":
            lines.append(f"| sft packed vs padded: {r['lengths']} | padded {r['padded']:.4g} {r['unit']} | packed {r['packed']:.4g} | **{r['ratio']:.2f}x** | per-token {equal} ({r['max_per_token_logprob_diff']:.1e}) | | | |")
            continue
        ratio = f"**{r['ratio']:.2f}x**"
        if "cpu_seconds_ratio" in r:
            ratio += f" ({r['cpu_seconds_ratio']:.2f}x in CPU seconds)"
        if "ratio_incl_reference_pass" in r:
            ratio += f" ({r['ratio_incl_reference_pass']:.2f}x counting the reference pass)"
        tflops = f"{r['tflops']['stock']:.3f} / {r['tflops']['project']:.3f}"
        mfu = f"{100 * r['mfu']['stock']:.1f}% / {100 * r['mfu']['project']:.1f}%" if "mfu" in r else "n/a"
        memory = f"{r['peak_memory_gib']['stock']:.2f} / {r['peak_memory_gib']['project']:.2f}" if "peak_memory_gib" in r else "n/a"
        # bf16 runs are judged at the first step (README: AdamW's first update in bf16 parts the later steps)
        judged = f"{equal} at step 1 ({r['first_loss_diff']:.1e}); all steps {r['max_loss_diff']:.1e}" if setting["dtype"] == "bfloat16" and "first_loss_diff" in r else f"{equal} ({r['max_loss_diff']:.1e})"
        if r["mode"].startswith("dpo") and setting["dtype"] == "bfloat16":  # DPO's first loss is log 2 on both sides whatever the model
            judged = f"not judged: step 1 is log 2 on both sides by construction; later steps differ by up to {r['max_loss_diff']:.1e}"
        lines.append(f"| {mode} | {r['stock']:.4g} {r['unit']} | {r['project']:.4g} | {ratio} | {judged} | {tflops} | {mfu} | {memory} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=sorted(DEVICE_DEFAULTS), default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: mid on cpu, jetmoe-8b on cuda")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (throughput ratios and MFU are per-layer properties)")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="steps of the warm-up round, whose losses are compared")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds of one step per side, after the warm-up")
    parser.add_argument("--modes", default="sft-full,sft-lora,dpo-lora")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak; default from the GPU's name")
    parser.add_argument("--no-packed", dest="packed", action="store_false", help="project sft without padding-free batches")
    parser.add_argument("--model-dir", dest="model_dir_arg", type=Path, default=None, help="keep the random model here and reuse it in later runs of the same shape, layers and dtype")
    parser.add_argument("--compile", action="store_true", help="the project side with torch.compile (TrainingArguments.torch_compile)")
    parser.add_argument("--profile", action="store_true", help="after the timed rounds, profile one project step and print its top operators")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="write the table as markdown")
    parser.add_argument("--readme", type=Path, default=None, help="put the table into this file between <!-- train_throughput:DEVICE --> markers")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None, help="no run: write the table of earlier runs' --json files")
    args = parser.parse_args()
    if args.from_json:
        return write_tables(args)
    defaults = DEVICE_DEFAULTS[args.device]
    args.shape = args.shape or ("mid" if args.device == "cpu" else "jetmoe-8b")
    for key in ("dtype", "seq", "batch", "threads"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({machine()['device']}), {torch.get_num_threads()} threads"
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES and m != "packing"]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {MODES + ['packing']}")
    with tempfile.TemporaryDirectory() as tmp:
        args.work, args.model_dir = Path(tmp), Path(tmp) / "model"
        args.model_dir = args.model_dir_arg or args.model_dir
        config, n_params = build_model_dir(args.shape, args.layers, args.model_dir, args.device, args.dtype)
        print(f"{device_name}; torch {torch.__version__}; {model_name(args.shape)}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
              f"vocab {config.vocab_size}, {active_params(config) / 1e6:.1f}M active parameters of {n_params / 1e6:.1f}M; {args.dtype}, seq {args.seq}, "
              f"batch {args.batch} sequences (dpo: {batch_of('dpo', args)} pairs), {args.steps} warm-up steps, {args.rounds} timed steps per side", flush=True)
        results = []
        for mode in modes:
            if mode == "packing":
                results.append(run_packing(args, config))
            else:
                results.append(run_mode(mode, args, config))
    setting = {"command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]), "device": device_name, "shape": args.shape, "layers": config.num_hidden_layers, "dtype": args.dtype, "seq": args.seq, "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__}
    if args.json:
        args.json.write_text(json.dumps({"setting": setting, "results": results}, indent=2))
    write_outputs(args, [{"setting": setting, "results": results}])


def model_name(shape: str) -> str:
    return f"Mixtral-style {shape}" if shape.startswith("mixtral") else f"JetMoE {shape}"


def describe(setting: dict) -> str:
    pairs = max(1, setting["batch"] // 2)
    command = f": `{setting['command']}`" if "command" in setting else ""
    return (f"{setting['device']}, {model_name(setting['shape'])} ({setting['layers']} layers), {setting['dtype']}, seq {setting['seq']}, batch {setting['batch']} sequences "
            f"(dpo: {pairs} pairs); {setting['rounds']} timed steps per side, alternating, after {setting['steps']} warm-up steps whose losses are compared; ratio = median of adjacent steps' ratios{command}")


def write_outputs(args, runs: list[dict]):
    header = "\n".join(f"- {describe(run['setting'])}" for run in runs)
    table = markdown_table([(run["setting"], r) for run in runs for r in run["results"]], header)
    if args.markdown:
        args.markdown.write_text(table)
    if args.readme:
        device = "cuda" if any("CPU" not in run["setting"]["device"] for run in runs) else "cpu"
        write_between_markers(args.readme, f"train_throughput:{device}", table)


def write_tables(args):
    runs = [json.loads(path.read_text()) for path in args.from_json]
    write_outputs(args, runs)


if __name__ == "__main__":
    main()
