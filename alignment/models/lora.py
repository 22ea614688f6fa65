"""LoRA on JetMoE's expert banks, applied per expert to the tokens routed to it.

An expert bank holds weight [E, out, in]. Its adapter holds A [E, r, in] and B [E, out, r] and adds
    y_e = x_e A_e^T B_e^T * (alpha / r)
to the bank's output for each expert e's own tokens x_e: two grouped matmuls through rank r. W + BA is
never built for the forward pass (PEFT's `target_parameters` builds it for every expert every step).
It plugs into PEFT as a custom LoRA layer, so adapters save, load, merge and unmerge the PEFT way;
`target_modules` names the banks: `input_linear` and `output_linear` reach both the attention experts
and the MLP experts. `expert_lora_config` registers the layer on a `LoraConfig`; loading an adapter
needs the same registration (`alignment.models.jetmoe.load_causal_lm` does it).
"""

import math

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.models.jetmoe.modeling_jetmoe import JetMoeParallelExperts

from alignment.errors import SmoeError
from alignment.models.experts import grouped_linear


class ExpertFactor(nn.Module):
    """One LoRA factor for every expert: weight [E, rows, cols]."""

    def __init__(self, experts: int, rows: int, cols: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, rows, cols))


class ExpertLoraLayer(nn.Module, LoraLayer):
    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: JetMoeParallelExperts, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self.in_features, self.out_features = base_layer.input_size, base_layer.output_size
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs):
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        base = self.get_base_layer()
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = ExpertFactor(base.num_experts, r, self.in_features)
        self.lora_B[adapter_name] = ExpertFactor(base.num_experts, self.out_features, r)
        self.lora_bias[adapter_name] = False
        self.use_dora[adapter_name] = False
        init_factors(self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """[E, out, in]: B_e A_e * scaling for every expert (for merging only)."""
        return torch.bmm(self.lora_B[adapter].weight, self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if not hasattr(self.get_base_layer(), "weight"):
            raise ValueError("cannot merge into 4-bit experts: load the adapter onto the full-precision model and merge there")
        weight = self.get_base_layer().weight
        for name in adapter_names or self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                merged = weight.data + self.get_delta_weight(name).to(weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs while merging adapter {name}")
                weight.data = merged
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data -= self.get_delta_weight(name).to(weight.dtype)

    def forward(self, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
        result = self.base_layer(inputs, expert_size)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            x = self.lora_dropout[name](inputs.to(a.dtype))
            low_rank = grouped_linear(x, a, expert_size)
            result = result + (grouped_linear(low_rank, b, expert_size) * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "expert_lora." + super().__repr__()


def init_factors(a: torch.Tensor, b: torch.Tensor, init) -> None:
    """PEFT's meanings of `init_lora_weights`, per expert: True (A like nn.Linear, B zero: a no-op at
    first), "gaussian" (A normal with std 1/r, B zero), False (both like nn.Linear: not a no-op)."""
    with torch.no_grad():
        for a_e, b_e in zip(a, b):
            if init == "gaussian":
                nn.init.normal_(a_e, std=1 / a.shape[1])
            else:
                nn.init.kaiming_uniform_(a_e, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(b_e, a=math.sqrt(5))


# PEFT options the expert layer does not implement: refused rather than ignored
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "a bias on the LoRA B factor", "layer_replication": "layer replication", "use_qalora": "QALoRA"}
INITS = (True, False, "gaussian")


def expert_lora_config(config):
    """Register the expert LoRA layer on a PEFT LoraConfig (a copy is not needed: registration is idempotent).
    Options it cannot honour stop here, before any training."""
    for key, what in UNSUPPORTED.items():
        if getattr(config, key, None):
            raise SmoeError(f"{key}: {what} is not implemented for LoRA on the expert banks", f"LoRA option {key}", f"unset {key}")
    if config.init_lora_weights not in INITS:
        raise SmoeError(f"init_lora_weights={config.init_lora_weights!r} is not implemented for LoRA on the expert banks", "LoRA option init_lora_weights", f"use one of {INITS}")
    config._register_custom_module({JetMoeParallelExperts: ExpertLoraLayer})
    return config
