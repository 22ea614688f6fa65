"""LoRA per expert on JetMoE's expert banks: equal to PEFT's target_parameters, saved, reloaded, merged."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from alignment.cli import main
from alignment.manifest import is_complete
from alignment.models.jetmoe import load_causal_lm
from alignment.models.lora import ExpertLoraLayer, expert_lora_config

BANKS = ["mlp.input_linear", "mlp.output_linear", "experts.input_linear", "experts.output_linear"]


def ids():
    torch.manual_seed(1)
    return torch.randint(10, 250, (3, 20))


def expert_lora(model, r=8):
    config = expert_lora_config(LoraConfig(r=r, lora_alpha=16, target_modules=["input_linear", "output_linear"], task_type="CAUSAL_LM"))
    return get_peft_model(model, config)


def randomise_b(model):
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)


def test_expert_lora_equals_peft_target_parameters(micro_model):
    """Same factors, two routes: ours (x.A.B per expert) and PEFT's (W + BA per expert), fp32, to 1e-5."""
    ours = expert_lora(load_causal_lm(micro_model))
    theirs = get_peft_model(load_causal_lm(micro_model), LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=[f"{b}.weight" for b in BANKS], task_type="CAUSAL_LM"))
    randomise_b(theirs)  # B starts at zero: without this both adapters would be no-ops
    ours_params, copied = dict(ours.named_parameters()), 0
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if hasattr(module, "num_experts") and "default" in getattr(module, "lora_A", {}):
                prefix = name
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # [E*r, in], [out, r*E]
                experts = module.num_experts
                ours_params[f"{prefix}.lora_A.default.weight"].copy_(a.reshape(experts, -1, a.shape[-1]))
                ours_params[f"{prefix}.lora_B.default.weight"].copy_(b.reshape(b.shape[0], -1, experts).permute(2, 0, 1))
                copied += 1
    assert copied == 4 * ours.base_model.model.config.num_hidden_layers
    batch = ids()
    with torch.no_grad():
        base_logits = load_causal_lm(micro_model)(batch).logits
    loss_ours = ours(input_ids=batch, labels=batch)
    loss_theirs = theirs(input_ids=batch, labels=batch)
    assert (loss_ours.logits - base_logits).abs().max().item() > 1e-3  # the adapters do something
    assert (loss_ours.logits - loss_theirs.logits).abs().max().item() < 1e-5
    loss_ours.loss.backward()
    loss_theirs.loss.backward()
    grad_ours = ours.base_model.model.model.layers[0].mlp.input_linear.lora_A["default"].weight.grad
    grad_theirs = theirs.base_model.model.model.layers[0].mlp.input_linear.lora_A["default"].weight.grad
    assert torch.allclose(grad_ours, grad_theirs.reshape(grad_ours.shape), atol=1e-5)


def test_only_adapters_train_and_every_bank_is_reached(micro_model):
    model = expert_lora(load_causal_lm(micro_model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    layers = model.base_model.model.config.num_hidden_layers
    assert sum(isinstance(m, ExpertLoraLayer) for m in model.modules()) == 4 * layers


def test_save_reload_and_merge(micro_model, tmp_path):
    model = expert_lora(load_causal_lm(micro_model)).eval()
    randomise_b(model)
    batch = ids()
    with torch.no_grad():
        expected = model(batch).logits
        model.save_pretrained(tmp_path)
        saved = load_file(tmp_path / "adapter_model.safetensors")
        assert any(k.endswith("mlp.input_linear.lora_A.weight") for k in saved)
        reloaded = PeftModel.from_pretrained(load_causal_lm(micro_model), tmp_path, config=expert_lora_config(LoraConfig.from_pretrained(tmp_path))).eval()
        assert (reloaded(batch).logits - expected).abs().max().item() < 1e-6
        merged = reloaded.merge_and_unload()
        assert type(merged).__name__ == "JetMoeForCausalLM"
        assert (merged(batch).logits - expected).abs().max().item() < 1e-5
        # the pipeline's loader merges an adapter directory onto its base by itself
        (tmp_path / "adapter_config.json").write_text((tmp_path / "adapter_config.json").read_text().replace('"base_model_name_or_path": null', f'"base_model_name_or_path": "{micro_model}"'))
        assert (load_causal_lm(str(tmp_path))(batch).logits - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("train_routers", [False, True])
def test_lora_sft_and_dpo_through_the_cli(micro_model, tmp_path, train_routers):
    fast = ["--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"]
    extra = ["--lora_modules_to_save", "[router]"] if train_routers else []
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "4", "--output_dir", str(tmp_path / "data")]) == 0
    sft = tmp_path / "sft"
    assert main(["sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(tmp_path / "data"), "--output_dir", str(sft), *fast, *extra]) == 0
    adapter = load_file(sft / "adapter_model.safetensors")
    assert any("experts.output_linear.lora_B" in k and adapter[k].abs().sum() > 0 for k in adapter)
    assert any("router" in k for k in adapter) == train_routers
    base = load_causal_lm(micro_model)
    merged = load_causal_lm(str(sft))
    changed = {n for (n, a), (_, b) in zip(base.named_parameters(), merged.named_parameters()) if not torch.equal(a, b)}
    assert any("mlp.input_linear" in n for n in changed) and any("router" in n for n in changed) == train_routers
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join('{"prompt": "sort 321", "chosen": "Answer: 123", "rejected": "Answer: 13%d"}\n' % i for i in range(8)))
    dpo = tmp_path / "dpo"
    assert main(["dpo", "--config", "recipes/tiny/dpo_lora.yaml", "--model_name_or_path", str(sft), "--dataset_path", str(pairs), "--output_dir", str(dpo), *fast, *extra]) == 0
    assert is_complete(dpo) and (dpo / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_lora_weights_means_what_it_means_in_peft(micro_model, init):
    model = get_peft_model(load_causal_lm(micro_model), expert_lora_config(LoraConfig(r=4, target_modules=["input_linear"], init_lora_weights=init, task_type="CAUSAL_LM")))
    layer = model.base_model.model.model.layers[0].mlp.input_linear
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.abs().sum() > 0 and (b.abs().sum() > 0) == (init is False)  # False: not a no-op, as in PEFT
    if init == "gaussian":
        assert a.std().item() == pytest.approx(1 / 4, rel=0.1)


def test_lora_options_the_expert_layer_lacks_are_refused(micro_model, tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "reverse ab"}, {"role": "assistant", "content": "Answer: ba"}]}\n')
    args = ["sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(data), "--output_dir", str(tmp_path / "out"), "--use_dora", "true"]
    assert main(args) == 2
    assert "use_dora: DoRA is not implemented for LoRA on the expert banks" in capsys.readouterr().err


def test_a_merged_adapter_disabled_gives_the_base_model(micro_model):
    """PEFT's rule for a merged layer under `disable_adapter()`: taken out of the weights again, not left in."""
    with torch.no_grad():
        base = load_causal_lm(micro_model).eval()(input_ids=ids()).logits
        model = expert_lora(load_causal_lm(micro_model)).eval()
        randomise_b(model)
        adapted = model(input_ids=ids()).logits
        model.merge_adapter()
        with model.disable_adapter():
            disabled = model(input_ids=ids()).logits
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(disabled, base, rtol=1e-5, atol=1e-5)
