"""4-bit loading that quantizes fused 3-D experts as they load (QLoRA for Mixtral-style families).

transformers' bitsandbytes loading turns `nn.Linear` layers into `Linear4bit` as their weights are read
but leaves fused 3-D expert weights in full precision (bitsandbytes #1849), so quantizing them after
loading means holding the whole model in bf16 first. Here the same quantizer also claims the experts
weights (`param_needs_quantization`) and its op (`get_quantize_ops`) packs each one in NF4, expert by
expert with double quantisation, right after transformers has read it (and merged a per-expert
checkpoint into the fused layout). transformers converts one weight at a time when a quantizer works
on the fly, so beside the growing 4-bit model only the weight in hand is held in full precision (for a
per-expert checkpoint such as Mixtral's, also the expert tensors transformers merges into it). The
checkpoint's shards stay mapped while loading: their pages are the page cache's, reclaimable, not the
process's. Importing this module registers the method with transformers; it imports bitsandbytes.
"""

import ctypes
import ctypes.util

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.core_model_loading import ConversionOps
from transformers.integrations.bitsandbytes import Bnb4bitQuantize
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

from alignment.errors import SmoeError
from alignment.models.moe import fused_experts, fused_layout
from alignment.models.quant import BLOCKSIZE, MARK, NF4Experts, attach_nf4, nf4_parametrization, quantize_bank


def release_freed_memory():
    """Hand memory freed by the last full-precision weight back to the system. glibc raises its mmap
    threshold after large frees, so banks of up to 32 MiB come from the heap and, freed, stay resident:
    a 4-layer model's load held about 3x its 4-bit size until trimmed."""
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


FUSED_4BIT_METHOD = "smoe_bnb_4bit_fused_experts"


class Fused4bitConfig(BitsAndBytesConfig):
    """transformers' BitsAndBytesConfig for 4-bit loading, whose quantizer also takes the fused 3-D
    experts: each experts weight goes to NF4 per expert (double quantisation) as soon as its tensor is
    read from the checkpoint, before the next one is read. A checkpoint saved from such a model records
    this method and reloads in 4-bit as it is."""

    def __init__(self, load_in_4bit: bool = True, bnb_4bit_quant_type: str = "nf4", **kwargs):
        super().__init__(load_in_4bit=load_in_4bit, bnb_4bit_quant_type=bnb_4bit_quant_type, **kwargs)
        self.quant_method = FUSED_4BIT_METHOD

    def to_dict(self) -> dict:
        # without load_in_4bit, transformers maps a saved checkpoint's config back to this method, not plain bitsandbytes
        return {k: v for k, v in super().to_dict().items() if k not in ("load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit")}


class _Fused4bitQuantizer(Bnb4BitHfQuantizer):
    """bitsandbytes' 4-bit quantizer (nn.Linear to Linear4bit) plus NF4 fused experts, on the same hook
    that transformers gives every quantizer: `param_needs_quantization` picks a weight, the op returned
    by `get_quantize_ops` converts it as it loads."""

    def _process_model_before_weight_loading(self, model, device_map, **kwargs):
        super()._process_model_before_weight_loading(model, device_map, **kwargs)
        self.fused = {name: fused_layout(module) for name, module in fused_experts(model).items()}
        if self.fused and self.quantization_config.bnb_4bit_quant_type != "nf4":
            raise SmoeError(
                f"bnb_4bit_quant_type {self.quantization_config.bnb_4bit_quant_type}: fused expert weights are held in NF4 only",
                "recipe key bnb_4bit_quant_type",
                "set bnb_4bit_quant_type: nf4 (the default)",
            )
        self.nf4_loaded = {}  # (module name, weight name) -> the NF4 states of the packed weight loaded there
        if self.pre_quantized:  # a checkpoint saved in 4-bit: packed weights and NF4 states load in place, nothing full-size is built
            compute_dtype = self.quantization_config.bnb_4bit_compute_dtype
            for module_name, layout in self.fused.items():
                module = model.get_submodule(module_name)
                for name in layout.weight_names:
                    in_features, out_features = layout.in_out(module, name)
                    packed = torch.empty(layout.num_experts, out_features * in_features // 2, 1, dtype=torch.uint8, device="meta")
                    nf4 = NF4Experts(layout.num_experts, out_features, in_features, layout.transposed, compute_dtype, device="meta")
                    attach_nf4(module, name, packed, nf4, layout.transposed, compute_dtype)
                module._is_hf_initialized = True  # its init would read (dequantise) the weights it is about to receive

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, name = param_name.rpartition(".")
        layout = getattr(self, "fused", {}).get(module_name)
        return (layout is not None and name in layout.weight_names) or super().param_needs_quantization(model, param_name, **kwargs)

    def get_quantize_ops(self):
        return _QuantizeFusedOrLinear(self)

    def _dequantize(self, model, dtype=None):
        """Linear4bit layers back to nn.Linear (bitsandbytes' way), NF4 experts back to plain weights."""
        from torch.nn.utils import parametrize

        model = super()._dequantize(model, dtype=dtype)
        for module in fused_experts(model).values():
            for name in fused_layout(module).weight_names:
                if nf4_parametrization(module, name) is not None:
                    weight = getattr(module, name).detach().to(dtype)  # the whole bank, once, to hand back
                    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                    setattr(module, name, nn.Parameter(weight))
        if hasattr(model.config, MARK):
            delattr(model.config, MARK)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        compute_dtype = self.quantization_config.bnb_4bit_compute_dtype
        for (module_name, name), states in self.nf4_loaded.items():
            module, transposed = model.get_submodule(module_name), self.fused[module_name].transposed
            attach_nf4(module, name, getattr(module, name).data, states, transposed, compute_dtype)
        self.nf4_loaded = {}
        release_freed_memory()
        if self.fused:  # marks a checkpoint saved from it as one with NF4 experts (`is_quantized_checkpoint`)
            setattr(model.config, MARK, {"quant_type": "nf4", "blocksize": BLOCKSIZE, "compute_dtype": str(compute_dtype).removeprefix("torch.")})
        return super()._process_model_after_weight_loading(model, **kwargs)


class _QuantizeFusedOrLinear(ConversionOps):
    def __init__(self, quantizer: _Fused4bitQuantizer):
        self.quantizer, self.linear = quantizer, Bnb4bitQuantize(quantizer)

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model: nn.Module | None = None, **kwargs) -> dict:
        result = {}
        for param_name, value in input_dict.items():
            module_name, _, name = param_name.rpartition(".")
            layout = self.quantizer.fused.get(module_name)
            if layout is None:  # an nn.Linear: bitsandbytes' own op
                result.update(self.linear.convert({param_name: value}, full_layer_name=full_layer_name, model=model, **kwargs))
                continue
            release_freed_memory()  # the previous bank, freed once transformers set its packed weight
            weight = value[0] if isinstance(value, list) else value
            packed, states = quantize_bank(weight, layout.transposed)
            del weight, value  # the full-precision bank goes before the next one is read
            self.quantizer.nf4_loaded[(module_name, name)] = states
            result[param_name] = packed
        return result


register_quantization_config(FUSED_4BIT_METHOD)(Fused4bitConfig)
register_quantizer(FUSED_4BIT_METHOD)(_Fused4bitQuantizer)
