"""4-bit NF4 experts for QLoRA: per-expert products, storage, training, and adapters that move to full precision."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import load_file
from transformers.models.jetmoe.modeling_jetmoe import JetMoeParallelExperts

from alignment.cli import main
from alignment.models.jetmoe import load_causal_lm
from alignment.models.quant import QuantizedExperts, quantize_experts


def bank(experts=8, out=256, inp=128):
    torch.manual_seed(0)
    b = JetMoeParallelExperts(experts, inp, out)
    torch.nn.init.normal_(b.weight, std=0.02)
    return b


def test_each_expert_is_quantised_alone_and_multiplied_exactly():
    full = bank()
    quantised = QuantizedExperts.from_bank(full, torch.float32)
    sizes = [5, 0, 7, 3, 1, 0, 9, 2]  # empty experts too
    x = torch.randn(sum(sizes), full.input_size)
    y = quantised(x, sizes)
    for e, (chunk, out) in enumerate(zip(x.split(sizes), y.split(sizes))):
        weight = bnbf.dequantize_4bit(getattr(quantised, f"packed_{e}"), quantised.states[e])
        assert torch.allclose(out, chunk @ weight.t(), atol=1e-5)
        assert (weight - full.weight[e]).norm() / full.weight[e].norm() < 0.12  # NF4 error, 4 bits
    assert quantised.states[0].nested  # double quantisation of the block scales
    assert quantised.storage_bytes() / (full.weight.numel() * 2) <= 0.26  # FINDINGS: 4.13 bits, 0.258x bf16


def test_quantize_experts_replaces_every_bank(micro_model):
    model = quantize_experts(load_causal_lm(micro_model), torch.float32)
    assert sum(isinstance(m, QuantizedExperts) for m in model.modules()) == 4 * model.config.num_hidden_layers
    assert not any(p.dim() == 3 for p in model.parameters())


def test_qlora_sft_then_dpo_and_the_adapter_merges_into_full_precision(micro_model, tmp_path):
    fast = ["--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--load_in_4bit", "true"]
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "4", "--output_dir", str(tmp_path / "data")]) == 0
    sft = tmp_path / "sft"
    assert main(["sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(tmp_path / "data"), "--output_dir", str(sft), *fast]) == 0
    adapter = load_file(sft / "adapter_model.safetensors")
    assert any("mlp.input_linear.lora_B" in k and adapter[k].abs().sum() > 0 for k in adapter)
    base, merged = load_causal_lm(micro_model), load_causal_lm(str(sft))  # onto the full-precision base
    expert_weights = [n for n, p in base.named_parameters() if p.dim() == 3]
    assert all(not torch.equal(base.get_parameter(n), merged.get_parameter(n)) for n in expert_weights)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join('{"prompt": "sort 321", "chosen": "Answer: 123", "rejected": "Answer: 13%d"}\n' % i for i in range(8)))
    assert main(["dpo", "--config", "recipes/tiny/dpo_lora.yaml", "--model_name_or_path", str(sft), "--dataset_path", str(pairs), "--output_dir", str(tmp_path / "dpo"), *fast]) == 0
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()


def test_a_quantized_model_saves_and_reloads_without_quantizing_again(micro_model, tmp_path, monkeypatch):
    import alignment.models.quant as quant

    assert main(["quantize", "--model_name_or_path", micro_model, "--output_dir", str(tmp_path / "q"), "--dtype", "float32"]) == 0
    expected = quantize_experts(load_causal_lm(micro_model), torch.float32).eval()
    monkeypatch.setattr(quant.QuantizedExperts, "from_bank", None)  # loading must not quantize
    reloaded = load_causal_lm(str(tmp_path / "q")).eval()
    assert sum(isinstance(m, QuantizedExperts) for m in reloaded.modules()) == 4 * reloaded.config.num_hidden_layers
    assert not any(p.dim() == 3 for p in reloaded.parameters())
    ids = torch.randint(10, 250, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected(ids).logits)
    monkeypatch.undo()
    # QLoRA from the 4-bit checkpoint; its adapter merges into the dequantised experts
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "4", "--output_dir", str(tmp_path / "data")]) == 0
    fast = ["--max_steps", "2", "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--load_in_4bit", "true"]
    assert main(["sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", str(tmp_path / "q"), "--dataset_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "sft"), *fast]) == 0
    merged = load_causal_lm(str(tmp_path / "sft"))
    assert not any(isinstance(m, QuantizedExperts) for m in merged.modules())
    assert main(["sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", str(tmp_path / "q"), "--dataset_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "full")]) == 2


@pytest.mark.parametrize("per_group", [4, 2, 1])  # experts whose dequantised weights fit DEQUANT_GROUP_BYTES together
@pytest.mark.parametrize("out", [96, 128])  # 192 block scales per expert, or exactly one block (256) of their own scales
def test_fused_nf4_experts_dequantise_together_exactly_as_one_by_one(out, per_group, monkeypatch):
    """The experts that receive tokens are dequantised in groups of bounded bytes (one call each) and
    multiplied by one grouped matmul per group, forward and backward; the result equals bitsandbytes
    expert by expert, bit for bit, and no call dequantises more than a group."""
    from alignment.models import quant
    from alignment.models.quant import NF4Experts

    monkeypatch.setattr(quant, "DEQUANT_GROUP_BYTES", per_group * out * 128 * 4)  # float32 experts [out, 128]
    calls, dequantize = [], NF4Experts.dequantize
    monkeypatch.setattr(NF4Experts, "dequantize", lambda self, packed, experts: calls.append(len(experts)) or dequantize(self, packed, experts))

    torch.manual_seed(0)
    weight = torch.randn(4, out, 128) * 0.02  # [E, out, in]; rows as long as two blocks
    packed, states = zip(*(bnbf.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True) for w in weight))
    nf4, packed = NF4Experts.from_states(list(states), transposed=False, compute_dtype=torch.float32), torch.stack(packed)
    one_by_one = torch.stack([bnbf.dequantize_4bit(p, s) for p, s in zip(packed, states)])
    assert torch.equal(nf4.dequantize(packed, [0, 1, 2, 3]), one_by_one)
    assert torch.equal(nf4.dequantize(packed, [1, 3]), one_by_one[[1, 3]])
    sizes = [3, 0, 5, 2]  # an expert without tokens is never dequantised
    x = torch.randn(sum(sizes), 128, requires_grad=True)
    reference_x = x.detach().clone().requires_grad_()
    y = nf4.matmul(packed, x, sizes)
    reference = torch.cat([chunk @ one_by_one[e].t() for e, chunk in enumerate(reference_x.split(sizes))])
    torch.testing.assert_close(y, reference, atol=1e-6, rtol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(x.grad, reference_x.grad, atol=1e-6, rtol=0)
    assert max(calls[2:]) == min(per_group, 3) and sum(calls[2:]) == 2 * 3  # three experts with tokens, forward and backward


@pytest.mark.parametrize("per_group", [3, 1])
def test_jetmoe_nf4_bank_runs_grouped_forward_and_backward(per_group, monkeypatch):
    """JetMoE's 4-bit banks take the same grouped path: experts with tokens dequantised a bounded group at a
    time (never the bank, never an empty expert), forward and backward equal to each expert's own product."""
    from alignment.models import quant

    full = bank()
    quantised = QuantizedExperts.from_bank(full, torch.float32)
    monkeypatch.setattr(quant, "DEQUANT_GROUP_BYTES", per_group * full.output_size * full.input_size * 4)
    calls, dequantize = [], QuantizedExperts.dequantize
    monkeypatch.setattr(QuantizedExperts, "dequantize", lambda self, packed, experts: calls.append(list(experts)) or dequantize(self, packed, experts))
    sizes = [5, 0, 7, 3, 1, 0, 9, 2]
    x = torch.randn(sum(sizes), full.input_size, requires_grad=True)
    reference_x = x.detach().clone().requires_grad_()
    weights = [bnbf.dequantize_4bit(getattr(quantised, f"packed_{e}"), quantised.states[e]) for e in range(len(sizes))]
    y = quantised(x, sizes)
    reference = torch.cat([chunk @ w.t() for chunk, w in zip(reference_x.split(sizes), weights)])
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(x.grad, reference_x.grad, atol=1e-5, rtol=0)
    active = [e for e, size in enumerate(sizes) if size]
    assert max(map(len, calls)) == per_group and sorted(e for c in calls for e in c) == sorted(2 * active)
