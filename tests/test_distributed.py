"""Two CPU processes (torchrun, gloo) train like one process at the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.manifest import read_manifest

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


def losses(output_dir):
    return [h["loss"] for h in read_manifest(output_dir)["log_history"] if "loss" in h]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_sft_and_dpo_on_two_processes_match_one(micro_model, tmp_path):
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "16", "--output_dir", str(tmp_path / "data")]) == 0
    pairs = tmp_path / "pairs.jsonl"
    prompt = [{"role": "user", "content": "sort 4213"}]
    pairs.write_text("".join(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "Answer: 1234"}], "rejected": [{"role": "assistant", "content": f"Answer: 12{i}3"}]}) + "\n" for i in range(32)))
    common = ["--max_steps", "3", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true", "--seed", "0"]
    runs = {
        "sft": ["sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(tmp_path / "data"), *common],
        "dpo": ["dpo", "--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(pairs), *common],
    }
    for stage, args in runs.items():
        one, two = tmp_path / f"{stage}_one", tmp_path / f"{stage}_two"
        assert main([*args, "--output_dir", str(one), "--per_device_train_batch_size", "8"]) == 0
        launched = subprocess.run(
            [TORCHRUN, "--nproc_per_node", "2", "-m", "alignment.cli", *args, "--output_dir", str(two), "--per_device_train_batch_size", "4"],
            capture_output=True, text=True, timeout=300,
        )
        assert launched.returncode == 0, launched.stderr[-3000:]
        assert read_manifest(two)["world_size"] == 2 and read_manifest(one)["world_size"] == 1
        assert losses(two) == pytest.approx(losses(one), rel=1e-4), stage
        assert len(losses(one)) == 3
        health = [json.loads((d / "router_health.json").read_text())["windows"] for d in (one, two)]  # summed over both ranks
        assert [w["routers"]["L0.mlp"]["tokens"] for w in health[1]] == [w["routers"]["L0.mlp"]["tokens"] for w in health[0]]
        assert sum((w["routers"]["L1.attn"]["load"] for w in health[1]), []) == pytest.approx(sum((w["routers"]["L1.attn"]["load"] for w in health[0]), []), abs=1e-3)


def test_qlora_under_fsdp_stops_before_training(micro_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets
    out = tmp_path / "qlora"
    args = ["sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(tmp_path / "none"), "--output_dir", str(out), "--load_in_4bit", "true"]
    assert main(args) == 2
    assert "load_in_4bit (QLoRA) cannot run under FSDP" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()


def test_a_launch_that_would_not_shard_is_refused(micro_model, tmp_path):
    """On CPU processes accelerate quietly drops FSDP; the stage says so instead of training unsharded."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}) + "\n")
    command = [sys.executable, "-m", "alignment.cli", "dpo", "--config", "recipes/tiny/dpo_lora.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(pairs), "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none"]
    refused = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_FSDP": "true"}, timeout=300)
    assert refused.returncode == 2 and "the launch asked for FSDP but accelerate runs NO" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and not (tmp_path / "out" / "manifest.json").exists()
