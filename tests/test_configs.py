from pathlib import Path

import pytest
from trl import ModelConfig, SFTConfig

from alignment.configs import load_recipe, parse_overrides, read_yaml, write_resolved
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


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml") if not {"accelerate", "parts"} & set(p.parts)))
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


def test_a_recipe_extends_its_bases_in_order_and_is_written_whole(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "common.yaml").write_text("learning_rate: 1.0e-5\nseed: 1\ndataset_mixture: {datasets: [{id: a}], seed: 0}\n")
    (tmp_path / "parts" / "lora.yaml").write_text("use_peft: true\nlora_r: 8\nseed: 2\n")
    (tmp_path / "full.yaml").write_text("base: parts/common.yaml\noutput_dir: x\nlearning_rate: 2.0e-5\n")
    (tmp_path / "lora.yaml").write_text("base: [full.yaml, parts/lora.yaml]\nlora_r: 16\n")
    values = read_yaml(tmp_path / "lora.yaml")
    # later bases override earlier ones, the recipe overrides its bases; a mapping is replaced whole
    assert values == {"learning_rate": 2.0e-5, "seed": 2, "dataset_mixture": {"datasets": [{"id": "a"}], "seed": 0}, "output_dir": "x", "use_peft": True, "lora_r": 16}
    _, resolved = load_recipe(tmp_path / "lora.yaml", {"lora_r": 4, "use_cpu": True}, (SFTDataArgs, SFTConfig, ModelConfig))
    write_resolved(resolved, tmp_path / "out")
    assert read_yaml(tmp_path / "out" / "recipe.yaml") == {**values, "lora_r": 4, "use_cpu": True}  # the whole recipe, no base: left


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "extends itself"),
        ({"a.yaml": "base: a.yaml\n"}, "extends itself"),
        ({"a.yaml": "base: missing.yaml\n"}, "base: missing.yaml does not exist"),
        ({"a.yaml": "base: {x: 1}\n"}, "is not a recipe path"),
    ],
)
def test_bad_bases_are_refused_naming_the_recipe(files, message, tmp_path):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SmoeError, match=message) as err:
        read_yaml(tmp_path / "a.yaml")
    assert "a.yaml" in str(err.value)
