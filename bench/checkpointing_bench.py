"""Activation checkpointing policies side by side: step time and peak memory of none / full / selective / a list of op kinds.

usage: python bench/checkpointing_bench.py [--shape mid] [--stage sft|dpo] [--seq N] [--batch N] [--rounds N]
           [--policies none,full,selective,attention,grouped_matmul+attention] [--threads N]

The project's sft (or dpo) trainer on the random-initialised JetMoE of bench/train_throughput.py (mid: 69M
parameters, fp32 on the CPU), full fine-tuning, the same rows and seed for every policy. One warm-up step
each, then --rounds timed optimizer steps, one step per policy per round in rotating order, so that the load
of a shared machine falls on all alike; the ratio to `full` is the median of the per-round ratios, in wall
clock and in CPU seconds. Memory, from torch.profiler's memory events of one more step: the bytes torch's
CPU allocator holds when the forward ends (what is kept for backward) and at the step's peak (gradients
included), above what it held when the step began. The first step's losses must be equal across policies.
`none` is no checkpointing, `full` whole-layer checkpointing (transformers'), the others
`activation_checkpointing_policy` (alignment.models.checkpointing; a list joined by +).
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_throughput as bench  # noqa: E402
from alignment import dpo, sft  # noqa: E402
from alignment.models.checkpointing import CheckpointingArgs  # noqa: E402
from alignment.models.router import MoEArgs  # noqa: E402
from alignment.train_common import DataArgs, load_student  # noqa: E402

FORWARD_END = "checkpointing_bench::forward_end"


def policy_args(policy: str) -> CheckpointingArgs | None:
    if policy == "none":
        return None
    kinds = policy.split("+")
    return CheckpointingArgs(kinds[0] if len(kinds) == 1 else kinds)


def build(policy: str, args, data):
    targs = bench.training_args(args.stage, "project", args, 1)
    targs.gradient_checkpointing = targs.activation_checkpointing = policy != "none"
    model, tokenizer, _ = load_student(bench.lora_args(f"{args.stage}-full", args.dtype, str(args.model_dir)), DataArgs())
    stage = sft if args.stage == "sft" else dpo
    trainer = stage.build_trainer(model, tokenizer, None, targs, data, MoEArgs(), checkpointing=policy_args(policy))
    bench.timed_and_recorded(trainer)
    compute_loss = trainer.compute_loss

    def marked(*a, **k):  # where the forward ends, for the memory held into backward
        out = compute_loss(*a, **k)
        with torch.profiler.record_function(FORWARD_END):
            pass
        return out

    trainer.compute_loss = marked
    return trainer


def step_memory(trainer, args) -> tuple[int, int]:
    """Bytes torch's CPU allocator holds when the forward ends (what is kept for backward), and at its peak
    during the step (gradients included), both above what it held when the step began."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bench.run_round(trainer, "project", args)
    held = peak = after_forward = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):  # an op's own allocations; frees are `[memory]` events
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
        if event.name == FORWARD_END:
            after_forward = held
    return after_forward, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(bench.SHAPES), default="mid")
    parser.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (dpo: half as many pairs)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policies", default="none,full,selective,attention,grouped_matmul+attention")
    args = parser.parse_args()
    args.device, args.dtype, args.packed, args.steps = "cpu", "float32", False, 1
    torch.set_num_threads(args.threads)
    policies = args.policies.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        args.work, args.model_dir = Path(tmp), Path(tmp) / "model"
        config, n_params = bench.build_model_dir(args.shape, None, args.model_dir, "cpu", args.dtype)
        print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; JetMoE {args.shape}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
              f"{n_params / 1e6:.1f}M parameters; {args.dtype}, {args.stage} full fine-tuning, seq {args.seq}, batch {args.batch} sequences; {args.rounds} timed steps per policy", flush=True)
        rows = bench.batch_of(args.stage, args) * (args.rounds + 2)
        data = bench.sft_rows(rows, [args.seq], config.vocab_size) if args.stage == "sft" else bench.dpo_rows(rows, args.seq)
        trainers = {p: build(p, args, data) for p in policies}
        for trainer in trainers.values():  # warm-up: allocator, optimizer state; the losses compared
            bench.run_round(trainer, "project", args)
            bench.timer(trainer).times.clear()
            bench.timer(trainer).cpu_times.clear()
        losses = {p: t.losses[0] for p, t in trainers.items()}
        for round_ in range(args.rounds):
            for p in policies[round_ % len(policies):] + policies[: round_ % len(policies)]:
                bench.run_round(trainers[p], "project", args)
        times = {p: list(bench.timer(t).times) for p, t in trainers.items()}
        cpu_times = {p: list(bench.timer(t).cpu_times) for p, t in trainers.items()}
        memory = {p: step_memory(t, args) for p, t in trainers.items()}
    reference = "full" if "full" in policies else policies[0]
    print(f"step time: median s per optimizer step, and the median of the per-round ratios to {reference} (wall clock; CPU seconds)")
    print(f"memory: MiB held when the forward ends (kept for backward) and at the step's peak (gradients included), above the step's start")
    print(f"{'policy':<26}{'step s':>8}{'vs ' + reference:>10}{'CPU s':>8}{'kept MiB':>10}{'peak MiB':>10}   first loss")
    for p in policies:
        ratio = statistics.median(a / b for a, b in zip(times[p], times[reference]))
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu_times[p], cpu_times[reference]))
        kept, peak = memory[p]
        print(f"{p:<26}{statistics.median(times[p]):8.2f}{ratio:9.2f}x{cpu_ratio:7.2f}x{kept / 2**20:10.0f}{peak / 2**20:10.0f}   {losses[p]:.6f}")
    spread = max(losses.values()) - min(losses.values())
    print(f"first-step losses {'equal' if spread <= 1e-6 else 'NOT EQUAL'} across policies (spread {spread:.1e})")


if __name__ == "__main__":
    main()
