"""The README's table of QLoRA memory for the fused-expert families' recipes, written by estimate-memory itself.

usage: python bench/memory_table.py [--readme README.md]   (prints the table; --readme puts it between the
       <!-- memory:families --> markers)
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment.configs import read_yaml  # noqa: E402
from alignment.memory import MemoryArgs, run_estimate  # noqa: E402
from alignment.report import write_between_markers  # noqa: E402

# recipe directory, the card its dSFT QLoRA recipe is sized for
FAMILIES = {"Qwen3-30B-A3B": ("qwen3-30b-a3b", "24 GB"), "Mixtral-8x7B": ("mixtral-8x7b", "32 GB"), "OLMoE-1B-7B": ("olmoe-1b-7b", "8 GB")}


def table() -> str:
    rows = ["| GiB, predicted (+ margin 1.1x + 0.5) | per-expert rank | dSFT QLoRA | dDPO QLoRA | card |", "| --- | --- | --- | --- | --- |"]
    for name, (directory, card) in FAMILIES.items():
        cells = []
        for stage in ("sft", "dpo"):
            recipe = read_yaml(ROOT / "recipes" / directory / stage / "qlora.yaml")
            estimate = run_estimate(recipe, MemoryArgs())["estimates"]["qlora"]
            cells.append(f"{estimate['total']:.2f} (**{estimate['with_margin']:.2f}**)")
        rank = f"{recipe['lora_r']} ({estimate['trainable_parameters'] / 1e6:.0f}M adapter parameters)"
        rows.append(f"| {name} | {rank} | {cells[0]} | {cells[1]} | {card} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args()
    text = table()
    print(text)
    if args.readme:
        write_between_markers(args.readme, "memory:families", text)
