"""fp32 matmuls on an x86 CPU through oneDNN instead of MKL.

torch multiplies fp32 matrices on the CPU with MKL's sgemm, which on AMD processors runs its AVX2 kernels
even where the processor has AVX-512. oneDNN, which every x86 torch build carries (torch.compile's CPU
backend calls it through `mkldnn::_linear_pointwise`), picks its kernels by instruction set: on the Zen 5
CPU of our measurements it is about 2x MKL at the shapes of a training step, rank-16 LoRA products
included, and 1.4x at a single decoding row (`python bench/onednn_bench.py`). The products are the same;
the sums run in another order (fp32 rounding, about 1e-6 of the largest entry).

Two users: the expert banks of alignment.models.experts (one product per expert, as a single op
`smoe::expert_linear` that selective checkpointing can keep as a grouped matmul) and the plain
`nn.Linear` layers of a model the project loads, routers left out (`use_onednn_linears`: a router's
logits in another rounding could break a near-tie in its top-k differently from torch's own). Anything
else takes torch's own path: products under MIN_FLOPS, bf16 and fp16, CUDA, autocast, tensors that are not
plain (DTensor, DeepSpeed's partitioned parameters), torch builds without oneDNN, and `cpu_matmul: torch`.
"""

import platform
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from alignment.errors import SmoeError

AVAILABLE = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_enabled = True
_every_size = False  # cpu_matmul: onednn, which asks for oneDNN below MIN_FLOPS too


def use_onednn(enabled: bool = True, every_size: bool = False):
    """Switch the oneDNN path on or off for this process (off: torch's own matmuls, bit for bit); `every_size`
    also takes the products under MIN_FLOPS through it."""
    global _enabled, _every_size
    _enabled, _every_size = enabled, every_size


@dataclass
class MatmulArgs:
    # fp32 matmuls on an x86 CPU: auto (oneDNN where it runs and pays), onednn (every product, whatever its size;
    # stop where it cannot run), torch (torch's own, MKL)
    cpu_matmul: str = field(default="auto", metadata={"choices": ["auto", "onednn", "torch"]})


def use_cpu_matmul(args: MatmulArgs | None, training_args, model_args):
    """The training stages' switch, before the model loads: `onednn` is refused where it would not run."""
    choice = args.cpu_matmul if args is not None else "auto"
    if choice == "onednn":
        on_cpu = training_args.use_cpu or not torch.cuda.is_available()
        why = "this torch build has no oneDNN CPU matmul (x86 builds only)" if not AVAILABLE else "training runs on a GPU" if not on_cpu else None
        why = why or (f"the weights are {model_args.dtype}, not float32" if model_args.dtype != "float32" else None)
        if why:
            raise SmoeError(f"cpu_matmul: onednn runs fp32 products on an x86 CPU, but {why}", "recipe key cpu_matmul", "set cpu_matmul: auto (oneDNN wherever it runs) or torch")
    use_onednn(choice != "torch", every_size=choice == "onednn")


# oneDNN builds a kernel for every new product shape (0.4-0.8 ms here, and 12 us a call even when cached, against
# MKL's 2), and shapes change every step: each expert's row count, a padded batch's length. Below this many
# FLOPs a product (per expert for a bank) that costs more than the faster kernel saves: the tiny demo model,
# 31 MFLOP an expert, trained 3x slower through oneDNN, and still 1.1-1.2x slower once expert row counts were
# bucketed (ROW_SIZES below), the per-call cost and a padded batch's new lengths remaining.
MIN_FLOPS = 250_000_000


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x [..., in] through weight [out, in] (or a bank [E, out, in]) takes the oneDNN path."""
    experts = weight.shape[0] if weight.dim() == 3 else 1
    return (
        _enabled
        and AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and type(x) in (torch.Tensor, nn.Parameter)
        and type(weight) in (torch.Tensor, nn.Parameter)
        and not hasattr(weight, "ds_id")  # a DeepSpeed ZeRO-3 parameter: its own linear gathers it
        and not torch.is_autocast_enabled("cpu")
        and (_every_size or 2 * x.numel() * weight.shape[-2] / experts >= MIN_FLOPS)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] @ weight.T [in, out] (+ bias), no autograd; weight may be any strided view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# An expert's row count is new at almost every call, and oneDNN builds a kernel for each new shape. Expert
# products therefore run on row counts rounded up to one of ROW_SIZES sizes per doubling (at most 1/ROW_SIZES
# more rows; few shapes at any size, so their kernels are soon all built): a few more rows multiplied, no kernel
# built (`python bench/onednn_bench.py` times both; the mid JetMoE's sft step ran about 1.15x faster in
# `bench/train_throughput.py`). A power of two. Weight gradients, where the rows are the summed dimension, stay
# as they are: summing whole steps plus a zero-padded rest was no faster in the whole step.
ROW_SIZES = 8


def bucketed(rows: int) -> int:
    """`rows` rounded up to a multiple of 1/ROW_SIZES of the power of two at or below it (500 rows: 512; 37 rows:
    40; 15 rows and fewer: themselves)."""
    step = max(1, (1 << (rows.bit_length() - 1)) // ROW_SIZES)
    return -(-rows // step) * step


def _window(rows: slice, total: int) -> tuple[slice, int]:
    """The rows of x to multiply for an expert's `rows`: `bucketed` rows around them (the neighbours' rows,
    whose products are dropped), and where the expert's own rows start in it."""
    padded = bucketed(rows.stop - rows.start)
    if padded > total:
        return rows, 0
    start = min(rows.start, total - padded)
    return slice(start, start + padded), rows.start - start


def expert_rows(expert_size: list[int]):
    """(expert, slice of its rows) for every expert that has tokens."""
    start = 0
    for expert, size in enumerate(expert_size):
        if size:
            yield expert, slice(start, start + size)
        start += size


@torch.library.custom_op("smoe::expert_linear", mutates_args=())
def expert_linear(x: torch.Tensor, weight: torch.Tensor, expert_size: list[int], low: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """x [tokens sorted by expert, in], weight [E, out, in] -> [tokens, out]: each expert's rows times its weight,
    plus low[rows] @ up[e] (low [tokens, r], up [E, r, out]: a LoRA's B product) added to each expert's piece
    while it is fresh (no second [tokens, out] tensor). One op, which selective checkpointing sees (and can
    keep) as a grouped matmul."""
    pieces = []
    for e, rows in expert_rows(expert_size):
        window, start = _window(rows, x.shape[0])
        pieces.append(linear(x[window], weight[e])[start : start + rows.stop - rows.start])
        if low is not None:
            pieces[-1].addmm_(low[rows], up[e])
    unrouted = x.shape[0] - sum(expert_size)
    if unrouted or not pieces:  # zeros for rows routed to no expert (all of them, or none, in a bank without routed rows)
        pieces.append(x.new_zeros(unrouted, weight.shape[1]))
    return torch.cat(pieces)


@expert_linear.register_fake
def _(x, weight, expert_size, low=None, up=None):
    return x.new_empty(x.shape[0], weight.shape[1])


class _ExpertLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, expert_size):
        ctx.save_for_backward(x, weight)
        ctx.expert_size = expert_size
        return expert_linear(x, weight, expert_size)

    @staticmethod
    @once_differentiable  # oneDNN's products carry no autograd: a second derivative would be silently zero
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        grad_x = expert_linear(grad, weight.transpose(1, 2), ctx.expert_size) if need_x else None
        grad_weight = None
        if need_weight:
            grad_weight = torch.empty_like(weight)
            for e, size in enumerate(ctx.expert_size):
                if not size:
                    grad_weight[e].zero_()
            for e, rows in expert_rows(ctx.expert_size):
                grad_weight[e].copy_(linear(grad[rows].t(), x[rows].t()))  # [out, tokens] @ [tokens, in]
        return grad_x, grad_weight, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
    """x [tokens sorted by expert, in] through weight [E, out, in] per expert, with autograd (check `usable` first)."""
    return _ExpertLinear.apply(x, weight, expert_size)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.input_shape, ctx.has_bias = x.shape, bias is not None
        return linear(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = linear(grad, weight.t()).view(ctx.input_shape) if need_x else None
        grad_weight = linear(grad.t(), rows.t()) if need_weight else None  # [out, rows] @ [rows, in]
        grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """nn.Linear whose fp32 CPU products run through oneDNN; everything else is nn.Linear's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() and usable(x, self.weight):
            return _Linear.apply(x, self.weight, self.bias)
        return super().forward(x)


def use_onednn_linears(model: nn.Module, leave=lambda name: False) -> nn.Module:
    """Every plain nn.Linear of the model whose name `leave` does not pick becomes a `Linear` (same parameters,
    same state dict, still an nn.Linear to PEFT and transformers); subclasses (4-bit, adapters) stay as they are."""
    if AVAILABLE:
        for name, module in model.named_modules():
            if type(module) is nn.Linear and not leave(name):
                module.__class__ = Linear
    return model
