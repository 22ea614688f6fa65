"""estimate-memory: exact parameter counts, the JetMoE-8B figures, the fused-expert families' recipes
against their cards, LoRA counted as the stages create it, the layer model against saved tensors, the CLI."""

import re

import pytest
import torch

from alignment.cli import main
from alignment.configs import resolve
from alignment.memory import GIB, MemoryArgs, estimate, fused_layer_saved_bytes, layer_bytes, lora_adapter, model_config, parameter_counts, run_estimate
from tests.conftest import FAMILIES

JETMOE_8B = ["--model_name_or_path", "jetmoe/jetmoe-8b", "--max_length", "2048", "--per_device_train_batch_size", "1", "--gradient_checkpointing", "true"]
JETMOE_LORA = {"use_peft": True, "lora_r": 16, "lora_target_modules": ["kv_proj", "input_linear", "output_linear"]}


def test_parameter_counts_are_exact(micro_model):
    from transformers import AutoModelForCausalLM

    config = model_config(micro_model, {})
    counts = parameter_counts(config)
    model = AutoModelForCausalLM.from_pretrained(micro_model)
    assert counts["experts"] + counts["dense"] == sum(p.numel() for p in model.parameters())
    assert len(counts["banks"]) == 4 * config.num_hidden_layers  # attention in/out, MLP in/out per layer
    assert counts["linear_4bit"] == 0  # JetMoE's 4-bit path quantises its expert banks only


def test_jetmoe_8b_qlora_fits_a_16_gb_card():
    config = model_config("jetmoe/jetmoe-8b", {})
    counts = parameter_counts(config)
    assert 8.4e9 < counts["experts"] + counts["dense"] < 8.6e9 and config.num_hidden_layers == 24
    assert layer_bytes(config, 1) / 1024 == pytest.approx(155, rel=0.02)  # FINDINGS: about 155 KiB
    adapter = lora_adapter(config, JETMOE_LORA, quantized=True)
    assert adapter.bytes_each == 4  # JetMoE's banks are quantised by the project, not transformers: TRL leaves fp32 adapters
    sft = estimate(config, counts, "qlora", "sft", 2048, 1, True, adapter)
    dpo = estimate(config, counts, "qlora", "dpo", 2048, 1, True, adapter)
    assert sft["with_margin"] <= 10 and dpo["with_margin"] <= 14
    assert dpo["activations"] - dpo["logits"] == pytest.approx(2 * (sft["activations"] - sft["logits"]), rel=0.01)
    no_checkpointing = estimate(config, counts, "qlora", "dpo", 2048, 1, False, adapter)
    assert no_checkpointing["total"] > 2 * dpo["total"]  # FINDINGS: about 22 GiB without checkpointing
    full_dpo = estimate(config, counts, "full", "dpo", 2048, 1, True, adapter)
    assert full_dpo["weights"] == pytest.approx(2 * estimate(config, counts, "full", "sft", 2048, 1, True, adapter)["weights"])


# the cards the issue names, with the estimator's own margin (1.1x + 0.5 GiB)
CARDS = [("qwen3-30b-a3b/sft", 20), ("qwen3-30b-a3b/dpo", 21), ("mixtral-8x7b/sft", 28), ("olmoe-1b-7b/sft", 6.5), ("mixtral-8x7b/dpo", 32), ("olmoe-1b-7b/dpo", 8)]


@pytest.mark.parametrize("recipe, card", CARDS)
def test_family_qlora_recipes_fit_their_cards(recipe, card):
    result = run_estimate(resolve(f"recipes/{recipe}/qlora.yaml", {}), MemoryArgs())
    assert (result["recipe_method"], result["seq_len"], result["batch"], result["checkpointing"]) == ("qlora", 2048, 1, True)
    e = result["estimates"]["qlora"]
    assert e["with_margin"] <= card
    parts = e["weights"] + e["gradients"] + e["optimizer"] + e["activations"]
    assert e["total"] == pytest.approx(max(parts, e["precompute"]))
    assert e["precompute"] < parts  # the reference pass before training is not the peak
    counts, adapter = result["counts"], result["adapter"]
    assert adapter.bytes_each == 2  # TRL casts the adapters of a model loaded in 4-bit to bf16
    assert e["gradients"] == pytest.approx(adapter.parameters * 2 / GIB) and e["optimizer"] == pytest.approx(2 * e["gradients"])
    assert counts["linear_4bit"] > 0 and adapter.targets["target_parameters"]  # attention in 4-bit, LoRA on the experts
    if recipe.endswith("dpo"):  # ddpo.yaml's 16 pairs per reference batch would make that pass the peak
        at_16 = estimate(result["config"], counts, "qlora", "dpo", 2048, 1, True, adapter, precomputed_reference=True, precompute_batch=16, nested_quant=True)
        assert at_16["precompute"] > parts
    header = re.search(r"= ([\d.]+) GiB; ([\d.]+) with margin", open(f"recipes/{recipe}/qlora.yaml").read())
    assert (float(header[1]), float(header[2])) == (round(e["total"], 2), round(e["with_margin"], 2))  # the recipe's comment is today's estimate


def test_published_shapes():
    qwen = parameter_counts(model_config("Qwen/Qwen3-30B-A3B", {}))
    assert qwen["experts"] == 48 * 128 * 3 * 2048 * 768 and 30.4e9 < qwen["experts"] + qwen["dense"] < 30.6e9  # model card: 30.5B
    assert qwen["experts"] * 4.127 / 8 / GIB == pytest.approx(13.9, abs=0.05)  # the issue: NF4 experts alone 13.9 GiB
    mixtral = parameter_counts(model_config("mistralai/Mixtral-8x7B-v0.1", {}))
    assert 46.6e9 < mixtral["experts"] + mixtral["dense"] < 46.8e9  # 46.7B
    olmoe = parameter_counts(model_config("allenai/OLMoE-1B-7B-0924", {}))
    assert 6.9e9 < olmoe["experts"] + olmoe["dense"] < 6.95e9  # 6.9B, expert width 1024
    assert model_config("runs/qwen3-30b-a3b/sft-qlora", {}).num_hidden_layers == 48  # a run directory named after the model




def qlora_stage_model(path, recipe: dict):
    """The model as the sft stage trains it: load_student (4-bit layers, NF4 experts) and TRL's SFTTrainer (PEFT, its dtype cast)."""
    from datasets import Dataset
    from trl import ModelConfig, SFTConfig

    from alignment.models.router import MoEArgs
    from alignment.sft import build_trainer
    from alignment.train_common import DataArgs, load_student

    lora = {k: v for k, v in recipe.items() if k.startswith("lora_") or k in ("use_peft", "use_bnb_nested_quant", "load_in_4bit")}
    model, tokenizer, peft_config = load_student(ModelConfig(model_name_or_path=str(path), dtype="bfloat16", **lora), DataArgs())
    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}] * 2)
    args = SFTConfig(output_dir=str(path / "out"), report_to=[], max_steps=1, bf16=False, use_cpu=True, gradient_checkpointing=True)
    return build_trainer(model, tokenizer, peft_config, args, rows, MoEArgs()).model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_count_is_what_the_stage_creates(family, tiny_families):
    """The estimate applies the project's LoRA on the meta-device model; the sft stage on a tiny model of the
    family, with the family's QLoRA recipe's LoRA keys, creates exactly as many adapter parameters, of that dtype."""
    recipe = resolve(f"recipes/{family}/sft/qlora.yaml", {})
    adapter = lora_adapter(model_config(str(tiny_families / family), {}), recipe, quantized=True)
    trained = [p for p in qlora_stage_model(tiny_families / family, recipe).parameters() if p.requires_grad]
    assert adapter.parameters == sum(p.numel() for p in trained) > 0
    assert {p.element_size() for p in trained} == {adapter.bytes_each}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_model_matches_the_tensors_saved_for_backward(family, tiny_families):
    """One decoder layer of the QLoRA stage model (4-bit attention with LoRA, NF4 experts with expert LoRA,
    bf16 autocast), run on 256 tokens: the bytes its forward saves for backward (distinct storages, not
    the weights) against the estimate's per-layer formula."""
    recipe = resolve(f"recipes/{family}/sft/qlora.yaml", {})
    model = qlora_stage_model(tiny_families / family, recipe)
    decoder = model.get_base_model().model
    config, tokens = decoder.config, 256
    x = torch.randn(1, tokens, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    saved = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rotary = decoder.rotary_emb(x, positions)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            decoder.layers[0](x, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    assert sum(saved.values()) == pytest.approx(fused_layer_saved_bytes(config, tokens, masked=False), rel=0.06)


def test_cli_prints_all_three_methods(capsys):
    assert main(["estimate-memory", "--config", "recipes/tiny/dpo.yaml", *JETMOE_8B, "--use_peft", "true", "--load_in_4bit", "true", "--lora_target_modules", "all-linear"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dpo at sequence length 2048, batch 1, checkpointing on")
    assert "qlora" in out.splitlines()[-2] and "<- this recipe" in out.splitlines()[-2]
    assert out.splitlines()[-1].startswith("activations of this recipe: one layer")
    assert main(["estimate-memory", "--config", "recipes/tiny/dpo.yaml", *JETMOE_8B, "--use_peft", "true"]) == 2  # no targets: the stage would stop too
    assert "recipe key lora_target_modules" in capsys.readouterr().err
    assert main(["estimate-memory", "--config", "recipes/tiny/sft.yaml", "--lora_rr", "8"]) == 2
    assert "unknown key 'lora_rr' (did you mean 'lora_r'?)" in capsys.readouterr().err


def test_an_unknown_model_is_refused_naming_the_known_shapes(capsys):
    assert main(["estimate-memory", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", "someone/unknown-moe"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the model config of someone/unknown-moe" in err and "qwen3-30b-a3b" in err


def test_lm_head_tile_is_as_wide_as_trl_allocates_it():
    """TRL's fused LM head allocates its logits tile 32,768 wide even for a smaller vocabulary."""
    from alignment.memory import lm_head_bytes

    config = model_config("olmoe-1b-7b", {"vocab_size": 512})
    assert lm_head_bytes(config, 2048, gradients=False) == 2048 * 32768 * 2 + 2048 * config.hidden_size * 2


def test_live_tensor_bytes_count_what_a_step_holds_and_frees():
    """bench/live_memory.py, the CPU stand-in for torch.cuda.memory_allocated that bench/memory_gpu.py reads."""
    from bench.live_memory import LiveTensorBytes

    with LiveTensorBytes() as live:
        a = torch.zeros(1024, 256)  # 1 MiB
        b = a.view(256, 1024)  # a view: no new bytes
        c = torch.ones(512, 512, dtype=torch.bfloat16)  # 0.5 MiB
        assert live.current == 1.5 * 2**20 and b.numel() == a.numel()
        del a, b
        assert live.current == 0.5 * 2**20
        del c
    assert live.current == 0 and live.peak == 1.5 * 2**20


@pytest.mark.parametrize("recipe", ["sft/lora", "sft/qlora", "dpo/lora", "dpo/qlora"])
def test_jetmoe_8b_recipe_headers_state_todays_estimate(recipe):
    path = f"recipes/jetmoe-8b/{recipe}.yaml"
    method = recipe.split("/")[1]
    e = run_estimate(resolve(path, {}), MemoryArgs(seq_len=2048, batch_size=1))["estimates"][method]
    header = re.search(r"= ([\d.]+) GiB; ([\d.]+) with margin", open(path).read())
    assert (float(header[1]), float(header[2])) == (round(e["total"], 2), round(e["with_margin"], 2))
