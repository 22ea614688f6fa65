"""fp32 CPU matmuls through oneDNN: the same products as torch's own, and taken exactly where they should be."""

import collections

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from alignment.models import onednn
from alignment.models.experts import add_expert_lora, grouped_linear, linear_with_lora
from alignment.models.jetmoe import load_causal_lm

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="oneDNN's CPU matmul is in x86 torch builds only")


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ran = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ran[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def grads(fn, *tensors):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = fn(*tensors)
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    return [out.detach()] + [t.grad for t in tensors]


def test_linear_equals_nn_linear_forward_and_backward():
    torch.manual_seed(0)
    plain = nn.Linear(48, 80)
    fast = onednn.use_onednn_linears(nn.Sequential(nn.Linear(48, 80)))[0]
    fast.load_state_dict(plain.state_dict())
    assert type(fast) is onednn.Linear and isinstance(fast, nn.Linear)
    x = torch.randn(3, 7, 96)[..., ::2]  # batched and strided
    with Ops() as ops:
        mine = grads(lambda x, w, b: torch.func.functional_call(fast, {"weight": w, "bias": b}, (x,)), x, plain.weight, plain.bias)
    theirs = grads(lambda x, w, b: torch.func.functional_call(plain, {"weight": w, "bias": b}, (x,)), x, plain.weight, plain.bias)
    assert ops.ran["mkldnn._linear_pointwise"] == 3 and ops.ran["aten.mm"] == ops.ran["aten.addmm"] == 0  # forward, input and weight gradients
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_expert_linear_equals_one_matmul_per_expert(transposed):
    """Experts without tokens included (their weight gradient is zero), and a weight given as a transposed view (fused [E, in, out] layouts)."""
    torch.manual_seed(0)
    sizes = [5, 0, 9, 3]
    x, weight = torch.randn(sum(sizes), 32), torch.randn(4, 24, 32)
    stored = weight.transpose(1, 2).contiguous() if transposed else weight

    def loop(x, w):
        w = w.transpose(1, 2) if transposed else w
        return torch.cat([piece @ w[e].T for e, piece in enumerate(x.split(sizes))])

    def fast(x, w):
        return grouped_linear(x, w.transpose(1, 2) if transposed else w, sizes)

    with Ops() as ops:
        mine = grads(fast, x, stored)
    theirs = grads(loop, x, stored)
    assert ops.ran["smoe.expert_linear"] == 2 and ops.ran["aten._grouped_mm"] == 0  # forward and input gradient
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(mine[2][1]) == 0


def test_everything_else_takes_torchs_own_path():
    layer = onednn.use_onednn_linears(nn.Sequential(nn.Linear(16, 8)))[0]
    x = torch.randn(4, 16)
    for name, run in {
        "bf16": lambda: layer.to(torch.bfloat16)(x.bfloat16()),
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)(layer.float())(x),
        "switched off": lambda: (onednn.use_onednn(False), layer.float()(x))[1],
    }.items():
        try:
            with Ops() as ops:
                run()
        finally:
            onednn.use_onednn(True)
        assert ops.ran["mkldnn._linear_pointwise"] == 0 and ops.ran["aten.addmm"] + ops.ran["aten.linear"] > 0, name
    with Ops() as ops:
        layer.float()(x)
    assert ops.ran["mkldnn._linear_pointwise"] == 1


def test_a_loaded_model_trains_through_onednn_with_the_numbers_of_torchs_own(micro_model):
    """Every plain nn.Linear and every expert bank of a loaded JetMoE; logits and gradients as with oneDNN switched off."""
    torch.manual_seed(3)
    ids = torch.randint(10, 250, (3, 24))
    runs = {}
    for enabled in (True, False):
        onednn.use_onednn(enabled)
        try:
            model = load_causal_lm(micro_model)
            with Ops() as ops:
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
        finally:
            onednn.use_onednn(True)
        runs[enabled] = out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}, ops.ran
    (logits, grads_, ran), (plain_logits, plain_grads, plain_ran) = runs[True], runs[False]
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert ran["aten.mm"] == ran["aten._grouped_mm"] == 0 < ran["smoe.expert_linear"]
    assert plain_ran["mkldnn._linear_pointwise"] == plain_ran["smoe.expert_linear"] == 0
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads_[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_frozen_bank_and_its_adapter_in_one_pass_equal_the_two_in_turn():
    """linear_with_lora's one-pass path (base product + LoRA B product per expert, forward and backward)
    gives the numbers of the base bank followed by add_expert_lora, bit for bit, with an expert without tokens."""
    torch.manual_seed(0)
    sizes = [6, 0, 9, 4]
    x, weight = torch.randn(sum(sizes), 32), torch.randn(4, 24, 32)
    a, b = torch.randn(4, 3, 32), torch.randn(4, 24, 3)

    def in_turn(x, a, b):
        return add_expert_lora(grouped_linear(x, weight, sizes), x, a, b, 0.5, sizes)

    with Ops() as ops:
        fused = grads(lambda x, a, b: linear_with_lora(x, weight, [(a, b, 0.5)], sizes), x, a, b)
    assert ops.ran["smoe.expert_linear"] == 2 and ops.ran["aten.addmm"] == 0  # forward and input gradient, each with the B product inside
    for mine, theirs in zip(fused, grads(in_turn, x, a, b)):
        assert torch.equal(mine, theirs)
    assert torch.count_nonzero(fused[2][1]) == torch.count_nonzero(fused[3][1]) == 0
