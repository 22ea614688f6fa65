"""4-bit NF4 expert weights for QLoRA: JetMoE banks and fused experts.

bitsandbytes' 4-bit loading converts only `nn.Linear`, which leaves JetMoE's 3-D expert banks (about
96% of the model) in full precision. Here every expert of every bank is quantised on its own with
`bitsandbytes.functional.quantize_4bit` (NF4, blocks of 64, double quantisation of the block scales)
and is multiplied by dequantising the experts that receive tokens, a group at a time, for one grouped
matmul per group, and again in backward: no full-precision copy of the bank is made or kept for backward.
The rest of the model (embeddings, key-value projections, routers, norms) stays in its dtype.
`QuantizedExperts` is a `JetMoeParallelExperts`, so expert LoRA (`alignment.models.lora`) wraps it
unchanged, and an adapter trained on it loads onto the full-precision model and merges there.

A quantised model saves and reloads: each expert's quantisation state goes into the state dict beside
its packed weights, and `config.quantized_experts` marks the checkpoint, so a second QLoRA run loads
the 4-bit model as it is instead of quantising a full-precision copy again (`smoe-align quantize`).

The other families keep their experts as fused 3-D weights (`alignment.models.moe`): `NF4Experts`
holds one of them in NF4 per expert as a parametrization of the module, quantized while the model
loads (`alignment.models.fused_4bit`) and multiplied by dequantising the experts that receive tokens
in one call for one grouped matmul.
"""

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.models.jetmoe.modeling_jetmoe import JetMoeParallelExperts

from alignment.errors import SmoeError
from alignment.models.experts import grouped_linear

BLOCKSIZE = 64
MARK = "quantized_experts"  # the config key that marks a checkpoint with NF4 expert banks


def bitsandbytes():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401  (loads the submodule)
    except ImportError:
        raise SmoeError("4-bit expert banks need bitsandbytes, which is not installed", "recipe key load_in_4bit", "pip install bitsandbytes (or the package's [quant] extra)") from None
    return bnb


@functools.cache
def usable_bitsandbytes():
    """bitsandbytes, checked by an NF4 round trip on the device training will use: an install whose
    native library or device backend is missing imports fine and fails only at the first 4-bit weight."""
    bnb = bitsandbytes()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        probe = torch.linspace(-1, 1, 2 * BLOCKSIZE, device=device).view(2, BLOCKSIZE)
        back = bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(probe, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True))
        if not torch.allclose(back, probe, atol=0.15):  # half the widest gap between NF4 values
            raise RuntimeError("an NF4 round trip came back wrong")
    except (RuntimeError, NotImplementedError, AttributeError, OSError) as err:
        raise SmoeError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} is installed but cannot run 4-bit weights on {device} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
            "recipe key load_in_4bit",
            "install a bitsandbytes build for this device (pip install -U bitsandbytes), or set load_in_4bit: false",
        ) from None
    return bnb


class QuantizedExperts(JetMoeParallelExperts):
    """An expert bank [E, out, in] held as E packed NF4 weights with their quantisation states."""

    def __init__(self, num_experts: int, input_size: int, output_size: int, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.num_experts, self.input_size, self.output_size = num_experts, input_size, output_size
        self.compute_dtype = compute_dtype
        self.states = [None] * num_experts
        for e in range(num_experts):  # empty until quantised or loaded; 2 weights per byte
            # a frozen parameter rather than a buffer: PEFT and the trainers look for a parameter's device
            placeholder = torch.empty(output_size * input_size // 2, 1, dtype=torch.uint8, device="meta")
            self.register_parameter(f"packed_{e}", nn.Parameter(placeholder, requires_grad=False))

    @classmethod
    def from_bank(cls, bank: JetMoeParallelExperts, compute_dtype: torch.dtype) -> "QuantizedExperts":
        quantize_4bit = bitsandbytes().functional.quantize_4bit
        quantized = cls(bank.num_experts, bank.input_size, bank.output_size, compute_dtype)
        for e, weight in enumerate(bank.weight.detach().unbind(0)):  # [out, in] each, quantised one at a time
            packed, quantized.states[e] = quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
            setattr(quantized, f"packed_{e}", nn.Parameter(packed, requires_grad=False))
        return quantized

    out_features = property(lambda self: self.output_size)
    in_features = property(lambda self: self.input_size)

    def forward(self, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
        # the grouped path of fused NF4 experts: experts dequantised a group at a time for one grouped matmul
        return _NF4GroupedMatmul.apply(inputs.to(self.compute_dtype), None, self, expert_size).to(inputs.dtype)

    def dequantize(self, packed: None, experts: list[int]) -> torch.Tensor:
        """The listed experts' weights [len(experts), out, in] in compute dtype, each dequantised into its slice."""
        dequantize_4bit = bitsandbytes().functional.dequantize_4bit
        first = getattr(self, f"packed_{experts[0]}")
        out = torch.empty(len(experts), self.output_size, self.input_size, dtype=self.compute_dtype, device=first.device)
        for i, e in enumerate(experts):
            if out.device.type == "cpu" or self.states[e].dtype != out.dtype:  # the CPU backend has no out= variant; out= needs the state's dtype
                out[i] = dequantize_4bit(getattr(self, f"packed_{e}"), self.states[e])
            else:
                dequantize_4bit(getattr(self, f"packed_{e}"), self.states[e], out=out[i])
        return out

    def dequantized(self, dtype: torch.dtype) -> JetMoeParallelExperts:
        """The bank in full precision, as the 4-bit weights stand (to merge an adapter into)."""
        dequantize_4bit = bitsandbytes().functional.dequantize_4bit
        bank = JetMoeParallelExperts(self.num_experts, self.input_size, self.output_size)
        weights = [dequantize_4bit(getattr(self, f"packed_{e}"), state) for e, state in enumerate(self.states)]
        bank.weight = nn.Parameter(torch.stack(weights).to(dtype))
        return bank

    def storage_bytes(self) -> int:
        """Bytes held for the bank: packed 4-bit weights, quantised block scales and their own scales."""
        total = 0
        for e, state in enumerate(self.states):
            total += getattr(self, f"packed_{e}").numel()
            total += state.absmax.numel() * state.absmax.element_size()  # the NF4 code book is shared, not counted
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + the offset
        return total

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for e, state in enumerate(self.states):
            for key, value in state.as_dict(packed=True).items():
                destination[f"{prefix}state_{e}.{key}"] = value.clone()  # code books are shared; safetensors wants them apart

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        functional = bitsandbytes().functional
        for e in range(self.num_experts):
            own = f"{prefix}state_{e}."
            found = {key[len(own) :]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(own)]}
            if not found:
                missing_keys.append(own + "*")
                continue
            self.states[e] = functional.QuantState.from_dict(found, device=found["absmax"].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for e, state in enumerate(self.states):  # keep each quantisation state on the packed weights' device
            if state is not None:
                state.to(getattr(self, f"packed_{e}").device)
        return self


def _banks(model: nn.Module, kind: type):
    return [(name, module) for name, module in model.named_modules() if type(module) is kind]


def _replace(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def quantize_experts(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every JetMoE expert bank of `model` by its NF4 version, in place; returns the model."""
    for name, bank in _banks(model, JetMoeParallelExperts):
        _replace(model, name, QuantizedExperts.from_bank(bank, compute_dtype))
    setattr(model.config, MARK, {"quant_type": "nf4", "blocksize": BLOCKSIZE, "compute_dtype": str(compute_dtype).removeprefix("torch.")})
    return model


def is_quantized(model: nn.Module) -> bool:
    """Expert weights held in NF4: JetMoE banks, or fused experts (loaded with `fused_4bit.Fused4bitConfig`)."""
    return any(isinstance(m, (QuantizedExperts, NF4Experts)) for m in model.modules())


def dequantize_experts(model: nn.Module) -> nn.Module:
    """Every NF4 bank back in the model's dtype, in place (an adapter trained on 4-bit merges into these);
    a model loaded in 4-bit by transformers (fused experts) also gets its Linear4bit layers back."""
    if getattr(model, "hf_quantizer", None) is not None:
        return model.dequantize()
    for name, bank in _banks(model, QuantizedExperts):
        _replace(model, name, bank.dequantized(bank.compute_dtype))
    if hasattr(model.config, MARK):
        delattr(model.config, MARK)
    return model


def is_quantized_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and MARK in json.loads(config.read_text())


def load_quantized(path: str | Path, **kwargs) -> nn.Module:
    """A checkpoint saved by a model with NF4 expert banks, loaded as it is: nothing full-size is built."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    compute_dtype = getattr(torch, getattr(config, MARK)["compute_dtype"])
    if getattr(config, "quantization_config", None) is not None:  # fused experts: transformers loads it through our quantizer
        import alignment.models.fused_4bit  # noqa: F401  (registers the method)

        kwargs.pop("quantization_config", None)  # the checkpoint's own
        model = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype, **kwargs)
        model.name_or_path = str(path)
        return model
    with init_empty_weights():  # parameters on the meta device until the checkpoint's own are assigned
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, **kwargs)
    for name, bank in _banks(model, JetMoeParallelExperts):
        _replace(model, name, QuantizedExperts(bank.num_experts, bank.input_size, bank.output_size, compute_dtype))
    state = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise SmoeError(f"not a complete 4-bit checkpoint (missing {still_meta[:3]}, unexpected {unexpected[:3]})", str(path), "save it again with `smoe-align quantize`")
    model.name_or_path = str(path)
    return model


@dataclass
class QuantizeArgs:
    model_name_or_path: str = ""
    output_dir: str = ""
    dtype: str = "bfloat16"  # what the NF4 experts compute in, and the dtype of everything else


def run(args: QuantizeArgs):
    """smoe-align quantize: a model (or adapter chain, merged) saved with NF4 expert weights, for QLoRA runs.
    JetMoE banks are quantized after loading; other families (fused experts) while loading, with their
    nn.Linear layers in bitsandbytes 4-bit too."""
    from alignment.manifest import write_manifest
    from alignment.models.jetmoe import load_causal_lm, load_tokenizer, model_type

    started = time.time()
    if not args.model_name_or_path or not args.output_dir:
        raise SmoeError("quantize needs model_name_or_path and output_dir", "recipe", "set both")
    usable_bitsandbytes()
    if model_type(args.model_name_or_path) == "jetmoe":
        model = load_causal_lm(args.model_name_or_path, args.dtype)
        quantize_experts(model, model.dtype)
    else:  # fused experts and nn.Linear layers quantized as they load; routers and lm_head kept
        from trl import ModelConfig

        from alignment.train_common import linear_4bit_config

        four_bit = ModelConfig(dtype=args.dtype, load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
        model = load_causal_lm(args.model_name_or_path, args.dtype, quantization_config=linear_4bit_config(four_bit, args.model_name_or_path))
        if not fused_quantized(model):
            raise SmoeError("the model has no expert weights to quantize (neither JetMoE banks nor fused 3-D experts)", args.model_name_or_path, "quantize an MoE model; dense models load in 4-bit directly with load_in_4bit: true")
    model.save_pretrained(args.output_dir)
    load_tokenizer(args.model_name_or_path).save_pretrained(args.output_dir)
    write_manifest(args.output_dir, "quantize", started, source=args.model_name_or_path)


NESTED_BLOCKSIZE = 256  # bitsandbytes' blocks for the double quantisation of the block scales


class NF4Experts(nn.Module):
    """A fused 3-D expert weight held as E packed NF4 matrices [out, in] with double-quantised block scales.

    It is registered as a parametrization of the experts module's weight, so the module keeps its
    class, its flags and its parameter names (PEFT's `target_parameters` and the expert LoRA find them
    as before). Reading the weight dequantises the whole bank (PEFT reads shapes and merges through it);
    `fused_experts_forward` instead calls `matmul`, which dequantises only the experts that receive
    tokens, in one call, for one grouped matmul, in forward and again in backward.

    Each expert's bitsandbytes quantisation state lives in buffers, so it saves, loads and moves with
    the model: absmax [E, blocks] (block scales, 8-bit), nested_absmax [E, blocks / 256] and offset [E]
    (their own scales), nested_code [256] (the 8-bit code of the scales), code [16] (NF4's values)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, transposed: bool, compute_dtype: torch.dtype, device=None):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.transposed, self.compute_dtype = transposed, compute_dtype
        blocks = out_features * in_features // BLOCKSIZE
        self.register_buffer("absmax", torch.empty(num_experts, blocks, dtype=torch.uint8, device=device))
        self.register_buffer("nested_absmax", torch.empty(num_experts, -(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device))
        self.register_buffer("offset", torch.empty(num_experts, dtype=torch.float32, device=device))
        self.register_buffer("nested_code", torch.empty(256, dtype=torch.float32, device=device))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=device))

    @classmethod
    def from_states(cls, states: list, transposed: bool, compute_dtype: torch.dtype) -> "NF4Experts":
        """From the E states `quantize_4bit` returned (NF4, blocks of 64, compressed statistics)."""
        first = states[0]
        nf4 = cls(len(states), *first.shape, transposed, compute_dtype, device=first.absmax.device)
        with torch.no_grad():
            nf4.absmax.copy_(torch.stack([s.absmax for s in states]))
            nf4.nested_absmax.copy_(torch.stack([s.state2.absmax for s in states]))
            nf4.offset.copy_(torch.stack([s.offset.reshape(()) for s in states]))
            nf4.nested_code.copy_(first.state2.code)
            nf4.code.copy_(first.code)
        return nf4

    def scales(self, expert: int) -> torch.Tensor:
        """One expert's block scales [blocks] in float32, undone from their double quantisation."""
        functional = bitsandbytes().functional
        return functional.dequantize_blockwise(self.absmax[expert], absmax=self.nested_absmax[expert], code=self.nested_code, blocksize=NESTED_BLOCKSIZE) + self.offset[expert]

    def all_scales(self, experts: list[int]) -> torch.Tensor:
        """The listed experts' block scales, end to end: in one call where each expert's scales fill
        whole blocks of the double quantisation (real widths do), else expert by expert."""
        blocks = self.absmax.shape[1]
        if blocks % NESTED_BLOCKSIZE:
            return torch.cat([self.scales(e) for e in experts])
        functional = bitsandbytes().functional
        scales = functional.dequantize_blockwise(self.absmax[experts].reshape(-1), absmax=self.nested_absmax[experts].reshape(-1), code=self.nested_code, blocksize=NESTED_BLOCKSIZE)
        return scales + self.offset[experts].repeat_interleave(blocks)

    def dequantize(self, packed: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """The listed experts' weights [len(experts), out, in] in compute dtype, every block of every
        listed expert dequantised in one bitsandbytes call."""
        functional = bitsandbytes().functional

        def state(scales, rows):
            return functional.QuantState(scales.float(), shape=(rows, self.in_features), code=self.code, blocksize=BLOCKSIZE, quant_type="nf4", dtype=self.compute_dtype)

        if self.in_features % BLOCKSIZE:  # bitsandbytes' CPU kernel lays out rows shorter than a block its own way
            return torch.stack([functional.dequantize_4bit(packed[e], state(self.scales(e), self.out_features)) for e in experts])
        chosen = packed if len(experts) == self.num_experts else packed[experts]
        whole = state(self.all_scales(experts), len(experts) * self.out_features)
        return functional.dequantize_4bit(chosen.reshape(-1, 1), whole).view(len(experts), self.out_features, self.in_features)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        bank = self.dequantize(packed, list(range(self.num_experts)))
        return bank.transpose(1, 2) if self.transposed else bank

    def matmul(self, packed: torch.Tensor, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
        """inputs [tokens sorted by expert, in] -> [tokens, out]: the experts that receive tokens are
        dequantised together for one grouped matmul, and again in backward (nothing full-size is kept)."""
        return _NF4GroupedMatmul.apply(inputs.to(self.compute_dtype), packed, self, expert_size)

    def storage_bytes(self, packed: torch.Tensor) -> int:
        """Packed weights, 8-bit block scales and their float32 scales and offsets (code books are shared)."""
        return packed.numel() + self.absmax.numel() + 4 * (self.nested_absmax.numel() + self.offset.numel())


class _NF4GroupedMatmul(torch.autograd.Function):
    """x W_e^T per expert on its own rows, with W dequantised from NF4 in forward and again in backward
    (the weights are frozen: only the input gets a gradient)."""

    @staticmethod
    def forward(ctx, x, packed, nf4, expert_size):
        active = [e for e, size in enumerate(expert_size) if size]
        ctx.packed_nf4_active = packed, nf4, active, [expert_size[e] for e in active]
        if not active:
            return x.new_zeros(x.shape[0], nf4.out_features)
        return torch.cat([grouped_linear(x[rows], nf4.dequantize(packed, experts), sizes) for experts, sizes, rows in _dequant_groups(nf4, *ctx.packed_nf4_active[2:])])

    @staticmethod
    def backward(ctx, grad):
        packed, nf4, active, sizes = ctx.packed_nf4_active
        if not active:
            return grad.new_zeros(grad.shape[0], nf4.in_features), None, None, None
        grad = grad.to(nf4.compute_dtype).contiguous()  # grad_x = grad W, per expert
        pieces = [grouped_linear(grad[rows], nf4.dequantize(packed, experts).transpose(1, 2), group) for experts, group, rows in _dequant_groups(nf4, active, sizes)]
        return torch.cat(pieces), None, None, None


DEQUANT_GROUP_BYTES = 128 * 2**20  # dequantised expert weights alive at once (Mixtral-8x7B: one gate/up, Qwen3-30B-A3B: 21)


def _dequant_groups(nf4: "NF4Experts", active: list[int], sizes: list[int]):
    """Runs of the active experts whose dequantised weights together stay under DEQUANT_GROUP_BYTES (one
    expert at least), with their token counts and rows: few calls, and no whole bf16 bank at once."""
    per_expert = nf4.out_features * nf4.in_features * torch.finfo(nf4.compute_dtype).bits // 8
    step, start = max(1, DEQUANT_GROUP_BYTES // per_expert), 0
    for i in range(0, len(active), step):
        rows = sum(sizes[i : i + step])
        yield active[i : i + step], sizes[i : i + step], slice(start, start + rows)
        start += rows


def nf4_parametrization(module: nn.Module, name: str) -> NF4Experts | None:
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or name not in parametrizations:
        return None
    found = [p for p in parametrizations[name] if isinstance(p, NF4Experts)]
    return found[0] if found else None


def quantize_bank(weight: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, list]:
    """A fused 3-D expert weight in NF4, one expert at a time: (packed [E, out*in/2, 1] uint8, E states).
    Each expert is stored [out, in] whatever the module's layout."""
    quantize_4bit = bitsandbytes().functional.quantize_4bit
    packed, states = [], []
    for expert in weight.detach().unbind(0):
        matrix = (expert.t() if transposed else expert).contiguous()
        p, state = quantize_4bit(matrix, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        packed.append(p)
        states.append(state)
    return torch.stack(packed), states


def attach_nf4(module: nn.Module, name: str, packed: torch.Tensor, states, transposed: bool, compute_dtype: torch.dtype):
    """Put `packed` in place of the module's weight `name`, read through its NF4 states (a list of
    bitsandbytes states, or an NF4Experts to be filled by loading a checkpoint)."""
    from torch.nn.utils import parametrize

    if hasattr(module, name):
        delattr(module, name)
    module.register_parameter(name, nn.Parameter(packed, requires_grad=False))
    nf4 = NF4Experts.from_states(states, transposed, compute_dtype) if isinstance(states, list) else states
    parametrize.register_parametrization(module, name, nf4, unsafe=True)
    # the class parametrize made for this one module: its own forward, which never dequantises a whole bank
    type(module).forward = _nf4_experts_forward


def quantize_fused_experts(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Every fused 3-D expert weight of an already loaded `model` (gate/up and down of each experts
    module) in NF4, one expert at a time, in place; returns the model. Biases, routers and shared
    experts keep their dtype. Loading with `alignment.models.fused_4bit.Fused4bitConfig` does the same while the
    model loads."""
    from alignment.models.moe import fused_experts, fused_layout

    for module in fused_experts(model).values():
        layout = fused_layout(module)
        for name in layout.weight_names:
            if nf4_parametrization(module, name) is None:
                attach_nf4(module, name, *quantize_bank(getattr(module, name), layout.transposed), layout.transposed, compute_dtype)
    return model


def _nf4_experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    from alignment.models.moe import fused_experts_forward

    return fused_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def fused_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, NF4Experts) for m in model.modules())
