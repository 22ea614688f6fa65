"""4-bit NF4 expert weights for QLoRA on JetMoE.

bitsandbytes' 4-bit loading converts only `nn.Linear`, which leaves JetMoE's 3-D expert banks (about
96% of the model) in full precision. Here every expert of every bank is quantised on its own with
`bitsandbytes.functional.quantize_4bit` (NF4, blocks of 64, double quantisation of the block scales)
and runs through `bitsandbytes.matmul_4bit`, which dequantises that one expert for the product and again
in backward: the bank is never dequantised at once and no full-precision copy is kept for backward.
The rest of the model (embeddings, key-value projections, routers, norms) stays in its dtype.
`QuantizedExperts` is a `JetMoeParallelExperts`, so expert LoRA (`alignment.models.lora`) wraps it
unchanged, and an adapter trained on it loads onto the full-precision model and merges there.
"""

import torch
from torch import nn
from transformers.models.jetmoe.modeling_jetmoe import JetMoeParallelExperts

from alignment.errors import SmoeError

BLOCKSIZE = 64


def import_bitsandbytes():
    """Imported only where 4-bit is used, so everything else runs without bitsandbytes installed."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise SmoeError("4-bit expert weights (load_in_4bit) need bitsandbytes, which is not installed", "recipe key load_in_4bit", "pip install 'smoe-align[quant]' (or bitsandbytes), or set load_in_4bit: false") from None
    return bitsandbytes


class QuantizedExperts(JetMoeParallelExperts):
    def __init__(self, bank: JetMoeParallelExperts, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.num_experts, self.input_size, self.output_size = bank.num_experts, bank.input_size, bank.output_size
        self.compute_dtype = compute_dtype
        self.states = []
        bnbf = import_bitsandbytes().functional
        for e, weight in enumerate(bank.weight.detach().unbind(0)):  # [out, in] each, quantised one at a time
            packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
            # a frozen parameter rather than a buffer: PEFT and the trainers look for a parameter's device
            self.register_parameter(f"packed_{e}", nn.Parameter(packed, requires_grad=False))
            self.states.append(state)

    def forward(self, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
        bnb = import_bitsandbytes()
        x = inputs.to(self.compute_dtype)
        outputs = [
            bnb.matmul_4bit(chunk, getattr(self, f"packed_{e}").t(), quant_state=self.states[e])
            for e, chunk in enumerate(x.split(expert_size, dim=0))
        ]
        return torch.cat(outputs, dim=0).to(inputs.dtype)

    def storage_bytes(self) -> int:
        """Bytes held for the bank: packed 4-bit weights, quantised block scales and their own scales."""
        total = 0
        for e, state in enumerate(self.states):
            total += getattr(self, f"packed_{e}").numel()
            total += state.absmax.numel() * state.absmax.element_size()  # the NF4 code book is shared, not counted
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + the offset
        return total

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for e, state in enumerate(self.states):  # keep each quantisation state on the packed weights' device
            state.to(getattr(self, f"packed_{e}").device)
        return self


def quantize_experts(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every JetMoE expert bank of `model` by its NF4 version, in place; returns the model."""
    banks = [(name, module) for name, module in model.named_modules() if type(module) is JetMoeParallelExperts]
    for name, bank in banks:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantizedExperts(bank, compute_dtype))
    model.is_experts_4bit = True
    return model
