"""The fast JetMoE expert path computes what the stock one does, without the costly operations it replaces."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignment.models.experts import add_expert_lora, expert_lora, use_fast_experts
from alignment.models.jetmoe import load_causal_lm
from alignment.models.onednn import use_onednn

SCATTERS = ("aten.index_add", "aten.index_put", "aten._index_put_impl_", "aten.scatter_add")


class Ops(TorchDispatchMode):
    """Records (operator name, dtypes of its tensor arguments) of everything that runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append((str(func.overloadpacket), [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def forward_backward(model_dir: str, fast: bool):
    use_fast_experts(fast)
    use_onednn(False)  # torch's own matmuls on both sides (oneDNN's sum in another order: tests/test_onednn.py)
    try:
        model = load_causal_lm(model_dir)
        use_fast_experts(fast)  # loading switches the fast path on
        torch.manual_seed(3)
        ids = torch.randint(10, 250, (3, 24))
        with Ops() as ops:
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        scatters = collections.Counter(name for name, _ in ops.seen if name.startswith(SCATTERS))
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}, scatters, model.config.num_hidden_layers
    finally:
        use_fast_experts(True)
        use_onednn(True)


def test_fast_moe_layers_equal_stock_bit_for_bit_without_scatters(micro_model):
    """Top-2 routing: logits and every gradient identical to the stock per-expert loop with index_add, and
    no scatter of token rows (index_add, accumulating index_put) in the forward or the backward: what is left
    is the stock router's gather of its [tokens x k] gate values, whose backward is one per router."""
    stock_logits, stock_grads, stock_ops, _ = forward_backward(micro_model, fast=False)
    fast_logits, fast_grads, fast_ops, layers = forward_backward(micro_model, fast=True)
    assert torch.equal(stock_logits, fast_logits)
    assert stock_grads.keys() == fast_grads.keys()
    for name, grad in stock_grads.items():
        assert torch.equal(grad, fast_grads[name]), name
    assert stock_ops["aten.index_add"] == 3 * layers and stock_ops["aten.index_put"] > 2 * layers  # what the check counts is there in stock
    assert fast_ops == {"aten.index_put": 2 * layers}


def test_expert_lora_runs_in_the_tokens_dtype():
    """bf16 tokens with PEFT's fp32 factors: the low-rank matmuls run in bf16 (no fp32 copy of the tokens),
    and the result equals the fp32 computation to bf16 precision."""
    torch.manual_seed(0)
    sizes = [5, 0, 7, 4]
    x = torch.randn(sum(sizes), 64)
    a, b = torch.randn(4, 16, 64) / 8, torch.randn(4, 32, 16) / 4
    exact = expert_lora(x, a, b, 2.0, sizes)
    with Ops() as ops:
        low = expert_lora(x.bfloat16(), a, b, 2.0, sizes)
    matmuls = [dtypes for name, dtypes in ops.seen if "mm" in name]
    assert matmuls and all(dtype == torch.bfloat16 for dtypes in matmuls for dtype in dtypes if dtype.is_floating_point)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), exact, rtol=2e-2, atol=2e-2)
    for e, (start, end) in enumerate(zip([0, 5, 5, 12], [5, 5, 12, 16])):  # per expert: x_e A_e^T B_e^T * 2
        assert torch.allclose(exact[start:end], x[start:end] @ a[e].T @ b[e].T * 2.0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input_grad", [True, False])
def test_lora_summed_by_addmm_on_the_cpu_equals_the_grouped_lora(dtype, input_grad):
    """The CPU path (one BLAS call per expert, the update and the base output summed by addmm) against the
    grouped matmuls other devices run: the same output and the same gradients for the tokens and both
    factors, an expert without tokens included, and no [tokens, out] LoRA product built and then added."""
    torch.manual_seed(0)
    sizes, starts = [5, 0, 7, 4], [0, 5, 5, 12]
    x0, w = torch.randn(16, 64, dtype=dtype), torch.randn(4, 32, 64, dtype=dtype) / 8
    a0, b0 = torch.randn(4, 16, 64) / 8, torch.randn(4, 32, 16) / 4
    weights = torch.linspace(-1, 1, 16 * 32).view(16, 32)

    def run(add_lora):
        x, a, b = x0.clone().requires_grad_(input_grad), a0.clone().requires_grad_(), b0.clone().requires_grad_()
        base = torch.cat([x[s : s + n] @ w[e].T for e, (s, n) in enumerate(zip(starts, sizes))])
        kept = base.detach().clone()
        with Ops() as ops:
            y = add_lora(base, x, a, b)
        assert torch.equal(base, kept)  # never changed: selective checkpointing may hold the base output
        (y.float() * weights).sum().backward()
        return y.detach().float(), [t.grad for t in (x, a, b)], [name for name, _ in ops.seen]

    grouped, grouped_grads, _ = run(lambda y, x, a, b: y + expert_lora(x, a.to(dtype), b.to(dtype), 2.0, sizes))
    summed, summed_grads, ops = run(lambda y, x, a, b: add_expert_lora(y, x, a, b, 2.0, sizes))
    assert "aten.addmm" in ops and "aten.add" not in ops
    exact = torch.cat([(x0[s : s + n] @ w[e].T).float() + x0[s : s + n].float() @ a0[e].T @ b0[e].T * 2.0 for e, (s, n) in enumerate(zip(starts, sizes))])
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    assert torch.allclose(summed, exact, atol=tolerance) and torch.allclose(grouped, exact, atol=tolerance)
    assert (summed_grads[0] is None) == (grouped_grads[0] is None) == (not input_grad)
    for mine, theirs in zip(summed_grads, grouped_grads):
        if mine is not None:
            assert mine.dtype == theirs.dtype and torch.allclose(mine.float(), theirs.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)
    assert summed_grads[1][1].abs().sum() == 0  # the expert without tokens: no gradient


def test_lora_on_an_output_of_another_dtype_is_added_out_of_place():
    """An fp32 base output with bf16 tokens (no shared addmm): the bf16 update, added as before."""
    torch.manual_seed(0)
    sizes, x = [3, 5], torch.randn(8, 32, dtype=torch.bfloat16)
    a, b, y = torch.randn(2, 8, 32), torch.randn(2, 16, 8), torch.randn(8, 16)
    out = add_expert_lora(y, x, a, b, 0.5, sizes)
    assert out is not y and out.dtype == torch.float32
    assert torch.equal(out, y + expert_lora(x, a.bfloat16(), b.bfloat16(), 0.5, sizes).float())
