"""Fused-expert families (transformers' use_experts_implementation): one layout view, expert LoRA per
expert through grouped matmul that stock PEFT loads and reproduces, all-linear on MoEs."""

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from alignment.errors import SmoeError
from alignment.models.lora import FusedExpertLora, expert_lora_config, resolve_all_linear
from alignment.models.moe import expert_weights, fused_experts, fused_layout
from alignment.models.tiny import build_tokenizer
from tests.test_experts import Ops

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts_per_tok=2)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4, decoder_sparse_step=1)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=48, num_experts=4)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=48, num_local_experts=4, layer_types=["full_attention"] * 2)),
}


def tiny(family: str, seed: int = 0):
    """A random tiny model of the family with the project tokenizer's vocabulary; weights large enough
    that LoRA changes the logits visibly."""
    config_name, extra = FAMILIES[family]
    tokenizer = build_tokenizer()
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **SHAPE, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.1)
    return model.eval()


def ids(seed: int = 1):
    return torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "family, layout",
    [("mixtral", ("gate_up_proj", False, False, True)), ("qwen2_moe", ("gate_up_proj", False, False, True)), ("olmoe", ("gate_up_proj", False, False, True)), ("gpt_oss", ("gate_up_proj", True, True, False))],
)
def test_layout_is_read_from_the_modules(family, layout):
    model = tiny(family)
    banks = fused_experts(model)
    assert len(banks) == 2
    view = fused_layout(next(iter(banks.values())))
    assert (view.up_name, view.transposed, view.bias, view.concatenated) == layout
    assert view.num_experts == 4
    rows = dict((name, rest) for name, *rest in expert_weights(model))
    intermediate = FAMILIES[family][1].get("moe_intermediate_size", FAMILIES[family][1].get("intermediate_size"))
    assert rows["model.layers.0.mlp.experts.gate_up_proj"] == [4, 32, 2 * intermediate]
    assert rows["model.layers.0.mlp.experts.down_proj"] == [4, intermediate, 32]


def test_a_module_that_does_not_fit_is_refused_by_name():
    class OddExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 8, 8))

    holder = nn.Sequential(OddExperts())
    with pytest.raises(SmoeError, match="OddExperts"):
        fused_experts(holder)


def adapted(model, **lora):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "experts"], init_lora_weights=False, **lora)
    return get_peft_model(copy.deepcopy(model), expert_lora_config(config, model))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stock_peft_loads_our_adapter_and_reproduces_our_logits(family, tmp_path, monkeypatch):
    base = tiny(family)
    ours = adapted(base)
    config = ours.peft_config["default"]
    assert sorted(config.target_parameters) == [f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1) for w in ("down_proj", "gate_up_proj")]
    assert "experts" not in config.target_modules
    assert sum(isinstance(m, FusedExpertLora) for m in ours.modules()) == 4  # gate/up and down, 2 layers

    def no_dense_update(*args, **kwargs):
        raise AssertionError("W + BA was built")

    with monkeypatch.context() as patch:  # our forward and backward never go through PEFT's W + BA path
        patch.setattr(ParamWrapper, "_activate_lora", no_dense_update)
        ours.train()
        ours(ids(), labels=ids()).loss.backward()
        ours.eval()
        with torch.no_grad():
            our_logits = ours(ids()).logits
    grads = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any("experts.base_layer.lora_A" in n for n in grads) and any("experts.lora_B" in n for n in grads)
    ours.save_pretrained(tmp_path)

    stock = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()  # no registration: PEFT's own ParamWrapper
    assert not any(isinstance(m, FusedExpertLora) for m in stock.modules())
    with torch.no_grad():
        stock_logits, base_logits = stock(ids()).logits, base(ids()).logits
    assert (our_logits - base_logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(our_logits, stock_logits, atol=1e-5, rtol=0)


def test_merge_and_unmerge_the_peft_way():
    base = tiny("qwen2_moe")
    model = adapted(base, modules_to_save=None)
    experts = model.base_model.model.model.layers[0].mlp.experts
    before = experts.get_base_layer().down_proj.detach().clone()
    with torch.no_grad():
        unmerged = model(ids()).logits
        model.merge_adapter()
        merged = model(ids()).logits
        model.unmerge_adapter()
        again = model(ids()).logits
        with model.disable_adapter():
            plain = model(ids()).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(experts.get_base_layer().down_proj, before, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain, base(ids()).logits, atol=1e-6, rtol=0)
    final = model.merge_and_unload()
    assert type(final.model.layers[0].mlp.experts).__name__ == "Qwen2MoeExperts"
    torch.testing.assert_close(final(ids()).logits, unmerged, atol=1e-5, rtol=0)


def test_routers_frozen_by_default_and_trainable_by_modules_to_save():
    base = tiny("mixtral")
    frozen = adapted(base)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if ".gate." in n)
    trained = adapted(base, modules_to_save=["gate"])
    assert any(p.requires_grad for n, p in trained.named_parameters() if "mlp.gate" in n)


def test_all_linear_on_moes_is_attention_and_every_expert_weight(micro_model):
    from alignment.models.jetmoe import load_causal_lm

    modules, parameters = resolve_all_linear(tiny("qwen2_moe"))
    assert modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # attention + shared expert
    assert parameters == [f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1) for w in ("down_proj", "gate_up_proj")]
    model = tiny("mixtral")
    config = expert_lora_config(LoraConfig(r=2, lora_dropout=0.0, target_modules="all-linear"), model)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    adapted_names = {n.rpartition(".lora_A")[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert not any(".gate" in n or "lm_head" in n for n in adapted_names)
    assert sum(isinstance(m, FusedExpertLora) for m in peft_model.modules()) == 4
    jetmoe_modules, jetmoe_parameters = resolve_all_linear(load_causal_lm(micro_model))
    assert {"input_linear", "output_linear", "kv_proj"} <= set(jetmoe_modules) and "layer" not in jetmoe_modules and not jetmoe_parameters


def test_dropout_on_fused_experts_is_refused():
    model = tiny("olmoe")
    with pytest.raises(SmoeError, match="lora_dropout"):
        expert_lora_config(LoraConfig(r=2, lora_dropout=0.05, target_modules=["experts"]), model)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_nf4_fused_experts_per_expert_with_lora(family, monkeypatch):
    import bitsandbytes.functional

    from alignment.models.quant import NF4Experts, fused_quantized, quantize_fused_experts

    base = tiny(family)
    full_bytes = sum(p.numel() * 2 for n, p in base.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))  # as bf16
    reference = copy.deepcopy(base)
    quantized = quantize_fused_experts(copy.deepcopy(base), compute_dtype=torch.float32)
    assert fused_quantized(quantized)
    experts = quantized.model.layers[0].mlp.experts
    nf4 = [p for p in experts.parametrizations.down_proj if isinstance(p, NF4Experts)][0]
    assert nf4.num_experts == 4 and nf4.absmax.dtype == torch.uint8 and nf4.nested_absmax.shape[0] == 4  # per expert, block scales double quantised
    assert experts.parametrizations.down_proj.original.dtype == torch.uint8
    nf4_bytes = sum(
        [p for p in m.parametrizations[name] if isinstance(p, NF4Experts)][0].storage_bytes(m.parametrizations[name].original)
        for m in fused_experts(quantized).values()
        for name in ("gate_up_proj", "down_proj")
    )
    assert nf4_bytes <= 0.3 * full_bytes
    # the NF4 weights, dequantised, equal bitsandbytes' round trip of each expert [out, in] alone
    functional = bitsandbytes.functional
    original = reference.model.layers[0].mlp.experts.down_proj.detach()
    transposed = fused_layout(experts).transposed
    round_trip = []
    for expert in original.unbind(0):
        matrix = (expert.t() if transposed else expert).contiguous()
        back = functional.dequantize_4bit(*functional.quantize_4bit(matrix, blocksize=64, quant_type="nf4", compress_statistics=True))
        round_trip.append(back.t() if transposed else back)
    torch.testing.assert_close(experts.down_proj, torch.stack(round_trip), atol=0, rtol=0)
    def whole_bank(*args):
        raise AssertionError("a whole expert bank was dequantised")

    with monkeypatch.context() as patch, torch.no_grad():  # frozen 4-bit experts (LoRA elsewhere) run per expert too
        patch.setattr(NF4Experts, "forward", whole_bank)
        quantized(ids())
    lora = get_peft_model(quantized, expert_lora_config(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["experts"], init_lora_weights=False), quantized))
    lora.train()
    lora(ids(), labels=ids()).loss.backward()
    grads = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    with pytest.raises(ValueError, match="4-bit"):
        lora.merge_adapter()
    # with the adapter, the 4-bit model gives PEFT's answer on the dequantised weights
    dequantized = copy.deepcopy(reference)
    for name, module in fused_experts(dequantized).items():
        q = quantized.get_submodule(name).get_base_layer()  # get_peft_model wrapped it in place
        for w in ("gate_up_proj", "down_proj"):
            getattr(module, w).data = getattr(q, w).detach().clone()
    lora.eval()
    with torch.no_grad():
        ours = lora(ids()).logits
    sd = {k.replace("base_model.model.", ""): v for k, v in lora.state_dict().items() if "lora_" in k}
    plain = get_peft_model(dequantized, LoraConfig(r=4, lora_alpha=8, target_parameters=["experts.gate_up_proj", "experts.down_proj"], target_modules=[]))
    assert not any(isinstance(m, FusedExpertLora) for m in plain.modules())
    plain.base_model.model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours, plain(ids()).logits, atol=1e-4, rtol=0)


def test_qlora_sft_then_lora_dpo_on_a_fused_moe_through_the_cli(tmp_path):
    """Qwen2-MoE (shared expert): all-linear + load_in_4bit trains attention, shared expert and every
    expert weight in 4-bit; the adapter loads in stock PEFT onto the full model; dDPO trains from it."""
    import json

    from safetensors.torch import load_file

    from alignment.cli import main
    from alignment.models.jetmoe import load_causal_lm

    base_dir = tmp_path / "base"
    tiny("qwen2_moe").save_pretrained(base_dir)
    build_tokenizer().save_pretrained(base_dir)
    fast = ["--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"]
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "4", "--output_dir", str(tmp_path / "data")]) == 0
    sft = tmp_path / "sft"
    qlora = ["--lora_target_modules", "all-linear", "--load_in_4bit", "true", "--max_steps", "1", "--warmup_steps", "0"]  # 4-bit steps are slow on CPU
    assert main(["sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", str(base_dir), "--dataset_path", str(tmp_path / "data"), "--output_dir", str(sft), *fast, *qlora]) == 0
    targets = json.loads((sft / "manifest.json").read_text())["lora_targets"]
    # named in full: the shared expert's down_proj shares its name with the 4-bit fused down_proj
    assert {t.rpartition(".")[2] for t in targets["target_modules"]} == {"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"}
    assert not any("experts" in t and "shared" not in t for t in targets["target_modules"])
    assert len(targets["target_parameters"]) == 4
    adapter = load_file(sft / "adapter_model.safetensors")
    assert any("experts.lora_B" in k and adapter[k].abs().sum() > 0 for k in adapter)
    assert not any(".gate." in k or "shared_expert_gate" in k or "lm_head" in k for k in adapter)
    stock = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), sft).eval()
    ours = load_causal_lm(str(sft)).eval()  # merged through our loading path
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()).logits, stock(ids()).logits, atol=1e-5, rtol=0)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join('{"prompt": "sort 321", "chosen": "Answer: 123", "rejected": "Answer: 13%d"}\n' % i for i in range(8)))
    assert main(["dpo", "--config", "recipes/tiny/dpo_lora.yaml", "--model_name_or_path", str(sft), "--dataset_path", str(pairs), "--output_dir", str(tmp_path / "dpo"), "--lora_target_modules", "[q_proj, experts]", *fast]) == 0
    assert len(json.loads((tmp_path / "dpo" / "manifest.json").read_text())["lora_targets"]["target_parameters"]) == 4


def test_a_target_that_matches_nothing_is_refused(tmp_path, capsys):
    model = tiny("mixtral")
    with pytest.raises(SmoeError, match="input_linear"):
        expert_lora_config(LoraConfig(r=2, lora_dropout=0.0, target_modules=["q_proj", "input_linear"]), model)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_4bit_loading_quantizes_each_experts_weight_as_it_loads(family, tmp_path, monkeypatch):
    """load_in_4bit on a fused MoE: nn.Linear layers through bitsandbytes, expert weights in NF4 per
    expert while the checkpoint is read, so no full-precision experts weight waits in the model for
    the others; the model equals the one quantized after a full load."""
    import alignment.models.fused_4bit as fused_4bit
    from alignment.models.fused_4bit import Fused4bitConfig
    from alignment.models.quant import fused_quantized, quantize_fused_experts

    tiny(family).save_pretrained(tmp_path)
    options = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["gate", "router", "lm_head"])
    loading, full_precision_seen = [], []

    def spy(weight, transposed):
        model = loading[0]
        full_precision_seen.append(sum(p.dim() == 3 and p.is_floating_point() and not p.is_meta for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))))
        return quantize_bank(weight, transposed)

    quantize_bank = fused_4bit.quantize_bank
    original_before = fused_4bit._Fused4bitQuantizer._process_model_before_weight_loading
    monkeypatch.setattr(fused_4bit._Fused4bitQuantizer, "_process_model_before_weight_loading", lambda self, model, *a, **k: (loading.append(model), original_before(self, model, *a, **k))[1])
    monkeypatch.setattr(fused_4bit, "quantize_bank", spy)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=Fused4bitConfig(**options)).train()
    monkeypatch.undo()
    assert full_precision_seen == [0, 0, 0, 0]  # 2 layers x gate/up and down, each packed before the next is read
    assert fused_quantized(loaded) and not any(p.dim() == 3 and p.is_floating_point() for p in loaded.parameters())
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    after = quantize_fused_experts(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=transformers.BitsAndBytesConfig(**options)), torch.float32).train()
    with torch.no_grad():  # train mode: bitsandbytes' CPU inference repacking needs rows of 64 or more
        assert torch.equal(loaded(ids()).logits, after(ids()).logits)


def test_a_4bit_fused_model_saves_reloads_without_quantizing_and_its_adapter_merges(tmp_path, monkeypatch):
    """`smoe-align quantize` on a fused MoE: reloading reads the packed weights and NF4 states as they
    are (no quantizing, no full-size bank), with logits equal to the model as quantized; QLoRA from it
    trains, and its adapter merges into the dequantized weights (stock PEFT gives the same logits)."""
    import alignment.models.fused_4bit as fused_4bit
    from alignment.cli import main
    from alignment.models.jetmoe import load_causal_lm
    from alignment.models.quant import NF4Experts, fused_quantized, is_quantized_checkpoint

    base = tmp_path / "base"
    tiny("mixtral").save_pretrained(base)
    build_tokenizer().save_pretrained(base)
    assert main(["quantize", "--model_name_or_path", str(base), "--output_dir", str(tmp_path / "q"), "--dtype", "float32"]) == 0
    assert is_quantized_checkpoint(tmp_path / "q")
    options = dict(bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["gate", "router", "lm_head"])  # as quantize does
    quantized = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=fused_4bit.Fused4bitConfig(**options)).train()

    def refused(*args, **kwargs):
        raise AssertionError("reloading quantized or built a full-size bank")

    with monkeypatch.context() as patch:
        patch.setattr(fused_4bit, "quantize_bank", refused)
        patch.setattr(NF4Experts, "forward", refused)
        reloaded = load_causal_lm(str(tmp_path / "q")).train()
        assert fused_quantized(reloaded) and type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
        assert not any(p.is_floating_point() and p.dim() == 3 for p in reloaded.parameters())
        with torch.no_grad():  # train mode: bitsandbytes' CPU inference repacking needs rows of 64 or more
            assert torch.equal(reloaded(ids()).logits, quantized(ids()).logits)

    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "4", "--output_dir", str(tmp_path / "data")]) == 0
    fast = ["--max_steps", "1", "--warmup_steps", "0", "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--load_in_4bit", "true", "--lora_target_modules", "[q_proj, experts]"]
    sft = tmp_path / "sft"
    assert main(["sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", str(tmp_path / "q"), "--dataset_path", str(tmp_path / "data"), "--output_dir", str(sft), *fast]) == 0
    full = ["--max_steps", "1", "--report_to", "none"]
    assert main(["sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", str(tmp_path / "q"), "--dataset_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "full"), *full]) == 2
    merged = load_causal_lm(str(sft)).eval()
    assert not fused_quantized(merged) and not any("4bit" in type(m).__name__ for m in merged.modules())
    dequantized = load_causal_lm(str(tmp_path / "q")).dequantize()
    stock = PeftModel.from_pretrained(dequantized, sft).eval()
    with torch.no_grad():
        merged_logits = merged(ids()).logits
        torch.testing.assert_close(merged_logits, stock(ids()).logits, atol=1e-5, rtol=0)
        with stock.disable_adapter():
            assert (merged_logits - stock(ids()).logits).abs().max() > 1e-3  # the adapter does something


def test_an_expert_weight_named_as_a_module_is_refused_with_the_module_to_name():
    with pytest.raises(SmoeError, match="gate_up_proj is a weight of the fused experts: name their module, experts, to adapt down_proj and gate_up_proj"):
        expert_lora_config(LoraConfig(r=2, lora_dropout=0.0, target_modules=["q_proj", "gate_up_proj"]), tiny("mixtral"))


def test_4bit_keys_that_cannot_be_honoured_stop_with_the_key_and_the_fix(tmp_path, monkeypatch, capsys):
    """fp4 for fused experts (held in NF4 only), and a bitsandbytes that imports but cannot run 4-bit here."""
    import bitsandbytes.functional

    from alignment.cli import main
    from alignment.models import quant

    tiny("mixtral").save_pretrained(tmp_path / "base")
    build_tokenizer().save_pretrained(tmp_path / "base")
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "sort 21"}, {"role": "assistant", "content": "Answer: 12"}]}\n' * 4)
    sft = ["sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", str(tmp_path / "base"), "--dataset_path", str(data), "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--report_to", "none", "--load_in_4bit", "true"]
    assert main([*sft, "--bnb_4bit_quant_type", "fp4"]) == 2
    assert "recipe key bnb_4bit_quant_type: bnb_4bit_quant_type fp4: fused expert weights are held in NF4 only" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    quant.usable_bitsandbytes.cache_clear()
    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", broken)
    sft[sft.index(str(tmp_path / "o"))] = str(tmp_path / "o2")
    assert main(sft) == 2
    err = capsys.readouterr().err
    assert "recipe key load_in_4bit: bitsandbytes" in err and "cannot run 4-bit weights on cpu (RuntimeError: no kernel for this device)" in err
    assert "set load_in_4bit: false" in err
    monkeypatch.undo()
    quant.usable_bitsandbytes.cache_clear()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fused_forward_equals_the_stock_experts_and_copies_no_gate_halves(family):
    """Our fused forward (no adapter) against the module's own grouped_mm forward: the same output and
    input gradient. With transformers' default SiLU gate (Mixtral) the backward writes the gate and up
    gradients into one tensor, so nothing is concatenated; a family with its own gate (gpt-oss) keeps it."""
    from alignment.models.moe import fused_experts_forward

    experts = tiny(family).model.layers[0].mlp.experts
    experts.config._experts_implementation = "grouped_mm"
    torch.manual_seed(2)
    x0 = torch.randn(10, 32)
    index, weights = torch.rand(10, 4).topk(2, dim=-1).indices, torch.rand(10, 2)
    grad = torch.randn(10, 32)
    results = []
    for forward in (experts, lambda *a: fused_experts_forward(experts, *a)):
        x = x0.clone().requires_grad_()
        out = forward(x, index, weights)
        with Ops() as ops:
            out.backward(grad)
        results.append((out.detach(), x.grad, [name for name, _ in ops.seen]))
    (stock, stock_grad, stock_ops), (ours, our_grad, our_ops) = results
    assert torch.allclose(ours, stock, atol=1e-6) and torch.allclose(our_grad, stock_grad, atol=1e-6)
    if family == "mixtral":
        assert "aten.cat" in stock_ops and "aten.cat" not in our_ops
