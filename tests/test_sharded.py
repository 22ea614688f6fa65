"""FSDP2 and DeepSpeed ZeRO-3 through `accelerate launch --config_file recipes/accelerate/{fsdp,zero3}.yaml`
on 2 CPU processes (gloo) train like one process at the same global batch: full and expert LoRA, sft and dpo.

accelerate keeps FSDP and DeepSpeed for accelerators; `tests/cpu_sharded.py` lifts that one gate (see there).
"""

import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.cli import main
from alignment.manifest import read_manifest
from alignment.models.jetmoe import load_causal_lm

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))
LAUNCHER = str(Path(__file__).parent / "cpu_sharded.py")
FSDP, ZERO3 = "recipes/accelerate/fsdp.yaml", "recipes/accelerate/zero3.yaml"
needs_deepspeed = pytest.mark.skipif(find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install -e .[deepspeed])")
pytestmark = [pytest.mark.engines, pytest.mark.skipif(ACCELERATE is None, reason="accelerate is not installed beside this Python")]
COMMON = ["--max_steps", "3", "--logging_steps", "1", "--report_to", "none", "--seed", "0", "--save_strategy", "no"]


def losses(output_dir):
    return [h["loss"] for h in read_manifest(output_dir)["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def data(micro_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_data")
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "16", "--output_dir", str(root / "sft")]) == 0
    prompt = [{"role": "user", "content": "sort 4213"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "Answer: 1234"}], "rejected": [{"role": "assistant", "content": f"Answer: 12{i}3"}]} for i in range(32)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"sft": str(root / "sft"), "dpo": str(root / "pairs.jsonl")}


def one_and_two(launch, stage, recipe, micro_model, data, tmp_path, extra=()):
    """The same recipe on 1 process (batch 8) and sharded on 2 (batch 4 each); returns both output dirs."""
    args = [stage, "--config", recipe, "--model_name_or_path", micro_model, "--dataset_path", data[stage], *COMMON, *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--output_dir", str(one), "--per_device_train_batch_size", "8"]) == 0
    launched = subprocess.run(
        [ACCELERATE, "launch", "--config_file", launch, "--num_processes", "2", "--mixed_precision", "no", LAUNCHER, *args, "--output_dir", str(two), "--per_device_train_batch_size", "4"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    (tmp_path / "launch.stderr").write_text(launched.stderr)
    ran = read_manifest(two)
    assert ran["world_size"] == 2 and ran["distributed_type"] == ("FSDP" if launch == FSDP else "DEEPSPEED") and ran.get("zero_stage", 3) == 3
    assert len(losses(one)) == 3 and losses(two) == pytest.approx(losses(one), rel=1e-4), stage
    return one, two


@pytest.mark.parametrize("launch", [FSDP, pytest.param(ZERO3, marks=needs_deepspeed)], ids=["fsdp", "zero3"])
@pytest.mark.parametrize("stage, recipe", [("sft", "recipes/tiny/sft_lora.yaml"), ("dpo", "recipes/tiny/dpo_lora.yaml")])
def test_expert_lora_sharded_matches_one_process_and_loads(launch, stage, recipe, micro_model, data, tmp_path):
    one, two = one_and_two(launch, stage, recipe, micro_model, data, tmp_path)
    sharded, whole = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert sharded.keys() == whole.keys() and any(".input_linear.lora_A" in k for k in whole)  # the expert banks' factors
    for key in whole:  # gathered from both ranks' shards into whole [E, r, in] / [E, out, r] factors
        assert sharded[key].shape == whole[key].shape and torch.allclose(sharded[key], whole[key], rtol=1e-4, atol=1e-6), key
    assert load_causal_lm(str(two)).config.model_type == "jetmoe"  # the adapter loads and merges in one process


@pytest.mark.parametrize("launch, stage, recipe", [(FSDP, "sft", "recipes/tiny/sft.yaml"), (FSDP, "dpo", "recipes/tiny/dpo.yaml"), pytest.param(ZERO3, "sft", "recipes/tiny/sft.yaml", marks=needs_deepspeed)], ids=["fsdp-sft", "fsdp-dpo", "zero3-sft"])
def test_full_fine_tuning_sharded_matches_one_process(launch, stage, recipe, micro_model, data, tmp_path):
    one, two = one_and_two(launch, stage, recipe, micro_model, data, tmp_path)
    a, b = load_causal_lm(str(one)).state_dict(), load_causal_lm(str(two)).state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_selective_checkpointing_sharded_matches_one_process(micro_model, data, tmp_path):
    """torch's selective checkpointing inside FSDP2's wrapped layers (their all-gathers run in the checkpointed
    region and are recomputed, the attention outputs are kept): the losses and weights of one process."""
    extra = ["--gradient_checkpointing", "true", "--activation_checkpointing_policy", "selective"]
    one, two = one_and_two(FSDP, "sft", "recipes/tiny/sft.yaml", micro_model, data, tmp_path, extra)
    assert "activation checkpointing keeps the outputs of the matmul, grouped_matmul, attention ops" in (tmp_path / "launch.stderr").read_text()  # the policy reached the sharded run
    a, b = load_causal_lm(str(one)).state_dict(), load_causal_lm(str(two)).state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
