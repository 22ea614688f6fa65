"""The real-model recipes of every MoE family run one step of sft and then dpo on a tiny random-init model
of their family, with only paths changed (hub ids -> local copies, output_dir) and CPU shortening."""

import json

import pytest

from alignment.cli import main
from alignment.configs import read_yaml
from alignment.manifest import read_manifest
from tests.conftest import FAMILIES
from tests.test_handbook import SHORT


def local_mixture(recipe: str, dataset: str) -> str:
    mixture = read_yaml(recipe)["dataset_mixture"]
    for entry in mixture["datasets"]:
        entry["id"] = dataset
    return json.dumps(mixture)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_recipes_run_with_only_paths_changed(family, method, tiny_families, hub_copies, tmp_path, capsys):
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    recipe = f"recipes/{family}/sft/{method}.yaml"
    paths = ["--model_name_or_path", str(tiny_families / family), "--dataset_mixture", local_mixture(recipe, str(hub_copies / "ultrachat_200k")), "--output_dir", str(sft)]
    assert main(["sft", "--config", recipe, *paths, *SHORT]) == 0, capsys.readouterr().err
    manifest = read_manifest(sft)
    assert manifest["rows"] == 8 and read_yaml(sft / "recipe.yaml")["model_name_or_path"] == str(tiny_families / family)
    if method != "full":  # all-linear: attention projections and both expert weights of every layer, no router
        targets = manifest["lora_targets"]
        assert {t.rpartition(".")[2] for t in targets["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert sorted(t.rpartition(".")[2] for t in targets["target_parameters"]) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]
    recipe = f"recipes/{family}/dpo/{method}.yaml"
    paths = ["--model_name_or_path", str(sft), "--dataset_mixture", local_mixture(recipe, str(hub_copies / "ultrafeedback_binarized")), "--output_dir", str(dpo)]
    capsys.readouterr()
    assert main(["dpo", "--config", recipe, *paths, *SHORT]) == 0, capsys.readouterr().err
    assert any("rewards/margins" in h for h in read_manifest(dpo)["log_history"])
    # QLoRA dDPO starts from the dSFT adapter: merged in full precision, then 4-bit again as it is read back
    assert ("merged, then quantized as it is read back in 4-bit" in capsys.readouterr().err) == (method == "qlora")
    if method == "qlora":  # and the model dDPO trains is 4-bit: NF4 experts and bitsandbytes nn.Linear layers
        from bitsandbytes.nn import Linear4bit
        from trl import ModelConfig

        from alignment.models.quant import fused_quantized
        from alignment.train_common import DataArgs, load_student

        model, _, _ = load_student(ModelConfig(model_name_or_path=str(sft), dtype="bfloat16", load_in_4bit=True, use_peft=True, lora_dropout=0.0, lora_target_modules="all-linear"), DataArgs())
        assert fused_quantized(model) and any(isinstance(m, Linear4bit) for m in model.modules())
