"""The JetMoE-8B recipes as a chain on a tiny JetMoE, shortened only in length and size: teacher-sft ->
sft (QLoRA) -> teacher-prefs -> dpo (QLoRA, stacked on the dSFT adapter) -> MT-Bench eval, with the
recipes' gradient accumulation (128), against a real OpenAI-compatible server on loopback whose answers
are scripted (a random micro model never ends its answers, so it cannot be the teacher)."""

import hashlib
import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from alignment.cli import main
from alignment.manifest import read_manifest
from tests.fault_server import FaultServer

FIXTURES = Path(__file__).parent / "fixtures"
SHORT_TRAINING = ["--use_cpu", "true", "--max_length", "96", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--bf16", "false"]


def scripted(model, messages) -> str:
    """The judge rates each answer by a hash of it (deterministic, spread over 1-10, parseable); the
    teacher, the user simulator and the other policies answer in a few words."""
    text = messages[-1]["content"]
    digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    if model == "gpt-4o":
        return f"Rating: [[{digest % 10 + 1}]]"
    return f"Answer: {text.split()[-1][::-1]}" if digest % 3 else "and why?"


@pytest.fixture(scope="module")
def server():
    server = FaultServer(reply=scripted)
    yield server.base_url
    server.close()


def flag(key, value):
    return [f"--{key}", value if isinstance(value, str) else json.dumps(value)]


def endpoint(entry: dict, url: str, model: str, **shorter) -> dict:
    """A recipe's API entry pointed at a loopback server (the key the recipe names is not needed there)."""
    return {**{k: v for k, v in entry.items() if k != "api_key_env"}, "base_url": url, "model": model, "concurrency": 2, **shorter}


def test_jetmoe_8b_recipes_as_a_chain(micro_model, server, tmp_path):
    from alignment.configs import read_yaml

    url, teacher_model, judge = server, "gpt-4o-mini", server
    chat = [{"prompt_id": str(i), "prompt": f"reverse word{i}", "messages": [{"role": "user", "content": f"reverse word{i}"}, {"role": "assistant", "content": f"Answer: {i}drow"}]} for i in range(12)]
    DatasetDict({"train_sft": Dataset.from_list(chat)}).save_to_disk(str(tmp_path / "ultrachat_200k"))
    prefs = [{"prompt_id": str(i), "prompt": f"sort {i}31", "messages": [{"role": "user", "content": f"sort {i}31"}]} for i in range(6)]
    DatasetDict({"train_prefs": Dataset.from_list(prefs)}).save_to_disk(str(tmp_path / "ultrafeedback_binarized"))
    runs = tmp_path / "runs"

    recipe = read_yaml("recipes/jetmoe-8b/teacher_sft.yaml")
    assert main(["teacher-sft", "--config", "recipes/jetmoe-8b/teacher_sft.yaml", *flag("output_dir", str(runs / "sft_data")), *flag("prompts", str(tmp_path / "ultrachat_200k")),
                 *flag("decontaminate_against", [str(FIXTURES / "questions.jsonl")]), *flag("max_prompts", "12"), *flag("max_new_tokens", "8"), *flag("shard_size", "4"),
                 *flag("teacher", endpoint(recipe["teacher"], url, teacher_model)), *flag("user_simulator", endpoint(recipe["user_simulator"], url, teacher_model))]) == 0
    assert read_manifest(runs / "sft_data")["counts"]["rows"] > 0

    sft = runs / "sft-qlora"
    mixture = read_yaml("recipes/jetmoe-8b/sft/qlora.yaml")["dataset_mixture"]
    mixture["datasets"][0].update(id=str(runs / "sft_data"), split=None)  # the dataset teacher-sft wrote
    assert main(["sft", "--config", "recipes/jetmoe-8b/sft/qlora.yaml", *flag("model_name_or_path", micro_model), *flag("dataset_mixture", mixture), *flag("output_dir", str(sft)), *flag("num_train_epochs", "1"), *SHORT_TRAINING]) == 0
    manifest = read_manifest(sft)
    assert manifest["global_step"] == 1 and read_yaml(sft / "recipe.yaml")["gradient_accumulation_steps"] == 128  # all rows in one accumulated step

    recipe = read_yaml("recipes/jetmoe-8b/teacher_prefs.yaml")
    policies = [{**recipe["policies"][0], "model": str(sft), "dtype": "float32", "max_new_tokens": 8, "batch_size": 4},
                endpoint(recipe["policies"][1], url, teacher_model, max_new_tokens=8), endpoint(recipe["policies"][2], url, teacher_model, max_new_tokens=8)]
    assert main(["teacher-prefs", "--config", "recipes/jetmoe-8b/teacher_prefs.yaml", *flag("output_dir", str(runs / "pref_data")), *flag("prompts", str(tmp_path / "ultrafeedback_binarized")),
                 *flag("decontaminate_against", [str(FIXTURES / "questions.jsonl")]), *flag("max_prompts", "6"), *flag("shard_size", "2"), *flag("policies", policies),
                 *flag("judge", endpoint(recipe["judge"], judge, "gpt-4o"))]) == 0
    assert read_manifest(runs / "pref_data")["counts"]["pairs"] > 0

    dpo = runs / "dpo-qlora"
    mixture = read_yaml("recipes/jetmoe-8b/dpo/qlora.yaml")["dataset_mixture"]
    mixture["datasets"][0].update(id=str(runs / "pref_data"), split=None)
    assert main(["dpo", "--config", "recipes/jetmoe-8b/dpo/qlora.yaml", *flag("model_name_or_path", str(sft)), *flag("dataset_mixture", mixture), *flag("output_dir", str(dpo)), *SHORT_TRAINING]) == 0
    assert json.loads((dpo / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft.resolve())  # the chain

    recipe = read_yaml("recipes/jetmoe-8b/eval_mt_bench.yaml")
    models = [{"name": "dsft", "path": str(sft)}, {"name": "ddpo", "path": str(dpo)}]
    assert main(["eval", "--config", "recipes/jetmoe-8b/eval_mt_bench.yaml", *flag("output_dir", str(runs / "mt_bench")), *flag("question_file", str(FIXTURES / "questions.jsonl")),
                 *flag("judge_prompts", "null"), *flag("reference_answers", str(FIXTURES / "reference_answer.jsonl")), *flag("max_new_tokens", "8"), *flag("batch_size", "4"),
                 *flag("judge", endpoint(recipe["judge"], judge, "gpt-4o")), *flag("models", models)]) == 0
    summary = json.loads((runs / "mt_bench" / "summary.json").read_text())
    assert summary["single"]["ddpo"]["judged"] > 0 and "ddpo" in summary["pairwise"]
