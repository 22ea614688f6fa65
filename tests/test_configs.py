from pathlib import Path

import pytest
from trl import ModelConfig, SFTConfig

from alignment.configs import load_recipe, parse_overrides
from alignment.errors import SmoeError
from alignment.sft import SFTDataArgs
from alignment.stages import STAGES, recipe_classes

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_read_yaml_values_but_keep_words():
    assert parse_overrides(["--learning_rate", "1e-4", "--max-steps", "3", "--save_strategy", "no", "--loss_type", "[sigmoid, sft]"]) == {
        "learning_rate": 1e-4,
        "max_steps": 3,
        "save_strategy": "no",
        "loss_type": ["sigmoid", "sft"],
    }
    with pytest.raises(SmoeError, match="--key value"):
        parse_overrides(["--learning_rate"])


def test_unknown_keys_are_reported_together_with_suggestions(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 1.0e-4\nnum_train_epoch: 2\noutput_dir: x\n")
    with pytest.raises(SmoeError) as err:
        load_recipe(recipe, {}, (SFTDataArgs, SFTConfig, ModelConfig))
    message = str(err.value)
    assert str(recipe) in message
    assert "'learning_rat' (did you mean 'learning_rate'?)" in message
    assert "'num_train_epoch' (did you mean 'num_train_epochs'?)" in message


def test_invalid_values_name_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: x\nlr_scheduler_type: sideways\n")
    with pytest.raises(SmoeError, match="r.yaml.*sideways"):
        load_recipe(recipe, {}, (SFTDataArgs, SFTConfig, ModelConfig))


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(SmoeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml", {}, (SFTDataArgs,))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(SmoeError, match="not valid YAML"):
        load_recipe(bad, {}, (SFTDataArgs,))


def stage_of(recipe: str) -> str:
    """A pipeline recipe names the stage of each recipe it uses; others are named after their stage."""
    import yaml

    for pipeline in (ROOT / "recipes").rglob("pipeline.yaml"):
        for entry in yaml.safe_load(pipeline.read_text())["stages"]:
            if entry["config"] == recipe:
                return entry["stage"]
    stem = Path(recipe).stem.replace("_", "-")
    if stem in STAGES:
        return stem
    return next(stage for stage in ("sft", "dpo", *STAGES) if stage in Path(recipe).parts or stem.startswith(stage))


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts))
def test_every_shipped_recipe_parses(recipe, monkeypatch):
    import torch

    monkeypatch.chdir(ROOT)
    stage = stage_of(recipe)
    # the JetMoE-8B recipes train in bf16 on GPUs; transformers refuses bf16 on a CPU machine unless told
    on_cpu = {"use_cpu": True} if stage in ("sft", "dpo") and not torch.cuda.is_available() else {}
    load_recipe(ROOT / recipe, on_cpu, recipe_classes(stage))


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("zero3", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.num_processes == 8
    if name == "fsdp":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "JetMoeDecoderLayer"
