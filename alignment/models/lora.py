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
import sys

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from transformers.models.jetmoe.modeling_jetmoe import JetMoeParallelExperts

from alignment.errors import SmoeError
from alignment.models import onednn
from alignment.models.experts import add_expert_lora, linear_with_lora
from alignment.models.quant import fused_quantized
from alignment.models.moe import expert_modules, fused_experts, fused_experts_forward, fused_layout


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
        if self.disable_adapters and self.merged:  # PEFT's rule: the base alone means the adapters taken out again
            self.unmerge()
        base = self.get_base_layer()
        active = [] if self.disable_adapters or self.merged else [name for name in self.active_adapters if name in self.lora_A]
        if len(active) == 1 and self._one_pass(base, inputs, active[0]):  # the base and its adapter in one pass
            name = active[0]
            return linear_with_lora(inputs, base.weight, [(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])], expert_size)
        result = self.base_layer(inputs, expert_size)
        for name in active:
            x = self.lora_dropout[name](inputs)
            result = add_expert_lora(result, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], expert_size)
        return result

    def _one_pass(self, base, inputs: torch.Tensor, name: str) -> bool:
        """Whether linear_with_lora can take the bank and adapter `name` together: a plain frozen bank on
        oneDNN's path with no hooks of its own (offloading, for one) that calling it would run, and no dropout."""
        return (
            type(base) is JetMoeParallelExperts
            and not (base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"))
            and isinstance(self.lora_dropout[name], nn.Identity)
            and not base.weight.requires_grad
            and onednn.usable(inputs, base.weight)
        )

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


class FusedExpertLora(ParamWrapper):
    """PEFT's `target_parameters` LoRA on one fused expert weight, computed per expert on its own tokens.

    It is PEFT's ParamWrapper in everything it stores: factors, their layout (A [E*r, in], B [out, r*E]),
    nesting (one wrapper per weight, the first weight innermost), state-dict keys, merge and unmerge.
    So the adapter config says `target_parameters` and stock PEFT loads what this saves. Only the
    forward differs: the outermost wrapper gathers the factors of the whole nest and runs
    `fused_experts_forward` (x A_e^T B_e^T through two grouped matmuls) instead of building W + BA
    for every expert."""

    def __init__(self, base_layer, adapter_name: str, parameter_name: str, config, **kwargs):
        super().__init__(base_layer, adapter_name, parameter_name, config, **kwargs)
        self._nest_in_registration_order()

    def _nest_in_registration_order(self):
        """PEFT nests the wrappers of a plain experts module in the order its weights were registered
        (gate/up innermost) but those of a parametrized one (4-bit) in sorted-name order; the nest
        decides the saved keys, so a QLoRA adapter would not load onto the full-precision model. Where
        PEFT built it the other way, this wrapper and the one inside trade everything but their base."""
        inner = self.base_layer
        if not isinstance(inner, FusedExpertLora):
            return
        order = fused_layout(self.get_base_layer()).weight_names
        if order.index(self.parameter_name) > order.index(inner.parameter_name):
            return
        mine, theirs = self.__dict__, inner.__dict__
        for key in (set(mine) | set(theirs)) - {"_modules"}:
            mine[key], theirs[key] = theirs.get(key), mine.get(key)
        for key in (set(mine["_modules"]) | set(theirs["_modules"])) - {"base_layer"}:
            mine["_modules"][key], theirs["_modules"][key] = theirs["_modules"].get(key), mine["_modules"].get(key)

    def factors(self, adapter: str):
        """(A [E, r, in], B [E, out, r] contiguous, scaling): the same numbers as PEFT's get_delta_factors."""
        experts = self.num_experts
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        return a.view(experts, -1, a.shape[-1]), b.view(b.shape[0], -1, experts).permute(2, 0, 1).contiguous(), self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if fused_quantized(self.get_base_layer()):  # writing into a dequantised copy would be lost silently
            raise ValueError("cannot merge into 4-bit experts: load the adapter onto the full-precision model and merge there")
        super().merge(safe_merge, adapter_names)

    def _nest(self) -> list["FusedExpertLora"]:
        layers, layer = [], self
        while isinstance(layer, ParamWrapper):
            layers.append(layer)
            layer = layer.base_layer
        return layers

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        experts, nest = self.get_base_layer(), self._nest()
        quantized = fused_quantized(experts)
        if self.disable_adapters:
            for layer in nest:
                if layer.merged:
                    layer.unmerge()
            if quantized:  # the stock forward would dequantise whole banks
                return fused_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
            return experts(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        lora = {}
        for layer in nest:
            if not layer.merged:
                active = [name for name in layer.active_adapters if name in layer.lora_A]
                lora[layer.parameter_name] = [layer.factors(name) for name in active]
        if not any(lora.values()) and not quantized:
            return experts(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        return fused_experts_forward(experts, hidden_states, top_k_index, top_k_weights, lora)

    def __repr__(self) -> str:
        return "fused_expert_lora." + super().__repr__()


# PEFT nests wrappers on one module only when the outer one's class is named ParamWrapper
FusedExpertLora.__name__ = "ParamWrapper"


def _expert_targets(config, model) -> None:
    """`target_modules` entries that name a fused experts module (for example `experts`) become PEFT
    `target_parameters` on its gate/up and down weights, by full name (PEFT matches a parametrized
    weight, as the 4-bit ones are, by full name only); `all-linear` is resolved for MoEs."""
    banks = fused_experts(model)
    if isinstance(config.target_modules, str) and config.target_modules in ("all-linear", "all_linear") and expert_modules(model):
        modules, parameters = resolve_all_linear(model)
        config.target_modules, config.target_parameters = set(modules), sorted(set(config.target_parameters or []) | set(parameters))
        return
    if not banks or config.target_modules is None or isinstance(config.target_modules, str):
        return
    targets = set(config.target_modules)
    leaf_names = {name.rpartition(".")[2] for name in banks}
    named = targets & leaf_names
    if named:
        parameters = {f"{name}.{weight}" for name, module in banks.items() if name.rpartition(".")[2] in named for weight in fused_layout(module).weight_names}
        config.target_modules = targets - named
        config.target_parameters = sorted(set(config.target_parameters or []) | parameters)


def is_router(name: str) -> bool:
    """Routers and gates of shared experts (`gate`, `router`, `shared_expert_gate`, JetMoE's `router.layer`)."""
    return any(part in ("gate", "router") or part.endswith(("_gate", "_router")) for part in name.split("."))


def resolve_all_linear(model) -> tuple[list[str], list[str]]:
    """`all-linear` on an MoE: (target_modules, target_parameters) = every nn.Linear but routers and the
    output layer (attention projections, shared experts, dense MLPs), every JetMoE bank and the gate/up
    and down weights of every fused experts module. Leaf names where they select exactly that, else full names."""
    output = model.get_output_embeddings()
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output and "lora_" not in name}
    chosen = {name for name in linear if not is_router(name)}
    banks = expert_modules(model)
    jetmoe = {name for name, m in banks.items() if isinstance(m, JetMoeParallelExperts)}
    leaves = {name.rpartition(".")[2] for name in chosen | jetmoe}
    exact = all(name in chosen | jetmoe for name, _ in model.named_modules() if name.rpartition(".")[2] in leaves)
    modules = sorted(leaves) if exact else sorted(chosen | jetmoe)
    parameters = sorted(f"{name}.{w}" for name, m in banks.items() if name not in jetmoe for w in fused_layout(m).weight_names)
    return modules, parameters


def expert_lora_config(config, model=None):
    """Register the expert LoRA layers on a PEFT LoraConfig (idempotent) and, given the model, resolve
    which expert weights it targets. Options the expert layers cannot honour stop here, before any training.
    A model without expert weights gets the config untouched: plain PEFT serves it."""
    if model is not None and not expert_modules(model):
        return config
    for key, what in UNSUPPORTED.items():
        if getattr(config, key, None):
            raise SmoeError(f"{key}: {what} is not implemented for LoRA on the expert banks", f"LoRA option {key}", f"unset {key}")
    if config.init_lora_weights not in INITS:
        raise SmoeError(f"init_lora_weights={config.init_lora_weights!r} is not implemented for LoRA on the expert banks", "LoRA option init_lora_weights", f"use one of {INITS}")
    config._register_custom_module({JetMoeParallelExperts: ExpertLoraLayer})
    if model is None:
        return config
    _expert_targets(config, model)
    check_targets(config, model)
    dropped = peft_drops(config, model)
    if dropped:
        print(f"note: PEFT maps {dropped} onto the fused experts of {model.config.model_type} (its conversion of transformers-4 adapters): modules of those names outside the experts get no LoRA", file=sys.stderr)
    banks = fused_experts(model)
    if banks and config.target_parameters:
        if config.lora_dropout:
            raise SmoeError(
                f"lora_dropout {config.lora_dropout} on fused expert weights: PEFT's target_parameters format, which stock PEFT and vLLM load, has no dropout",
                "recipe key lora_dropout",
                "set lora_dropout: 0",
            )
        config._register_custom_module({type(m): FusedExpertLora for m in banks.values()})
    return config


def peft_drops(config, model) -> list[str]:
    """Targets PEFT itself will drop: for some families (DeepSeek-V3, GLM4-MoE, ...) PEFT 0.21 reads
    `gate_proj` / `up_proj` / `down_proj` as transformers-4 expert names and maps them onto the fused
    experts (to load old adapters), so shared experts and dense MLPs of those names get no LoRA."""
    import copy

    try:
        from peft.utils.transformers_weight_conversion import _convert_peft_config_moe
    except ImportError:
        return []
    if config.target_modules is None or isinstance(config.target_modules, str):
        return []
    converted = copy.deepcopy(config)
    _convert_peft_config_moe(converted, model)
    return sorted(set(config.target_modules) - set(converted.target_modules or []))


def check_targets(config, model) -> None:
    """A `lora_target_modules` name that matches no module stops here, with the names that would."""
    if config.target_modules is None or isinstance(config.target_modules, str):
        return
    names = [name for name, _ in model.named_modules()]
    matches = {t: [n for n in names if n == t or n.endswith("." + t)] for t in config.target_modules}
    unmatched = sorted(t for t, found in matches.items() if not found)
    if not unmatched and any(".parametrizations." in n for found in matches.values() for n in found):
        # a name shared with a 4-bit fused weight (Qwen2-MoE's shared expert down_proj): name the modules in full
        config.target_modules = {n for found in matches.values() for n in found if ".parametrizations." not in n}
    if unmatched:
        banks = expert_modules(model)
        leaves = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear) or n in banks})
        weights = {w: name.rpartition(".")[2] for name, m in fused_experts(model).items() for w in fused_layout(m).weight_names}
        hint = [f"{t} is a weight of the fused experts: name their module, {weights[t]}, to adapt {' and '.join(sorted(k for k, v in weights.items() if v == weights[t]))}" for t in unmatched if t in weights]
        raise SmoeError(f"lora_target_modules {unmatched} match no module of the model", "recipe key lora_target_modules", "; ".join([*hint, f"use names from {leaves}, or all-linear"]))


def lora_targets(config) -> dict:
    """What an adapter config reaches, for the log and the manifest."""
    modules = config.target_modules
    return {"target_modules": sorted(modules) if not isinstance(modules, str) and modules else modules, "target_parameters": sorted(config.target_parameters or [])}
