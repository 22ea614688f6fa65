"""fp32 matmuls on this CPU: torch's own (MKL's sgemm on x86) against oneDNN (alignment.models.onednn).

usage: python bench/onednn_bench.py [--threads 2] [--rounds 20] [--readme README.md]

For each product a training step of the mid-size JetMoE (bench/train_throughput.py) runs, forward and
backward (expert banks per expert, attention projections, LoRA factors, a decoding step's single row),
the best of --rounds timings of each side in alternating order, the ratio, and the largest difference
between the two results relative to the largest entry (the sums run in another order: fp32 rounding).
"""

import argparse
import io
from contextlib import redirect_stdout
from pathlib import Path

import torch

from alignment.models import onednn
from alignment.report import machine, write_between_markers
from moe_bench import best  # bench/ is the script's own directory

# (what, rows, reduction, output width): the products of one mid JetMoE step (hidden 512, expert width 1024,
# 8 experts, about 512 tokens per expert), LoRA rank 16, one decoding row, and the tiny demo model's small products
SHAPES = [
    ("expert up, forward", 512, 512, 2048),
    ("expert up, input gradient", 512, 2048, 512),
    ("expert down, forward", 512, 1024, 512),
    ("expert weight gradient", 2048, 512, 512),
    ("attention projection", 2048, 512, 1024),
    ("LoRA A product", 2048, 512, 16),
    ("LoRA B product", 2048, 16, 2048),
    ("decoding, one row", 1, 512, 2048),
    ("tiny demo model, decoding row", 1, 128, 256),  # these two are below onednn.MIN_FLOPS: they stay with torch
    ("tiny demo model, an expert's rows", 480, 128, 256),
]


def measure(rounds: int):
    print(f"{machine()['device']}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32; best of {rounds}\n")
    print("| product | rows x reduction x width | torch (MKL) ms | oneDNN ms | ratio | largest difference (relative) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for what, rows, reduction, width in SHAPES:
        x, weight = torch.randn(rows, reduction), torch.randn(width, reduction)
        mine, theirs = (lambda: onednn.linear(x, weight)), (lambda: torch.mm(x, weight.t()))
        mine(), theirs()  # first calls build kernels
        ours = theirs_time = float("inf")
        for _ in range(2):  # alternating halves, so that a busy moment falls on both
            theirs_time = min(theirs_time, best(theirs, rounds // 2 or 1))
            ours = min(ours, best(mine, rounds // 2 or 1))
        difference = ((mine() - theirs()).abs().max() / theirs().abs().max()).item()
        print(f"| {what} | {rows} x {reduction} x {width} | {theirs_time * 1e3:.3f} | {ours * 1e3:.3f} | **{theirs_time / ours:.2f}x** | {difference:.1e} |")
    # an expert's row count changes every step: oneDNN then builds a kernel for the new shape, MKL has no such cost
    weight, counts = torch.randn(256, 128), range(1000, 1000 + rounds)
    inputs = [torch.randn(n, 128) for n in counts]
    new_shape = best(lambda: [onednn.linear(x, weight) for x in inputs], 1) / rounds
    same_shape = best(lambda: [onednn.linear(inputs[0], weight) for _ in inputs], 1) / rounds
    mkl = best(lambda: [torch.mm(x, weight.t()) for x in inputs], 1) / rounds
    print(f"\nA new row count on every call (about 1000 x 128 x 256): oneDNN {new_shape * 1e3:.3f} ms a call against {same_shape * 1e3:.3f} ms "
          f"with the shape it has built before, and torch's MKL {mkl * 1e3:.3f} ms; this is why `onednn.MIN_FLOPS` keeps small products with torch.")
    # at the mid model's expert widths, row counts never seen before, as they come (new kernels) and rounded up as the
    # expert banks run them (onednn.bucketed)
    counts = [n for n in range(401, 401 + 2 * rounds) if onednn.bucketed(n) != n]
    rounded = " or ".join(str(n) for n in sorted(set(map(onednn.bucketed, counts))))
    print(f"\nAn expert's row count, new on every call ({counts[0]} to {counts[-1]} rows; rounded up: {rounded}), ms a call, as it comes / rounded up:")
    for width, out in ((512, 2048), (1024, 512)):
        x, weight = torch.randn(800, width), torch.randn(out, width)
        rounded_time = best(lambda: [onednn.linear(x[: onednn.bucketed(n)], weight)[:n] for n in counts], 1) / len(counts)
        new_time = best(lambda: [onednn.linear(x[:n], weight) for n in counts], 1) / len(counts)
        print(f"- rows x {width} x {out}: {new_time * 1e3:.3f} / {rounded_time * 1e3:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--readme", type=Path, help="write the table between the README's onednn_bench markers")
    args = parser.parse_args()
    if not onednn.AVAILABLE:
        raise SystemExit("error: this torch build has no oneDNN CPU matmul (x86 builds only)")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    printed = io.StringIO()
    with redirect_stdout(printed):
        measure(args.rounds)
    print(printed.getvalue(), end="")
    if args.readme:
        write_between_markers(args.readme, "onednn_bench", f"`python bench/onednn_bench.py --threads {args.threads} --rounds {args.rounds}`:\n\n" + printed.getvalue())


if __name__ == "__main__":
    main()
