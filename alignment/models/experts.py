"""Faster JetMoE expert banks, with outputs equal to the stock per-expert loop.

Stock `JetMoeParallelExperts.forward` indexes `self.weight[i]` per expert: in backward each index
builds a full-size [E, out, in] gradient and they are summed. `torch._grouped_mm` runs the whole bank
in one call (CPU and CUDA, with autograd); where its stride rules are not met, a loop over
`weight.unbind(0)` gives each expert its own gradient slice.

Stock `JetMoeMoE` and `JetMoeMoA` also move tokens between token order and expert order with
`zeros.index_add` (an atomic scatter on a GPU, a serial one on the CPU) and gather them with indexing
whose backward is another scatter (`index_put_` with accumulation). Every such move is a permutation of
the token x top-k copies, so here each one, forward and backward, is a gather by the permutation or its
inverse, and the top-k copies of a token are added with a sum over k. With top-2 and torch's own matmuls
(`cpu_matmul: torch` on the CPU) the numbers are the stock ones bit for bit (0 + a + b = a + b); with more
experts per token the sum order may differ, and oneDNN's fp32 products (alignment.models.onednn) differ in rounding.
"""

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from transformers.models.jetmoe import modeling_jetmoe

from alignment.models import onednn
from alignment.models.onednn import expert_rows

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _groupable(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    # grouped_mm needs 16-byte aligned inner strides and a matching dtype; on CUDA bf16 on sm80 or newer
    # (fp16, fp32 and older cards take the loop)
    align = 16 // inputs.element_size()
    if inputs.is_cuda and (inputs.dtype != torch.bfloat16 or torch.cuda.get_device_capability(inputs.device) < (8, 0)):
        return False
    return _HAS_GROUPED_MM and inputs.dtype == weight.dtype and inputs.shape[-1] % align == 0 and weight.shape[1] % align == 0


def expert_offsets(expert_size: list[int], device) -> torch.Tensor:
    """grouped_mm's `offs`: where each expert's tokens end (int32, on the tokens' device)."""
    return torch.tensor(expert_size, device=device).cumsum(0).to(torch.int32)


def grouped_linear(inputs: torch.Tensor, weight: torch.Tensor, expert_size: list[int], offsets: torch.Tensor | None = None) -> torch.Tensor:
    """inputs [tokens sorted by expert, in], weight [E, out, in], expert_size [E] -> [tokens, out].
    `offsets` (from `expert_offsets`) saves building them again when several banks share one routing."""
    if onednn.usable(inputs, weight):  # fp32 on an x86 CPU: oneDNN's products, about 2x MKL's there
        return onednn.grouped_linear(inputs, weight, expert_size)
    if _groupable(inputs, weight):
        offsets = expert_offsets(expert_size, inputs.device) if offsets is None else offsets
        return torch._grouped_mm(inputs, weight.transpose(1, 2), offs=offsets)
    chunks = inputs.split(expert_size, dim=0)
    return torch.cat([F.linear(x, w) for x, w in zip(chunks, weight.unbind(0))], dim=0)


def expert_lora(inputs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, expert_size: list[int], offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Each expert's LoRA update x_e A_e^T B_e^T * scaling for its own tokens: inputs [tokens sorted by
    expert, in], A [E, r, in], B [E, out, r] -> [tokens, out], in the inputs' dtype.

    The factors are cast to the tokens' dtype, not the tokens to the factors' (PEFT keeps them in fp32):
    in bf16 training an fp32 copy of [tokens, width] in and out of every bank costs more memory traffic
    than the low-rank product itself, and fp32 leaves the tensor-core grouped kernel for a loop over
    experts. The scaling multiplies the [tokens, r] product, not the [tokens, out] one."""
    offsets = expert_offsets(expert_size, inputs.device) if offsets is None else offsets  # one copy to the device for both factors
    low_rank = grouped_linear(inputs, a.to(inputs.dtype), expert_size, offsets) * scaling
    return grouped_linear(low_rank, b.to(inputs.dtype), expert_size, offsets)


class _AddExpertLora(torch.autograd.Function):
    """y + x_e A_e^T B_e^T * scaling on each expert's rows, one BLAS call per expert (the CPU path: there
    grouped_mm is itself a loop of mm). Each product runs in the operand layout the CPU BLAS is fast at
    with a rank-r side: B as [E, r, out] rows, the [tokens, r] factor's product and y summed by one addmm
    (no [tokens, out] temporary and no separate add), and the factor gradients formed as [r, *] =
    low^T grad, several times faster than the [*, r] = grad^T low that grouped_mm's backward forms.
    Given the frozen base `weight` instead of y (fp32 where oneDNN runs), the base product and the B
    product are one pass per expert (onednn.expert_linear), forward and backward."""

    @staticmethod
    def forward(ctx, y, x, a, b, scaling, expert_size, weight=None):
        b_rows = b.transpose(1, 2).contiguous()  # [E, r, out]
        low = x.new_empty(x.shape[0], a.shape[1])
        for e, rows in expert_rows(expert_size):
            torch.mm(x[rows], a[e].t(), out=low[rows])
        low.mul_(scaling)
        ctx.save_for_backward(x, a, b_rows, low, weight)
        ctx.scaling, ctx.expert_size = scaling, expert_size
        if weight is not None:
            return onednn.expert_linear(x, weight, expert_size, low, b_rows)
        # into a new tensor, y read by the same BLAS call (beta 1): selective checkpointing may hold y, so it is never changed
        out = torch.empty_like(y)
        for e, rows in expert_rows(expert_size):
            torch.addmm(y[rows], low[rows], b_rows[e], out=out[rows])
        routed = sum(expert_size)
        out[routed:] = y[routed:]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, a, b_rows, low, weight = ctx.saved_tensors
        need_y, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        grad_low = low.new_empty(low.shape)
        grad_b_rows = torch.zeros_like(b_rows) if need_b else None
        for e, rows in expert_rows(ctx.expert_size):
            torch.mm(grad[rows], b_rows[e].t(), out=grad_low[rows])
            if need_b:
                torch.mm(low[rows].t(), grad[rows], out=grad_b_rows[e])
        grad_low.mul_(ctx.scaling)
        grad_a = torch.zeros_like(a) if need_a else None
        if need_a:
            for e, rows in expert_rows(ctx.expert_size):
                torch.mm(grad_low[rows].t(), x[rows], out=grad_a[e])
        grad_x = None
        if need_x and weight is not None:  # the base's input gradient and the adapter's, in one pass
            grad_x = onednn.expert_linear(grad, weight.transpose(1, 2), ctx.expert_size, grad_low, a)
        elif need_x:
            grad_x = torch.empty_like(x)
            for e, rows in expert_rows(ctx.expert_size):
                torch.mm(grad_low[rows], a[e], out=grad_x[rows])
            grad_x[sum(ctx.expert_size) :] = 0  # rows routed to no expert
        grad_b = grad_b_rows.transpose(1, 2) if need_b else None
        return grad if need_y else None, grad_x, grad_a, grad_b, None, None, None


def add_expert_lora(y: torch.Tensor, inputs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, expert_size: list[int], offsets: torch.Tensor | None = None) -> torch.Tensor:
    """y + expert_lora(inputs, a, b, scaling, expert_size), with y [tokens, out] the base projection's output.
    On the CPU, one BLAS call per expert in the layouts it runs fastest; elsewhere the grouped matmuls of `expert_lora`."""
    a, b = a.to(inputs.dtype), b.to(inputs.dtype)
    if inputs.device.type == "cpu" and y.dtype == inputs.dtype:
        return _AddExpertLora.apply(y, inputs, a, b, scaling, expert_size)
    return y + expert_lora(inputs, a, b, scaling, expert_size, offsets).to(y.dtype)


def linear_with_lora(inputs: torch.Tensor, weight: torch.Tensor, loras: list, expert_size: list[int]) -> torch.Tensor:
    """grouped_linear(inputs, weight) plus each (A, B, scaling) of `loras` on the same inputs. A frozen fp32
    weight on oneDNN's CPU path with one adapter takes both products in one pass per expert: no separate
    [tokens, out] base output to read back, forward or backward."""
    if len(loras) == 1 and not weight.requires_grad and onednn.usable(inputs, weight):
        a, b, scaling = loras[0]
        return _AddExpertLora.apply(None, inputs, a.to(inputs.dtype), b.to(inputs.dtype), scaling, expert_size, weight)
    y = grouped_linear(inputs, weight, expert_size)
    for a, b, scaling in loras:
        y = add_expert_lora(y, inputs, a, b, scaling, expert_size)
    return y


def experts_forward(self, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
    return grouped_linear(inputs, self.weight, expert_size)


class _Rows(torch.autograd.Function):
    """x.index_select(0, index) where index is a permutation: the backward gathers by its inverse (no scatter)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _TokenCopies(torch.autograd.Function):
    """Token rows [N, d] -> their top-k copies in expert order [N*k, d]; the backward adds each token's k gradients."""

    @staticmethod
    def forward(ctx, x, batch_index, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, batch_index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


def _inverse(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _combine(expert_outputs: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """[N*k, d] in expert order -> [N, d]: each token's k outputs, added."""
    return _Rows.apply(expert_outputs, inverse, order).view(-1, k, expert_outputs.shape[-1]).sum(1)


class _SiluGate(torch.autograd.Function):
    """silu(gate) * up on [tokens, 2 * width] holding the gate half then the up half (JetMoE's MoE and
    transformers' default gate of fused experts): the same operations and numbers, but the backward writes both
    halves' gradients into one tensor instead of two that are then concatenated (a [tokens, 2 * width] copy per layer)."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(h, act)
        return act * up

    @staticmethod
    def backward(ctx, grad):
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_h


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    return _SiluGate.apply(h)


def is_silu(activation) -> bool:
    return type(activation) in (SiLUActivation, torch.nn.SiLU)


def moe_forward(self, layer_input):
    """JetMoeMoE.forward with gathers instead of scatters (same routing, banks and numbers)."""
    bsz, length, emb_size = layer_input.size()
    layer_input = layer_input.reshape(-1, emb_size)
    order, batch_index, batch_gates, expert_size, _ = self.router(layer_input)
    inverse, k = _inverse(order), self.router.top_k
    hidden = self.input_linear(_TokenCopies.apply(layer_input, batch_index, inverse, k), expert_size)
    if is_silu(self.activation):
        hidden = silu_gate(hidden)
    else:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = self.activation(gate) * up
    expert_outputs = self.output_linear(hidden, expert_size)
    expert_outputs = expert_outputs * batch_gates[:, None]
    return _combine(expert_outputs, order, inverse, k).view(bsz, length, self.input_size) + self.bias


def moa_map(self, layer_input):
    """JetMoeMoA.map with gathers instead of scatters."""
    bsz, length, emb_size = layer_input.size()
    layer_input = layer_input.reshape(-1, emb_size)
    order, batch_index, batch_gates, expert_size, router_logits = self.router(layer_input)
    inverse = _inverse(order)
    expert_outputs = self.input_linear(_TokenCopies.apply(layer_input, batch_index, inverse, self.top_k), expert_size)
    layer_output = _Rows.apply(expert_outputs, inverse, order).view(bsz, length, self.top_k, -1)
    return layer_output, router_logits, (order, batch_index, batch_gates, expert_size, inverse)


def moa_reduce(self, layer_input, topo_info):
    """JetMoeMoA.reduce with gathers instead of scatters."""
    bsz, length, k, hidden_size = layer_input.size()
    order, batch_index, batch_gates, expert_size, inverse = topo_info
    expert_inputs = _Rows.apply(layer_input.reshape(-1, hidden_size), order, inverse)
    expert_outputs = self.output_linear(expert_inputs, expert_size) * batch_gates[:, None]
    return _combine(expert_outputs, order, inverse, k).view(bsz, length, self.input_size) + self.bias


STOCK = {
    (modeling_jetmoe.JetMoeParallelExperts, "forward"): modeling_jetmoe.JetMoeParallelExperts.forward,
    (modeling_jetmoe.JetMoeMoE, "forward"): modeling_jetmoe.JetMoeMoE.forward,
    (modeling_jetmoe.JetMoeMoA, "map"): modeling_jetmoe.JetMoeMoA.map,
    (modeling_jetmoe.JetMoeMoA, "reduce"): modeling_jetmoe.JetMoeMoA.reduce,
}
FAST = {
    (modeling_jetmoe.JetMoeParallelExperts, "forward"): experts_forward,
    (modeling_jetmoe.JetMoeMoE, "forward"): moe_forward,
    (modeling_jetmoe.JetMoeMoA, "map"): moa_map,
    (modeling_jetmoe.JetMoeMoA, "reduce"): moa_reduce,
}
STOCK_FORWARD = STOCK[(modeling_jetmoe.JetMoeParallelExperts, "forward")]


def use_fast_experts(enabled: bool = True):
    """Swap the expert banks' and the MoE layers' forwards for every JetMoE in this process (back with enabled=False)."""
    for (cls, name), function in (FAST if enabled else STOCK).items():
        setattr(cls, name, function)
