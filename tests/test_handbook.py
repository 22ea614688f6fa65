"""The JetMoE-8B recipes are alignment-handbook style: they run with only their paths changed."""

import json

import pytest

from alignment.cli import main
from alignment.configs import read_yaml
from alignment.manifest import read_manifest

# kept short for CI: one optimizer step of a tiny batch, on the CPU; everything else is the shipped recipe
SHORT = ["--use_cpu", "true", "--max_steps", "1", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "64", "--report_to", "none", "--save_strategy", "no"]


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


# alignment-handbook's published shapes (zephyr-7b-beta on Mistral, and the same on a Mixtral base), as our
# own test recipes: they run with only their paths changed (hub ids -> local copies, output_dir, no push)
HANDBOOK = "tests/fixtures/handbook"


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    """Random-init Mistral and Mixtral models with the project's tokenizer (hidden 64: bitsandbytes' CPU kernel wants a block of 64)."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    from alignment.models.tiny import build_tokenizer

    root, tokenizer = tmp_path_factory.mktemp("bases"), build_tokenizer()
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    bases = {"zephyr-7b-beta": MistralForCausalLM(MistralConfig(**shape)), "mixtral-8x7b": MixtralForCausalLM(MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2))}
    for family, model in bases.items():
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    return root


def localised(recipe: str, dataset: str, **extra) -> list[str]:
    """--key value pairs that point a handbook recipe's hub ids at local copies."""
    values = read_yaml(recipe)
    if "dataset_mixture" in values:
        mixture = values["dataset_mixture"]
        for entry in mixture["datasets"]:
            entry["id"] = dataset
        mixture["test_split_size"] = 2  # the published 1000 / 2000 rows, shrunk with the data
        out = ["--dataset_mixture", json.dumps(mixture)]
    else:
        out = ["--dataset_mixer", json.dumps({dataset: weight for weight in values["dataset_mixer"].values()})]
    return out + ["--push_to_hub", "false"] + [x for k, v in extra.items() for x in (f"--{k}", str(v))]


EVAL = ["--eval_strategy", "steps", "--eval_steps", "1", "--per_device_eval_batch_size", "2"]


@pytest.mark.parametrize("family", ["zephyr-7b-beta", "mixtral-8x7b"])
@pytest.mark.parametrize("method", ["full", "qlora"])
def test_handbook_recipes_run_as_published_with_only_paths_changed(family, method, hub_copies, tiny_bases, tmp_path, capsys):
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    recipe = f"{HANDBOOK}/{family}/sft_{method}.yaml"
    args = localised(recipe, str(hub_copies / "ultrachat_200k"), model_name_or_path=tiny_bases / family, output_dir=sft)
    assert main(["sft", "--config", recipe, *args, *SHORT, *EVAL]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "'overwrite_output_dir' is ignored" in err and ("'max_seq_length' is now called 'max_length'" in err) == (method == "full")
    logs = read_manifest(sft)["log_history"]
    assert read_manifest(sft)["rows"] == 8 and any("eval_loss" in h for h in logs)  # 8 + 2 rows, 2 held out
    assert ("quantizes the nn.Linear layers" in err) == (method == "qlora")
    start = str(sft)  # dDPO from the dSFT output, an adapter for QLoRA: merged into the 4-bit base
    recipe = f"{HANDBOOK}/{family}/dpo_{method}.yaml"
    args = localised(recipe, str(hub_copies / "ultrafeedback_binarized"), model_name_or_path=start, output_dir=dpo)
    if read_yaml(recipe)["torch_dtype"] == "float16":  # the published dpo QLoRA dtype; float16 does not train on a CPU
        assert main(["dpo", "--config", recipe, *args, *SHORT, *EVAL]) == 2 and "float16 weights do not train on the CPU" in capsys.readouterr().err
        args += ["--torch_dtype", "bfloat16"]
    assert main(["dpo", "--config", recipe, *args, *SHORT, *EVAL]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "'max_prompt_length' is ignored" in err
    logs = read_manifest(dpo)["log_history"]
    assert any("eval_loss" in h for h in logs) and any("rewards/margins" in h for h in logs)


def test_evaluation_without_evaluation_rows_is_refused(hub_copies, tiny_bases, tmp_path, capsys):
    recipe = f"{HANDBOOK}/zephyr-7b-beta/sft_full.yaml"
    args = localised(recipe, str(hub_copies / "ultrachat_200k"), model_name_or_path=tiny_bases / "zephyr-7b-beta", output_dir=tmp_path)
    mixture = json.loads(args[1])
    mixture.pop("test_split_size")
    args[1] = json.dumps(mixture)
    assert main(["sft", "--config", recipe, *args, *SHORT]) == 2
    err = capsys.readouterr().err
    assert "eval_strategy is epoch but there are no evaluation rows" in err and "Traceback" not in err
