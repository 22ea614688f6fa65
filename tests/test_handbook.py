"""The JetMoE-8B recipes are alignment-handbook style: they run with only their paths changed."""

import json

import pytest
from datasets import Dataset, DatasetDict

from alignment.cli import main
from alignment.configs import read_yaml
from alignment.manifest import read_manifest

# kept short for CI: one optimizer step of a tiny batch, on the CPU; everything else is the shipped recipe
SHORT = ["--use_cpu", "true", "--max_steps", "1", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "64", "--report_to", "none", "--save_strategy", "no"]


@pytest.fixture(scope="module")
def hub_copies(tmp_path_factory):
    """Local copies in the public schemas: ultrachat_200k (train_sft) and ultrafeedback_binarized (train_prefs)."""
    root = tmp_path_factory.mktemp("hub")
    prompt = [{"role": "user", "content": "sort 3021"}]
    chat = [{"prompt_id": str(i), "prompt": "sort 3021", "messages": prompt + [{"role": "assistant", "content": "Answer: 0123"}]} for i in range(8)]
    prefs = [{"prompt_id": str(i), "prompt": "sort 3021", "chosen": prompt + [{"role": "assistant", "content": "Answer: 0123"}], "rejected": prompt + [{"role": "assistant", "content": "Answer: 0132"}], "score_chosen": 10.0, "score_rejected": 3.0} for i in range(8)]
    DatasetDict({"train_sft": Dataset.from_list(chat), "test_sft": Dataset.from_list(chat[:2])}).save_to_disk(str(root / "ultrachat_200k"))
    DatasetDict({"train_prefs": Dataset.from_list(prefs), "test_prefs": Dataset.from_list(prefs[:2])}).save_to_disk(str(root / "ultrafeedback_binarized"))
    return root


def with_paths(recipe: str, dataset: str) -> str:
    mixture = read_yaml(recipe)["dataset_mixture"]
    mixture["datasets"][0]["id"] = dataset
    return json.dumps(mixture)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_jetmoe_8b_recipes_run_with_only_paths_changed(method, hub_copies, micro_model, tmp_path):
    sft_recipe, dpo_recipe = f"recipes/jetmoe-8b/sft/{method}.yaml", f"recipes/jetmoe-8b/dpo/{method}.yaml"
    sft = tmp_path / "sft"
    paths = ["--model_name_or_path", micro_model, "--dataset_mixture", with_paths(sft_recipe, str(hub_copies / "ultrachat_200k")), "--output_dir", str(sft)]
    assert main(["sft", "--config", sft_recipe, *paths, *SHORT]) == 0
    assert read_manifest(sft)["rows"] == 8 and (sft / ("adapter_config.json" if method != "full" else "model.safetensors")).is_file()
    dpo = tmp_path / "dpo"
    paths = ["--model_name_or_path", str(sft), "--dataset_mixture", with_paths(dpo_recipe, str(hub_copies / "ultrafeedback_binarized")), "--output_dir", str(dpo)]
    assert main(["dpo", "--config", dpo_recipe, *paths, *SHORT]) == 0
    logs = [h for h in read_manifest(dpo)["log_history"] if "loss" in h]
    assert logs and "router/aux_loss" in logs[0]


def test_jetmoe_8b_qlora_recipes_fit_a_16_gb_card(capsys):
    for recipe, limit in (("recipes/jetmoe-8b/sft/qlora.yaml", 10), ("recipes/jetmoe-8b/dpo/qlora.yaml", 14)):
        assert main(["estimate-memory", "--config", recipe]) == 0
        qlora = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("qlora"))
        assert "<- this recipe" in qlora and float(qlora.split()[6]) <= limit  # the total with allocator margin
