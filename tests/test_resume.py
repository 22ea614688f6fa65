"""A training stage killed with SIGKILL (also while writing a checkpoint) resumes to the uninterrupted result."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.cli import main
from alignment.manifest import read_manifest
from tests.conftest import chats_and_pairs

STEPS = 12
RESUMABLE = ["--max_steps", str(STEPS), "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "2", "--logging_steps", "1",
             "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--lr_scheduler_type", "linear", "--warmup_steps", "0",
             "--cpu_matmul", "torch"]  # the same products in the killed process and in this one (the tests' oneDNN size threshold is this process's only)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return chats_and_pairs(tmp_path_factory.mktemp("resume_data"), prompts_per_skill=16, pairs=64)


def killed_after_a_checkpoint(args: list[str], output_dir: Path):
    """Start the stage in its own process and SIGKILL it once its first checkpoint is complete."""
    process = subprocess.Popen([sys.executable, "-m", "alignment.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (output_dir / "checkpoint-3" / "trainer_state.json").is_file():
        assert process.poll() is None and time.time() < deadline, "the stage ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("stage,quantized", [("sft", False), ("dpo", False), ("sft", True), ("dpo", True)])
def test_killed_training_resumes_to_the_same_weights(micro_model, data, tmp_path, stage, quantized):
    dataset = data / ("chats" if stage == "sft" else "pairs.jsonl")
    common = [stage, "--config", f"recipes/tiny/{stage}_lora.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(dataset), *RESUMABLE]
    if quantized:
        common += ["--load_in_4bit", "true"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main([*common, "--output_dir", str(whole)]) == 0

    killed_after_a_checkpoint([*common, "--output_dir", str(resumed)], resumed)
    assert not (resumed / "manifest.json").exists()
    newest = max(resumed.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if newest.name != "checkpoint-3" or (resumed / "checkpoint-6").exists():
        (newest / "trainer_state.json").unlink()  # as if killed while this checkpoint was being written
    else:  # killed between checkpoints 3 and 6: add one cut off mid-write, as a kill during the save leaves it
        shutil.copytree(newest, resumed / "checkpoint-6")
        (resumed / "checkpoint-6" / "trainer_state.json").unlink()
    assert main([*common, "--output_dir", str(resumed)]) == 0

    expected, got = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-6
    assert any(not torch.equal(expected[k], torch.zeros_like(expected[k])) for k in expected if "lora_B" in k)
    steps = [h["step"] for h in read_manifest(resumed)["log_history"] if "loss" in h]
    assert steps == list(range(1, STEPS + 1))  # no step twice, none missing
