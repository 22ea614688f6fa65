"""bench/train_throughput.py on a micro JetMoE: stock TRL + PEFT and the project compute the same losses.

Only the losses are asserted (speed is printed by the benchmark, never tested)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stock_and_project_losses_agree(tmp_path):
    out, readme = tmp_path / "result.json", tmp_path / "README.md"
    readme.write_text("before\n<!-- train_throughput:cpu -->\nold table\n<!-- /train_throughput:cpu -->\nafter\n")
    command = [sys.executable, "bench/train_throughput.py", "--shape", "micro", "--seq", "32", "--batch", "4", "--steps", "2", "--rounds", "1",
               "--modes", "sft-full,sft-lora,dpo-lora", "--json", str(out), "--readme", str(readme)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert results["sft-full"]["max_loss_diff"] <= 1e-6  # full fine-tuning: the same numbers as stock
    assert results["sft-lora"]["adapters_copied"] > 0 and results["sft-lora"]["max_loss_diff"] <= 1e-5
    assert results["dpo-lora"]["max_loss_diff"] <= 1e-5
    assert all(len(r["losses"]["project"]) == 2 for r in results.values())
    text = readme.read_text()
    assert "old table" not in text and "| sft-lora |" in text and text.startswith("before") and text.endswith("after\n")
