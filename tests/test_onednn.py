"""fp32 CPU matmuls through oneDNN: the same products as torch's own, and taken exactly where they should be."""

import collections

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from alignment.cli import main
from alignment.manifest import read_manifest
from alignment.models import onednn
from alignment.models.experts import add_expert_lora, grouped_linear, linear_with_lora
from alignment.models.jetmoe import load_causal_lm
from alignment.models.lora import expert_lora_config
from tests.test_experts import Ops

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="oneDNN's CPU matmul is in x86 torch builds only")


def ran(ops: Ops) -> collections.Counter:
    return collections.Counter(name for name, _ in ops.seen)


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
    assert ran(ops)["mkldnn._linear_pointwise"] == 3 and ran(ops)["aten.mm"] == ran(ops)["aten.addmm"] == 0  # forward, input and weight gradients
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("sizes_per_doubling", [8, 2])
def test_expert_linear_equals_one_matmul_per_expert(transposed, sizes_per_doubling, monkeypatch):
    """Experts without tokens included (their weight gradient is zero), and a weight given as a transposed view
    (fused [E, in, out] layouts). With 2 row sizes per doubling the row counts are rounded up in forward and
    input gradient: the first expert multiplies its neighbour's row too, the last one a row before its own. The
    weight gradients sum over the expert's own rows (neighbours' rows would be summed in)."""
    monkeypatch.setattr(onednn, "ROW_SIZES", sizes_per_doubling)
    torch.manual_seed(0)
    sizes = [5, 0, 8, 7]
    x, weight = torch.randn(sum(sizes), 32), torch.randn(4, 24, 32)
    stored = weight.transpose(1, 2).contiguous() if transposed else weight

    def loop(x, w):
        w = w.transpose(1, 2) if transposed else w
        return torch.cat([piece @ w[e].T for e, piece in enumerate(x.split(sizes))])

    def fast(x, w):
        return grouped_linear(x, w.transpose(1, 2) if transposed else w, sizes)

    shapes, linear = [], onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda x, *rest: shapes.append(tuple(x.shape)) or linear(x, *rest))
    with Ops() as ops:
        mine = grads(fast, x, stored)
    theirs = grads(loop, x, stored)
    assert ran(ops)["smoe.expert_linear"] == 2 and ran(ops)["aten._grouped_mm"] == 0  # forward and input gradient
    assert ran(ops)["mkldnn._linear_pointwise"] == 3  # weight gradients
    # the left operand of every product: forward and input gradient [rows, width], weight gradient [out, rows]
    # (with 8 sizes per doubling these row counts are all their own sizes)
    assert shapes == {
        8: [(5, 32), (8, 32), (7, 32), (5, 24), (8, 24), (7, 24), (24, 5), (24, 8), (24, 7)],
        2: [(6, 32), (8, 32), (8, 32), (6, 24), (8, 24), (8, 24), (24, 5), (24, 8), (24, 7)],
    }[sizes_per_doubling]
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(mine[2][1]) == 0


def test_a_bank_with_no_routed_rows_gives_zeros():
    x, weight = torch.randn(3, 8, requires_grad=True), torch.randn(2, 4, 8, requires_grad=True)
    out = grouped_linear(x, weight, [0, 0])
    out.sum().backward()
    assert out.shape == (3, 4) and not out.any() and not x.grad.any() and not weight.grad.any()


def test_rows_routed_to_no_expert_give_zeros_after_the_routed_ones():
    x, weight = torch.randn(10, 8, requires_grad=True), torch.randn(3, 4, 8)
    out = grouped_linear(x, weight, [3, 0, 4])
    out.sum().backward()
    torch.testing.assert_close(out[:7], torch.cat([x[:3] @ weight[0].T, x[3:7] @ weight[2].T]), rtol=1e-5, atol=1e-5)
    assert out.shape == (10, 4) and not out[7:].any() and not x.grad[7:].any()


def test_a_second_derivative_is_refused_not_silently_zero():
    layer = onednn.use_onednn_linears(nn.Sequential(nn.Linear(8, 4)))[0]
    for fn in (lambda x: layer(x), lambda x: grouped_linear(x, layer.weight[None], [3])):
        x = torch.randn(3, 8, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="twice|once_differentiable"):
            grad.sum().backward()


def test_everything_else_takes_torchs_own_path():
    layer = onednn.use_onednn_linears(nn.Sequential(nn.Linear(16, 8)))[0]
    x = torch.randn(4, 16)
    zero3 = nn.Parameter(layer.weight.detach().clone())
    zero3.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    for name, run in {
        "bf16": lambda: layer.to(torch.bfloat16)(x.bfloat16()),
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)(layer.float())(x),
        "ZeRO-3 parameter": lambda: torch.func.functional_call(layer.float(), {"weight": zero3}, (x,)),
        "switched off": lambda: (onednn.use_onednn(False), layer.float()(x))[1],
    }.items():
        try:
            with Ops() as ops:
                run()
        finally:
            onednn.use_onednn(True)
        assert ran(ops)["mkldnn._linear_pointwise"] == 0 and ran(ops)["aten.addmm"] + ran(ops)["aten.linear"] > 0, name
    with Ops() as ops:
        layer.float()(x)
    assert ran(ops)["mkldnn._linear_pointwise"] == 1


def test_a_loaded_model_trains_through_onednn_with_the_numbers_of_torchs_own(micro_model):
    """Every plain nn.Linear but the routers and every expert bank of a loaded JetMoE; the loss as with
    oneDNN switched off to 1e-6 (the issue's full fine-tuning tolerance), logits and gradients close."""
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
        runs[enabled] = out, {n: p.grad for n, p in model.named_parameters()}, ran(ops)
    (out, grads_, counts), (plain, plain_grads, plain_counts) = runs[True], runs[False]
    linears = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {name for name, cls in linears.items() if cls is nn.Linear} == {name for name in linears if name.endswith("router.layer")}
    assert counts["aten._grouped_mm"] == 0 < counts["smoe.expert_linear"] and counts["aten.mm"] < plain_counts["aten.mm"]  # mm: the routers' only
    assert plain_counts["mkldnn._linear_pointwise"] == plain_counts["smoe.expert_linear"] == 0
    assert abs(out.loss.item() - plain.loss.item()) <= 1e-6
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads_[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("sizes_per_doubling", [8, 2])
def test_a_frozen_bank_and_its_adapter_in_one_pass_equal_the_two_in_turn(sizes_per_doubling, monkeypatch):
    """linear_with_lora's one-pass path (base product + LoRA B product per expert, forward and backward)
    gives the numbers of the base bank followed by add_expert_lora, bit for bit, with an expert without tokens;
    the input gradient to fp32 rounding (there the two in turn add the adapter's part in a separate sum, which
    rounds differently for some row counts). 2 sizes per doubling: the B product is added to an expert's own
    rows of a product over a larger window."""
    monkeypatch.setattr(onednn, "ROW_SIZES", sizes_per_doubling)
    torch.manual_seed(0)
    sizes = [6, 0, 9, 5]  # 2 sizes per doubling: expert 2 reads its neighbour's rows, the last one a row before its own
    x, weight = torch.randn(sum(sizes), 32), torch.randn(4, 24, 32)
    a, b = torch.randn(4, 3, 32), torch.randn(4, 24, 3)

    def in_turn(x, a, b):
        return add_expert_lora(grouped_linear(x, weight, sizes), x, a, b, 0.5, sizes)

    with Ops() as ops:
        fused = grads(lambda x, a, b: linear_with_lora(x, weight, [(a, b, 0.5)], sizes), x, a, b)
    assert ran(ops)["smoe.expert_linear"] == 2 and ran(ops)["aten.addmm"] == 0  # forward and input gradient, each with the B product inside
    (out, grad_x, grad_a, grad_b), (out_, grad_x_, grad_a_, grad_b_) = fused, grads(in_turn, x, a, b)
    assert torch.equal(out, out_) and torch.equal(grad_a, grad_a_) and torch.equal(grad_b, grad_b_)
    torch.testing.assert_close(grad_x, grad_x_, rtol=1e-6, atol=1e-5)
    assert torch.count_nonzero(fused[2][1]) == torch.count_nonzero(fused[3][1]) == 0


@pytest.mark.parametrize("dropout, hooked, one_pass", [(0.0, False, True), (0.1, False, False), (0.0, True, False)])
def test_jetmoe_expert_lora_takes_the_one_pass_only_where_it_applies(micro_model, dropout, hooked, one_pass):
    """Through PEFT's own wrapper: dropout on the adapter's input, or a hook on the bank (offloading), keeps the bank's own call."""
    model = load_causal_lm(micro_model)
    config = expert_lora_config(LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["input_linear", "output_linear"], init_lora_weights=False), model)
    model = get_peft_model(model, config)
    called = []
    if hooked:
        for name, module in model.named_modules():
            if name.endswith("base_layer"):
                module.register_forward_pre_hook(lambda *_: called.append(1))
    model.train()
    with Ops() as ops:
        model(input_ids=torch.randint(10, 250, (2, 16))).logits.sum().backward()
    assert (ran(ops)["aten.addmm"] == 0) == one_pass  # the separate LoRA path adds its B product with addmm
    assert bool(called) == hooked


def test_the_recipe_key_trains_the_same_loss_and_refuses_what_it_cannot_honour(micro_model, tmp_path, capsys, monkeypatch):
    fast = ["--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4", "--dtype", "float32"]
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "4", "--output_dir", str(tmp_path / "data")]) == 0
    products = collections.Counter()
    linear = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *args: products.update([current]) or linear(*args))
    losses = {}
    for current in ("torch", "onednn"):
        out = tmp_path / current
        assert main(["sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(tmp_path / "data"), "--output_dir", str(out), "--cpu_matmul", current, *fast]) == 0
        losses[current] = [row["loss"] for row in read_manifest(out)["log_history"] if "loss" in row]
    assert products["torch"] == 0 < products["onednn"]  # the key reached the run ...
    assert len(losses["torch"]) == 2 and max(abs(a - b) for a, b in zip(losses["torch"], losses["onednn"])) <= 1e-5  # ... with the same loss
    code = main(["sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "bf16"), "--cpu_matmul", "onednn", *fast[:-2], "--dtype", "bfloat16"])
    assert code == 2 and "cpu_matmul: onednn" in capsys.readouterr().err


def test_products_below_the_size_floor_take_torchs_path(monkeypatch):
    """oneDNN's cost per call and per new shape loses on small products: those stay with torch (per expert for a bank)."""
    monkeypatch.setattr(onednn, "MIN_FLOPS", 250_000_000)
    layer = onednn.use_onednn_linears(nn.Sequential(nn.Linear(512, 256)))[0]
    bank = torch.randn(2, 256, 512)
    for rows, expected in ((512, 0), (1024, 1)):  # 2 x rows x 512 x 256 FLOPs: 134 M and 268 M (a bank: per expert)
        with Ops() as ops:
            layer(torch.randn(rows, 512))
            grouped_linear(torch.randn(2 * rows, 512), bank, [rows] * 2)
        assert ran(ops)["mkldnn._linear_pointwise"] == ran(ops)["smoe.expert_linear"] == expected


def test_onednn_takes_every_size_auto_only_products_above_the_floor(monkeypatch):
    """`cpu_matmul: onednn` is honoured for the small products too; `auto` leaves those with torch."""
    from types import SimpleNamespace

    monkeypatch.setattr(onednn, "MIN_FLOPS", 250_000_000)
    layer = onednn.use_onednn_linears(nn.Sequential(nn.Linear(16, 8)))[0]
    training, model = SimpleNamespace(use_cpu=True), SimpleNamespace(dtype="float32")
    try:
        for choice, expected in (("onednn", 1), ("auto", 0), ("torch", 0)):
            onednn.use_cpu_matmul(onednn.MatmulArgs(choice), training, model)
            with Ops() as ops:
                layer(torch.randn(4, 16))
            assert ran(ops)["mkldnn._linear_pointwise"] == expected, choice
    finally:
        onednn.use_onednn(True)
