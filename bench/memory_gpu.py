"""Measured peak memory of QLoRA training against `estimate-memory`'s prediction.

usage (a CUDA machine, bitsandbytes installed):
  python bench/memory_gpu.py                       # OLMoE-1B-7B, real size, through the sft stage (default)
  python bench/memory_gpu.py --tiny                # the same path on a tiny OLMoE, on the CPU too (a check of the script)
  python bench/memory_gpu.py --layers 2            # real widths, 2 of the 16 layers: runs on the CPU (about 5 minutes)
  python bench/memory_gpu.py --model jetmoe-8b     # JetMoE-8B built in memory, dSFT and dDPO steps (the older check)

OLMoE-1B-7B: a random-initialised model of the published shape (alignment.memory.OLMOE_1B_7B, 6.9B
parameters) is written as bf16 safetensors shards by a child process (so its memory is not counted),
with the project's tokenizer. Then, in this process, `smoe-align sft --config recipes/olmoe-1b-7b/sft/qlora.yaml`
runs as a user runs it (only paths changed, 2 optimizer steps of one packed 2,048-token row, no
accumulation): load_student reads the shards (4-bit nn.Linear through transformers, NF4 experts), TRL's
SFTTrainer trains. Printed as JSON:
  peak_gib            torch.cuda.max_memory_allocated from before the first byte is read to the end of the
                      second AdamW step (the estimate predicts this; the issue asks for within 15%)
  loading_peak_gib    the same while load_student runs (must stay below the training peak)
  training_peak_gib   the same from the end of loading on
  loading_rss_gib     growth of this process's peak resident CPU memory while loading (ru_maxrss: it
                      counts the checkpoint pages transformers maps, which the kernel can drop)
  loading_anonymous_gib  the same for the memory the process owns (RssAnon, sampled every 20 ms)
  predicted_gib       estimate-memory's total for the same recipe, and the ratio measured / predicted
  segments_gib        per segment (loading; setup: trainer, adapters, optimizer; forward, backward and AdamW
                      step of steps 1 and 2): what is allocated at its end and its own peak
  measured_parts_gib  from those: weights after loading, what training holds (weights, adapters, gradients,
                      AdamW states), the activations' peak above that, and what outlived backward;
                      beside estimate_parts_gib, the estimate's own components
On the CPU "allocated" is the live tensor bytes of bench/live_memory.py, which also breaks each segment's
peak down by what made it (cpu_segments_gib), with TRL's LM head folded in small blocks as its GPU kernel
does (its CPU fallback makes fp32 copies of whole logits tiles that a GPU never holds).
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment.memory import GIB, MemoryArgs, OLMOE_1B_7B, run_estimate  # noqa: E402

RECIPE = ROOT / "recipes/olmoe-1b-7b/sft/qlora.yaml"
TINY = dict(OLMOE_1B_7B, vocab_size=512, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2)


def write_checkpoint(path: Path, tiny: bool, layers: int | None = None):
    """Random-init OLMoE of the published (or tiny) shape as safetensors shards, and the project's tokenizer."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    from alignment.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    shape = dict(TINY if tiny else OLMOE_1B_7B, **({"num_hidden_layers": layers} if layers else {}))
    config = OlmoeConfig(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # built in bf16 directly: no fp32 copy of 6.9B parameters
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")
    tokenizer.save_pretrained(path)


def conversations(path: Path, rows: int):
    """Chat rows of about 1,000 tokens each (one token per character): packed two to a 2,048-token row."""
    answer = " ".join(str(i % 97) for i in range(330))
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count {i}"}, {"role": "assistant", "content": answer}]}) + "\n")


class Meter:
    """Allocated bytes now and the peak of each segment: torch.cuda's counters on a GPU; on the CPU the
    live tensor bytes of bench/live_memory.py (the same quantity, without the allocator's caching)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.live = None
        if not self.cuda:
            from bench.live_memory import LiveTensorBytes, gpu_like_lm_head

            self.live = LiveTensorBytes()
            gpu_like_lm_head()  # the LM head's temporaries as small as the GPU kernel's
        self.segments: list[tuple[str, float, float]] = []  # (segment, allocated at its end, peak within it)
        self.held = 0.0  # what has a role at the last optimizer step (measure_steps)

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        else:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)

    def allocated(self) -> float:
        return torch.cuda.memory_allocated() / GIB if self.cuda else self.live.current / GIB

    def end(self, segment: str):
        """Close the segment that ran since the last call: what is allocated now, and its peak."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
        else:
            peak = self.live.next_segment(segment) / GIB
        self.segments.append((segment, self.allocated(), peak))
        if self.live:
            self.live.phase = segment + "+"  # what runs next is made after this segment

    def peak(self, *names) -> float:
        return max(p for s, _, p in self.segments if not names or s in names)


def measure_steps(trainer, meter: Meter):
    """Segments of the first two steps: forward (compute_loss), backward, optimizer step."""
    from transformers import TrainerCallback

    step = {"n": 0}

    class Segments(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.end("setup")  # trainer, adapters, optimizer built (its states come at the first step)

        def on_step_begin(self, args, state, control, **kwargs):
            step["n"] += 1
            meter.end(f"between steps {step['n']}") if step["n"] > 1 else None
            mark(f"forward {step['n']}")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            meter.end(f"backward {step['n']}")
            mark(f"optimizer {step['n']}")

        def on_optimizer_step(self, args, state, control, **kwargs):
            meter.end(f"optimizer {step['n']}")
            meter.held = held_bytes(trainer) / GIB  # gradients still alive here

    def mark(segment):
        if meter.live:
            meter.live.phase = segment

    compute_loss = trainer.compute_loss

    def measured_compute_loss(*args, **kwargs):
        if meter.live:
            meter.live.name_modules(trainer.model)
        out = compute_loss(*args, **kwargs)
        meter.end(f"forward {step['n']}")
        mark(f"backward {step['n']}")
        return out

    trainer.compute_loss = measured_compute_loss
    trainer.add_callback(Segments())
    if meter.live:
        meter.live.categorize = lambda: roles(trainer)


def held_bytes(trainer) -> int:
    """Bytes of the storages that have a role (weights, adapters, gradients, AdamW states, NF4 scales)."""
    return sum(storage.nbytes() for _, storage in roles(trainer, storages=True).values())


def roles(trainer, storages: bool = False) -> dict:
    """id(storage) -> what it is (and the storage), for the storages that have a role: weights, adapters,
    gradients, optimizer states."""
    named = {}

    def put(tensor, label):
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
            storage = tensor.untyped_storage()
            named.setdefault(id(storage), (label, storage) if storages else label)

    for p in trainer.model.parameters():
        if p.grad is not None:
            put(p.grad, f"gradients {str(p.grad.dtype).removeprefix('torch.')}")
        put(p, f"{'adapters' if p.requires_grad else 'frozen weights'} {str(p.dtype).removeprefix('torch.')}")
    for b in trainer.model.buffers():
        put(b, "buffers (NF4 scales, rotary)")
    for module in trainer.model.modules():  # bitsandbytes Linear4bit: scales held in its quant state
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for t in (state.absmax, getattr(state.state2, "absmax", None) if state.nested else None, state.offset if state.nested else None):
                put(t, "buffers (NF4 scales, rotary)")
    if trainer.optimizer is not None:
        for state in trainer.optimizer.state.values():
            for t in state.values():
                put(t, f"optimizer states {str(t.dtype).removeprefix('torch.')}" if t.dim() else "optimizer states")
    return named


def estimate_parts(checkpoint: Path, layers: int) -> dict:
    """estimate-memory's own figures for this recipe and checkpoint, component by component (GiB)."""
    from alignment.configs import resolve

    recipe = resolve(RECIPE, {"model_name_or_path": str(checkpoint)})
    result = run_estimate(recipe, MemoryArgs(seq_len=2048, batch_size=1))
    e, config = result["estimates"]["qlora"], result["config"]
    inputs = config.num_hidden_layers * 2048 * config.hidden_size * 2 / GIB
    return {k: round(v, 3) for k, v in dict(weights=e["weights"], gradients=e["gradients"], optimizer=e["optimizer"], activations=e["activations"], layer_inputs=inputs, one_layer=e["layer"], lm_head=e["logits"], routers=e["routers"], total=e["total"], with_margin=e["with_margin"]).items()}


class AnonymousPeak:
    """Peak growth of this process's anonymous resident memory (RssAnon: what it owns, not the checkpoint
    pages it maps, which ru_maxrss counts too), sampled every 20 ms on a thread."""

    def __enter__(self):
        import threading

        self.start = self.peak = self.read()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.growth_gib = (max(self.peak, self.read()) - self.start) / GIB

    def sample(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.read())

    @staticmethod
    def read() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0


def olmoe(tiny: bool, keep: str | None, layers: int | None):
    import alignment.sft as sft
    from alignment.cli import main as cli

    work = Path(keep or tempfile.mkdtemp(prefix="olmoe-bench-"))
    checkpoint, data = work / f"olmoe-1b-7b-random{'-tiny' if tiny else ''}{f'-{layers}l' if layers else ''}", work / "rows.jsonl"
    started = time.time()
    if not (checkpoint / "config.json").is_file():  # a child process: its memory is not this process's
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; from bench.memory_gpu import write_checkpoint; write_checkpoint(Path({str(checkpoint)!r}), {tiny}, {layers})"
        subprocess.run([sys.executable, "-c", code], check=True)
    conversations(data, 8)
    shutil.rmtree(work / "out", ignore_errors=True)  # else the stage skips a run it finds complete
    made = time.time() - started

    record, meter = {}, Meter()
    load_student, build_trainer = sft.load_student, sft.build_trainer

    def measured_load(*args, **kwargs):  # the stage's own loading, between two readings
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with AnonymousPeak() as anonymous:
            out = load_student(*args, **kwargs)
        record["loading_anonymous_gib"] = anonymous.growth_gib
        if meter.live:
            meter.live.adopt_live("loaded (mmapped)")  # weights read from the checkpoint without a copy: on a GPU they would be copies
        meter.end("loading")
        record["loading_rss_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024**2  # KiB on Linux
        return out

    def measured_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        measure_steps(trainer, meter)
        return trainer

    sft.load_student, sft.build_trainer = measured_load, measured_trainer
    overrides = {"model_name_or_path": str(checkpoint), "dataset_path": str(data), "dataset_mixture": "null", "output_dir": str(work / "out"), "max_steps": 2, "gradient_accumulation_steps": 1, "logging_steps": 1, "report_to": "none", "save_strategy": "no"}
    if not torch.cuda.is_available():
        overrides["use_cpu"] = "true"
    trained = time.time()
    with meter:
        code = cli(["sft", "--config", str(RECIPE), *[x for k, v in overrides.items() for x in (f"--{k}", str(v))]])
        if code != 0:
            raise SystemExit(f"the sft stage failed (exit {code})")
        meter.end("after training")
    sft.load_student, sft.build_trainer = load_student, build_trainer

    record["loading_peak_gib"] = meter.peak("loading")
    record["training_peak_gib"] = max(p for s, _, p in meter.segments if s != "loading")
    record["peak_gib"] = meter.peak()
    predicted = estimate_parts(checkpoint, layers)
    record.update(predicted_gib=predicted["total"], predicted_with_margin_gib=predicted["with_margin"])
    record["ratio"] = round(record["peak_gib"] / predicted["total"], 3)
    record["loading_below_training"] = record["loading_peak_gib"] < record["training_peak_gib"]
    record["segments_gib"] = {s: {"allocated_at_end": round(a, 3), "peak": round(p, 3)} for s, a, p in meter.segments}  # one line each when printed
    ends, held = {s: a for s, a, _ in meter.segments}, meter.held  # held: weights, adapters, their gradients and AdamW states
    record["measured_parts_gib"] = {  # beside estimate_parts_gib
        "weights_after_loading": round(ends["loading"], 3),
        "weights_adapters_gradients_adamw": round(held, 3),
        "activations_peak": round(meter.peak("forward 2", "backward 2") - held, 3),
        "left_after_backward": round(ends["backward 2"] - held, 3),  # ~0 unless something outlives its backward
    }
    record["estimate_parts_gib"] = predicted
    if meter.live:
        record["cpu_peak_phase"] = meter.live.peak_phase
        gib = lambda parts: {k: round(v / GIB, 3) for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 4 * 2**20}  # noqa: E731
        record["cpu_peak_breakdown_gib"] = gib(meter.live.peak_breakdown)
        record["cpu_segments_gib"] = {s: {"peak": gib(b["peak"]), "end": gib(b["end"])} for s, b in meter.live.segments.items() if s.endswith("2") or s == "loading"}
    record.update(checkpoint_seconds=round(made, 1), stage_seconds=round(time.time() - trained, 1), tiny=tiny, layers=layers, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (live tensor bytes)")
    print(compact_json({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}))


def compact_json(record: dict) -> str:
    """JSON with each key's value on one line, and each segment's on its own: short enough to read in a log tail."""
    def value(v, indent):
        if isinstance(v, dict) and any(isinstance(x, dict) for x in v.values()):
            inner = ",\n".join(f"{indent}  {json.dumps(k)}: {json.dumps(x)}" for k, x in v.items())
            return "{\n" + inner + "\n" + indent + "}"
        return json.dumps(v)

    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {value(v, '  ')}" for k, v in record.items()) + "\n}"


def jetmoe(layers: int, seq: int):
    """JetMoE-8B built in memory (no loading path), NF4 banks, expert LoRA r16, dSFT and dDPO steps, the
    loss through TRL's fused LM head as the trainers compute it (on the CPU only as a check of the script)."""
    from peft import LoraConfig, get_peft_model
    from transformers import JetMoeConfig, JetMoeForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from alignment.memory import JETMOE_8B, estimate, lora_adapter, parameter_counts
    from alignment.models.experts import use_fast_experts
    from alignment.models.lora import expert_lora_config
    from alignment.models.quant import quantize_experts

    use_fast_experts()
    config = JetMoeConfig(**{**JETMOE_8B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = JetMoeForCausalLM(config).to(torch.bfloat16)
    quantize_experts(model, torch.bfloat16)
    add_fused_lm_head(model)  # before PEFT wraps it, as SFTTrainer / DPOTrainer do
    model.supports_gradient_checkpointing = True
    model.config._attn_implementation = "sdpa"
    targets = ["kv_proj", "input_linear", "output_linear"]
    model = get_peft_model(model, expert_lora_config(LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM")))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    counts, adapter = parameter_counts(config), lora_adapter(config, {"use_peft": True, "lora_r": 16, "lora_target_modules": targets}, quantized=True)
    cuda = device == "cuda"
    results = {"layers": layers, "seq": seq, "weights_gib": torch.cuda.memory_allocated() / GIB if cuda else None}
    for stage, batch in (("sft", 1), ("dpo", 2)):
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
        for _ in range(2):  # the second step is measured: optimizer states exist, the allocator has settled
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with torch.autocast(device, dtype=torch.bfloat16):
                if stage == "dpo":  # the reference: the same model with its adapter off, no graph
                    with torch.no_grad(), model.disable_adapter():
                        model(input_ids=ids, labels=ids, fused_lm_head=True)
                model(input_ids=ids, labels=ids, fused_lm_head=True).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        predicted = estimate(config, counts, "qlora", stage, seq, 1, True, adapter)
        measured = torch.cuda.max_memory_allocated() / GIB if cuda else None
        results[stage] = {"measured_peak_gib": measured and round(measured, 2), "predicted_gib": round(predicted["total"], 2), "ratio": measured and round(measured / predicted["total"], 3), "predicted_with_margin_gib": round(predicted["with_margin"], 2)}
    print(json.dumps(results, indent=2))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["olmoe-1b-7b", "jetmoe-8b"], default="olmoe-1b-7b")
    parser.add_argument("--tiny", action="store_true", help="a tiny OLMoE through the same path (runs on the CPU)")
    parser.add_argument("--workdir", help="keep the checkpoint here and reuse it on the next run")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (jetmoe-8b: 24; olmoe-1b-7b: its 16, fewer for a run at real widths on the CPU)")
    parser.add_argument("--seq", type=int, default=2048, help="jetmoe-8b only")
    args = parser.parse_args()
    if args.model == "jetmoe-8b":
        jetmoe(args.layers or 24, args.seq)
    else:
        olmoe(args.tiny, args.workdir, args.layers)


if __name__ == "__main__":
    main()
