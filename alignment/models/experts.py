"""Faster JetMoE expert banks, with outputs equal to the stock per-expert loop.

Stock `JetMoeParallelExperts.forward` indexes `self.weight[i]` per expert: in backward each index
builds a full-size [E, out, in] gradient and they are summed. `torch._grouped_mm` runs the whole bank
in one call (CPU and CUDA, with autograd); where its stride rules are not met, a loop over
`weight.unbind(0)` gives each expert its own gradient slice.
"""

import torch
import torch.nn.functional as F
from transformers.models.jetmoe import modeling_jetmoe

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _groupable(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    # grouped_mm needs 16-byte aligned inner strides and a matching dtype
    align = 16 // inputs.element_size()
    return _HAS_GROUPED_MM and inputs.dtype == weight.dtype and inputs.shape[-1] % align == 0 and weight.shape[1] % align == 0


def grouped_linear(inputs: torch.Tensor, weight: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
    """inputs [tokens sorted by expert, in], weight [E, out, in], expert_size [E] -> [tokens, out]."""
    if _groupable(inputs, weight):
        offsets = torch.tensor(expert_size, device=inputs.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(inputs, weight.transpose(1, 2), offs=offsets)
    chunks = inputs.split(expert_size, dim=0)
    return torch.cat([F.linear(x, w) for x, w in zip(chunks, weight.unbind(0))], dim=0)


def experts_forward(self, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
    return grouped_linear(inputs, self.weight, expert_size)


STOCK_FORWARD = modeling_jetmoe.JetMoeParallelExperts.forward


def use_fast_experts(enabled: bool = True):
    """Swap the expert bank forward for every JetMoE in this process (and back with enabled=False)."""
    modeling_jetmoe.JetMoeParallelExperts.forward = experts_forward if enabled else STOCK_FORWARD
