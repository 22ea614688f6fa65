"""estimate-memory: exact parameter counts, the JetMoE-8B figures, and the CLI."""

import pytest

from alignment.cli import main
from alignment.memory import estimate, layer_activation_bytes, model_config, parameter_counts

JETMOE_8B = ["--model_name_or_path", "jetmoe/jetmoe-8b", "--max_length", "2048", "--per_device_train_batch_size", "1", "--gradient_checkpointing", "true"]


def test_parameter_counts_are_exact(micro_model):
    from transformers import AutoModelForCausalLM

    config = model_config(micro_model, {})
    counts = parameter_counts(config)
    model = AutoModelForCausalLM.from_pretrained(micro_model)
    assert counts["experts"] + counts["dense"] == sum(p.numel() for p in model.parameters())
    assert len(counts["banks"]) == 4 * config.num_hidden_layers  # attention in/out, MLP in/out per layer


def test_jetmoe_8b_qlora_fits_a_16_gb_card():
    config = model_config("jetmoe/jetmoe-8b", {})
    counts = parameter_counts(config)
    assert 8.4e9 < counts["experts"] + counts["dense"] < 8.6e9 and config.num_hidden_layers == 24
    assert layer_activation_bytes(config, 1) / 1024 == pytest.approx(155, rel=0.02)  # FINDINGS: about 155 KiB
    sft = estimate(config, counts, "qlora", "sft", 2048, 1, True, 16)
    dpo = estimate(config, counts, "qlora", "dpo", 2048, 1, True, 16)
    assert sft["with_margin"] <= 10 and dpo["with_margin"] <= 14
    assert dpo["activations"] == pytest.approx(2 * sft["activations"], rel=0.01)
    no_checkpointing = estimate(config, counts, "qlora", "dpo", 2048, 1, False, 16)
    assert no_checkpointing["total"] > 2 * dpo["total"]  # FINDINGS: about 22 GiB without checkpointing
    full_dpo = estimate(config, counts, "full", "dpo", 2048, 1, True, 16)
    assert full_dpo["weights"] == pytest.approx(2 * estimate(config, counts, "full", "sft", 2048, 1, True, 16)["weights"])


def test_cli_prints_all_three_methods(capsys):
    assert main(["estimate-memory", "--config", "recipes/tiny/dpo.yaml", *JETMOE_8B, "--use_peft", "true", "--load_in_4bit", "true"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dpo at sequence length 2048, batch 1, checkpointing on")
    assert "qlora" in out.splitlines()[-1] and "<- this recipe" in out.splitlines()[-1]
    assert main(["estimate-memory", "--config", "recipes/tiny/sft.yaml", "--lora_rr", "8"]) == 2
    assert "unknown key 'lora_rr' (did you mean 'lora_r'?)" in capsys.readouterr().err
