"""Stage outputs are self-contained: adapter chains load whole, full fine-tuning starts from an adapter,
the DPO reference is the model the stage starts from, and DPO trains nothing after the end-of-turn token."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel

from alignment.cli import main
from alignment.errors import SmoeError
from alignment.manifest import read_manifest
from alignment.models.jetmoe import load_causal_lm
from alignment.models.lora import expert_lora_config
from tests.conftest import chats_and_pairs

FAST = ["--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4", "--save_strategy", "no"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return chats_and_pairs(tmp_path_factory.mktemp("chain_data"), prompts_per_skill=4, pairs=8)


@pytest.fixture(scope="module")
def dsft_adapter(micro_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "sft"
    assert main(["sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(data / "chats"), "--output_dir", str(out), "--learning_rate", "1e-2", *FAST]) == 0
    return out


def merged_by_hand(micro_model, *adapters):
    model = load_causal_lm(micro_model)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter, config=expert_lora_config(LoraConfig.from_pretrained(adapter))).merge_and_unload()
    return model.eval()


def logits(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randint(10, 250, (3, 20))).logits


def test_a_stacked_adapter_loads_as_base_plus_every_adapter(micro_model, data, dsft_adapter, tmp_path):
    ddpo = tmp_path / "dpo"
    assert main(["dpo", "--config", "recipes/tiny/dpo_lora.yaml", "--model_name_or_path", str(dsft_adapter), "--dataset_path", str(data / "pairs.jsonl"), "--output_dir", str(ddpo), "--learning_rate", "1e-2", *FAST]) == 0
    assert json.loads((ddpo / "adapter_config.json").read_text())["base_model_name_or_path"] == str(dsft_adapter.resolve())
    loaded = logits(load_causal_lm(str(ddpo)))
    assert (loaded - logits(merged_by_hand(micro_model, dsft_adapter, ddpo))).abs().max().item() < 1e-5
    assert (loaded - logits(merged_by_hand(micro_model, ddpo))).abs().max().item() > 1e-3  # dSFT matters: the check can fail
    # a chain whose dSFT adapter is gone is refused, not loaded as base + dDPO
    moved = tmp_path / "moved_sft"
    shutil.copytree(dsft_adapter, moved)
    shutil.rmtree(dsft_adapter)
    try:
        with pytest.raises(SmoeError, match="cannot be found"):
            load_causal_lm(str(ddpo))
    finally:
        shutil.copytree(moved, dsft_adapter)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_full_fine_tuning_from_an_adapter(micro_model, data, dsft_adapter, tmp_path, stage):
    out = tmp_path / stage
    dataset = data / ("chats" if stage == "sft" else "pairs.jsonl")
    assert main([stage, "--config", f"recipes/tiny/{stage}.yaml", "--model_name_or_path", str(dsft_adapter), "--dataset_path", str(dataset), "--output_dir", str(out), "--learning_rate", "1e-3", *FAST]) == 0
    start, trained = load_causal_lm(str(dsft_adapter)), load_causal_lm(str(out))
    changed = [n for (n, a), (_, b) in zip(start.named_parameters(), trained.named_parameters()) if not torch.equal(a, b)]
    assert any("input_linear" in n for n in changed) and any("embed_tokens" in n for n in changed)
    if stage == "dpo":  # the reference is the dSFT model: at the first step policy and reference agree
        first = next(h for h in read_manifest(out)["log_history"] if "loss" in h)
        assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)


def test_dpo_completions_end_at_the_end_of_turn_token(micro_model, data, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig

    from alignment.dpo import MoEDPOTrainer
    from alignment.models.jetmoe import load_tokenizer

    tokenizer = load_tokenizer(micro_model)
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=64)
    trainer = MoEDPOTrainer(model=load_causal_lm(micro_model), ref_model=load_causal_lm(micro_model), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    row = trainer.train_dataset[0]
    assert tokenizer.decode(row["chosen_ids"]) == "Answer: 1234<|end|>"
    assert tokenizer.decode(row["rejected_ids"]) == "Answer: 1203<|end|>"
    assert tokenizer.decode(row["prompt_ids"]).endswith("<|assistant|>\n")
