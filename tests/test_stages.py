"""Every stage on a micro config, through the CLI as a user runs it, from the shipped tiny recipes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignment.cli import main

# the untrained micro student rarely answers right: the teacher as a second policy guarantees pairs
TEACHER_POLICY = {"name": "teacher", "backend": "skills", "error_rate": 0.5, "num_samples": 2}
from alignment.manifest import is_complete, read_manifest
from teacher_data.skills import SKILLS

TRAIN_FAST = ["--max_steps", "3", "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4"]


def cli(*args):
    assert main([str(a) for a in args]) == 0


def weights(path):
    return load_file(f"{path}/model.safetensors")


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model):
    """teacher-sft -> sft -> teacher-prefs -> dpo on the micro model; each test reads what it needs."""
    root = tmp_path_factory.mktemp("stages")
    cli("teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--output_dir", root / "sft_data", "--prompts_per_skill", 16)
    cli("sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", micro_model, "--dataset_path", root / "sft_data", "--output_dir", root / "sft", *TRAIN_FAST)
    policy = [{"name": "dsft", "backend": "hf", "model": str(root / "sft"), "num_samples": 4, "temperature": 1.0, "max_new_tokens": 8}, TEACHER_POLICY]
    cli("teacher-prefs", "--config", "recipes/tiny/teacher_prefs.yaml", "--output_dir", root / "pref_data", "--prompts_per_skill", 8, "--policies", json.dumps(policy))
    cli("dpo", "--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", root / "sft", "--dataset_path", root / "pref_data", "--output_dir", root / "dpo", *TRAIN_FAST)
    return root


def rows(path):
    return [json.loads(line) for line in open(path / "train.jsonl")]


def test_teacher_sft_writes_ultrachat_rows(run):
    data = rows(run / "sft_data")
    assert len(data) == 16 * len(SKILLS)
    assert set(data[0]) == {"prompt_id", "prompt", "messages", "teacher", "category"}
    assert data[0]["messages"][-1]["role"] == "assistant"
    assert read_manifest(run / "sft_data")["counts"]["rows"] == len(data)


def test_sft_trains_every_weight_and_logs_a_finite_loss(run, micro_model):
    before, after = weights(micro_model), weights(run / "sft")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    losses = [h["loss"] for h in read_manifest(run / "sft")["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_teacher_prefs_writes_ultrafeedback_rows(run):
    data = rows(run / "pref_data")
    assert data, "no pairs"
    for row in data:
        assert row["score_chosen"] > row["score_rejected"]
        assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][-1]["role"] == "assistant"
        assert len(row["completions"]) == 4 + 2 and all("judgment" in c and "score" in c for c in row["completions"])
    counts = read_manifest(run / "pref_data")["counts"]
    assert counts["judged"] == 8 * len(SKILLS) and counts["pairs"] == len(data)


def test_dpo_moves_the_policy_and_logs_rewards(run):
    before, after = weights(run / "sft"), weights(run / "dpo")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = read_manifest(run / "dpo")["log_history"]
    assert any("rewards/margins" in h for h in logs)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs if "loss" in h)


def test_rerunning_a_complete_stage_is_a_no_op(run, micro_model, capsys):
    stamp = (run / "sft" / "model.safetensors").stat().st_mtime_ns
    cli("sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", micro_model, "--dataset_path", run / "sft_data", "--output_dir", run / "sft", *TRAIN_FAST)
    assert "is complete, built from this recipe and these inputs; skipping" in capsys.readouterr().out
    assert (run / "sft" / "model.safetensors").stat().st_mtime_ns == stamp


def test_lora_sft_trains_only_the_adapter(run, micro_model, tmp_path):
    out = tmp_path / "lora"
    cli(
        "sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", micro_model,
        "--dataset_path", run / "sft_data", "--output_dir", out, *TRAIN_FAST,
    )
    assert (out / "adapter_config.json").is_file() and is_complete(out)
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and adapter[k].abs().sum() > 0 for k in adapter)  # B starts at zero


def test_a_directory_no_stage_wrote_is_refused_not_moved(run, micro_model, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    args = ("sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", micro_model, "--dataset_path", run / "sft_data", "--output_dir", tmp_path / "mine", *TRAIN_FAST)
    assert main([str(a) for a in args]) == 2
    assert "output_dir holds files that no stage wrote" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious" and not (tmp_path / "mine.previous").exists()
