"""One view of a model's expert weights, whatever the family.

Two shapes exist. JetMoE keeps each bank as a `JetMoeParallelExperts` with one weight [E, out, in] that
its MoE block calls on tokens already sorted by expert. transformers 5 stores the other families
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, gpt-oss, GLM4-MoE, ...) as one experts module per layer
holding fused 3-D parameters, decorated by `use_experts_implementation`, which records the layout on
the module: `has_gate` (a `gate_up_proj`, else an `up_proj`), `is_transposed` ([E, in, out] rather
than [E, out, in]), `has_bias` (`<name>_bias` [E, out]) and `is_concatenated` (gate and up halves,
else interleaved, which only the module's own `_apply_gate` needs to know). The layout is read from
those attributes, not from a list of families, so a family we never listed works when it follows the
convention; a module with 3-D weights that does not gets a SmoeError naming its class. Shared experts
are plain MLPs of `nn.Linear` beside the experts module: nothing here, plain PEFT LoRA adapts them.

`fused_experts_forward` runs a fused experts module the way transformers' grouped_mm path does
(tokens sorted by expert, one grouped matmul per projection) and adds LoRA per expert on its own
tokens, x A_e^T B_e^T, so W + BA is never built.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.integrations.moe import _default_apply_gate
from transformers.models.jetmoe.modeling_jetmoe import JetMoeParallelExperts

from alignment.errors import SmoeError
from alignment.models.experts import add_expert_lora, grouped_linear, is_silu, linear_with_lora, silu_gate
from alignment.models.quant import nf4_parametrization

LAYOUT_FLAGS = ("has_gate", "is_transposed", "has_bias", "is_concatenated")


@dataclass
class FusedExperts:
    """The layout of one fused experts module."""

    num_experts: int
    up_name: str  # gate_up_proj (gated) or up_proj
    transposed: bool
    bias: bool
    gated: bool
    concatenated: bool

    @property
    def weight_names(self) -> tuple[str, str]:
        return self.up_name, "down_proj"

    def in_out(self, module: nn.Module, name: str) -> tuple[int, int]:
        _, rows, cols = weight_shape(module, name)
        return (rows, cols) if self.transposed else (cols, rows)


def weight_shape(module: nn.Module, name: str) -> tuple | None:
    """The 3-D shape of a fused weight, without dequantising it when it is held in NF4."""
    nf4 = nf4_parametrization(module, name)
    if nf4 is not None:
        out, in_ = nf4.out_features, nf4.in_features
        return torch.Size((nf4.num_experts, in_, out) if nf4.transposed else (nf4.num_experts, out, in_))
    weight = getattr(module, name, None)
    return weight.shape if isinstance(weight, torch.Tensor) else None


def _three_d(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters(recurse=False) if p.dim() == 3]


def fused_layout(module: nn.Module) -> FusedExperts:
    """The layout of a fused experts module, from the flags `use_experts_implementation` set on it."""
    cls = type(module).__name__
    missing = [flag for flag in LAYOUT_FLAGS if not isinstance(getattr(module, flag, None), bool)]
    if missing:
        raise SmoeError(
            f"{cls} holds 3-D expert weights but not the layout that transformers' use_experts_implementation records (no {', '.join(missing)})",
            f"module class {cls}",
            "use a model whose experts module is decorated with @use_experts_implementation (transformers 5), or a JetMoE",
        )
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    weights = {name: weight_shape(module, name) for name in (up_name, "down_proj")}
    bad = [name for name, shape in weights.items() if shape is None or len(shape) != 3]
    if bad or weights[up_name][0] != weights["down_proj"][0]:
        raise SmoeError(
            f"{cls} does not hold its experts as 3-D {up_name} and down_proj weights with one expert per row (missing or misshapen: {bad or 'expert counts differ'})",
            f"module class {cls}",
            "this experts module does not follow the fused-experts convention; open an issue naming the model",
        )
    if module.has_bias and any(getattr(module, f"{name}_bias", None) is None for name in weights):
        raise SmoeError(f"{cls} says has_bias but holds no {up_name}_bias / down_proj_bias", f"module class {cls}", "open an issue naming the model")
    return FusedExperts(
        num_experts=weights[up_name][0],
        up_name=up_name,
        transposed=module.is_transposed,
        bias=module.has_bias,
        gated=module.has_gate,
        concatenated=module.is_concatenated,
    )


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that holds expert weights, by name: JetMoE banks and fused experts modules (checked)."""
    found = {}
    for name, module in model.named_modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if base is not module or isinstance(module, parametrize.ParametrizationList):
            continue  # a PEFT wrapper or a parametrization (4-bit weights): the module they serve comes up on its own
        if isinstance(module, JetMoeParallelExperts) or getattr(module, "is_quantized_experts", False):
            found[name] = module
        elif _three_d(module) or hasattr(module, "has_gate"):
            fused_layout(module)  # raises for a module that does not fit
            found[name] = module
    return found


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in expert_modules(model).items() if not isinstance(m, JetMoeParallelExperts)}


def expert_weights(model: nn.Module) -> list[tuple[str, int, int, int]]:
    """(parameter name, experts, in, out) for every expert weight of the model, both shapes."""
    rows = []
    for name, module in expert_modules(model).items():
        if isinstance(module, JetMoeParallelExperts):
            rows.append((f"{name}.weight", module.num_experts, module.input_size, module.output_size))
        else:
            layout = fused_layout(module)
            for weight in layout.weight_names:
                rows.append((f"{name}.{weight}", layout.num_experts, *layout.in_out(module, weight)))
    return rows


def _project(module, layout: FusedExperts, name: str, x, sizes, expert_ids, lora):
    """x [tokens sorted by expert, in] through weight `name` of every expert, plus each LoRA x A^T B^T * s."""
    nf4 = nf4_parametrization(module, name)
    if nf4 is not None:  # 4-bit experts: those with tokens dequantised for this product only, nothing kept
        y = nf4.matmul(module.parametrizations[name].original, x, sizes)
    else:
        weight = getattr(module, name)
        weight = weight.transpose(1, 2) if layout.transposed else weight
        if not layout.bias:  # base and adapters together (in one pass where that pays)
            return linear_with_lora(x, weight, lora.get(name, []), sizes)
        y = grouped_linear(x, weight, sizes)
    if layout.bias:
        y = y + getattr(module, f"{name}_bias")[expert_ids]
    for a, b, scaling in lora.get(name, ()):
        y = add_expert_lora(y, x, a, b, scaling, sizes)
    return y


def _gate(module: nn.Module, layout: FusedExperts, h: torch.Tensor) -> torch.Tensor:
    """The experts' activation on the up projection's output, by the module's own gate unless it is transformers' default SiLU gate."""
    if not layout.gated:
        return module.act_fn(h)
    if type(module)._apply_gate is _default_apply_gate and is_silu(module.act_fn):
        return silu_gate(h)
    return module._apply_gate(h)


def fused_experts_forward(module: nn.Module, hidden_states, top_k_index, top_k_weights, lora: dict | None = None):
    """hidden_states [tokens, hidden], top_k_index / top_k_weights [tokens, k] -> [tokens, hidden].
    `lora` maps a weight name to [(A [E, r, in], B [E, out, r], scaling), ...]."""
    layout = fused_layout(module)
    lora = lora or {}
    tokens, k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    sorted_ids = expert_ids[order]
    sizes = torch.bincount(sorted_ids, minlength=layout.num_experts).tolist()
    x = hidden_states[order // k]
    h = _project(module, layout, layout.up_name, x, sizes, sorted_ids, lora)
    h = _gate(module, layout, h)
    out = _project(module, layout, "down_proj", h, sizes, sorted_ids, lora)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    unsorted = torch.zeros_like(out).index_copy(0, order, out)
    return unsorted.view(tokens, k, -1).sum(dim=1).to(hidden_states.dtype)
