"""Activation checkpointing that recomputes only what it must: torch's selective activation checkpointing.

`activation_checkpointing_policy` (sft and dpo, with `gradient_checkpointing: true`):
  full       each decoder layer keeps its input only and reruns its whole forward in backward
             (transformers' own checkpointing; the default)
  selective  each decoder layer also keeps the outputs of its matmuls, grouped (expert) matmuls and
             attention kernels; backward reruns only the cheap rest (norms, activations, rotary,
             routing, gathers, casts, and matmuls over a reduction shorter than MIN_REDUCTION such as
             LoRA's B products) on top of them
  [kinds]    a list of the op kinds to keep, from OP_KINDS: `[attention]` keeps only the attention kernels' outputs

It is torch.utils.checkpoint (non-reentrant) with `context_fn = create_selective_checkpoint_contexts(ops)`,
handed to transformers' `activation_checkpointing_kwargs`, so every decoder layer of every family
(JetMoE and the fused-expert families) checkpoints through it, and TRL's own re-enabling (the DPO
reference pass) keeps it. The policy sees aten ops as they dispatch, those inside an autograd Function's
forward included (the cache sits below autograd): the expert gathers of alignment.models.experts are
recomputed, and of the NF4 expert matmuls (alignment.models.quant; grouped matmuls for JetMoE's banks
and fused experts alike) the product is kept while the dequantisation is redone, since its
output is the bf16 expert bank, too large to keep. A Function's backward runs as it always does (NF4:
dequantise again, multiply).
"""

import functools
import sys
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from alignment.errors import SmoeError
from alignment.models import onednn  # noqa: F401 (registers smoe::expert_linear, named in OP_KINDS)

# op names by kind (aten's unless a namespace is given; alignment.models.onednn's on an x86 CPU); those a torch build lacks (cuDNN attention on a CPU build, say) are skipped
OP_KINDS = {
    "matmul": ("mm", "addmm", "bmm", "baddbmm", "mkldnn._linear_pointwise"),
    "grouped_matmul": ("_grouped_mm", "smoe.expert_linear"),
    "attention": (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    ),
}
POLICIES = {"full": None, "selective": ["matmul", "grouped_matmul", "attention"]}
KEY = "recipe key activation_checkpointing_policy"


@dataclass
class CheckpointingArgs:
    # full: whole decoder layers recomputed; selective: matmul / grouped matmul / attention outputs kept; or the op kinds to keep
    activation_checkpointing_policy: str | list[str] = field(default="full", metadata={"choices": [*POLICIES, *OP_KINDS]})

    def __post_init__(self):
        self.kinds()  # a bad list stops while the recipe is read

    def kinds(self) -> list[str] | None:
        """The op kinds whose outputs are kept; None: whole layers recomputed."""
        policy = self.activation_checkpointing_policy
        if isinstance(policy, str):
            return POLICIES[policy] if policy in POLICIES else [policy]
        if not policy or set(policy) & set(POLICIES):
            raise ValueError(f"activation_checkpointing_policy {policy!r}: write full or selective alone, or list op kinds from {', '.join(OP_KINDS)}")
        return list(dict.fromkeys(policy))


# a matmul's output is kept only when its reduction is at least this long: below it, redoing the product costs
# few FLOPs per element kept (a LoRA B product, reduction = rank, is cheaper to redo than to hold)
MIN_REDUCTION = 256
# where each matmul op's left operand sits among its arguments (the reduction is its last dimension)
LEFT_OPERAND = {"mm": 0, "bmm": 0, "_grouped_mm": 0, "_linear_pointwise": 0, "expert_linear": 0, "addmm": 1, "baddbmm": 1}


def _op(name: str):
    namespace, _, name = name.rpartition(".")
    packet = getattr(getattr(torch.ops, namespace or "aten"), name, None)
    return getattr(packet, "default", None)


def ops_of(kinds: list[str]) -> set:
    return {op for kind in kinds for name in OP_KINDS[kind] if (op := _op(name)) is not None}


def keep_outputs(ops: set, min_reduction: int, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The policy: keep the outputs of the listed ops, matmuls only when their reduction is long enough."""
    if op not in ops:
        return CheckpointPolicy.PREFER_RECOMPUTE
    left = LEFT_OPERAND.get(op.__name__.split(".")[0])
    if left is not None and args[left].shape[-1] < min_reduction:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


class SelectiveCheckpointing(dict):
    """`context_fn` for torch.utils.checkpoint that keeps the outputs of the named op kinds. A dict of its
    settings, so that the training arguments it travels in still dump to JSON (TensorBoard's args text)."""

    def __init__(self, kinds: list[str], min_reduction: int | None = None):
        super().__init__(keep_outputs_of=list(kinds), min_matmul_reduction=min_reduction or MIN_REDUCTION)

    def __call__(self):
        policy = functools.partial(keep_outputs, ops_of(self["keep_outputs_of"]), self["min_matmul_reduction"])
        return create_selective_checkpoint_contexts(policy)


def use_checkpointing_policy(training_args, args: CheckpointingArgs | None, peft: bool):
    """Put the policy into the training arguments, which the trainer enables checkpointing from (so call
    this before building it), or refuse what cannot be honoured. Calling it again changes nothing."""
    kinds = args.kinds() if args is not None else None
    if kinds is None:
        return
    if not training_args.gradient_checkpointing:
        raise SmoeError(f"activation_checkpointing_policy {args.activation_checkpointing_policy!r} needs activation checkpointing, which is off", KEY, "set gradient_checkpointing: true, or drop the key")
    kwargs = dict(training_args.gradient_checkpointing_kwargs or {})
    if "selective" in kwargs:  # TRL's SFT-only switch (attention outputs kept), which would replace this policy
        raise SmoeError("gradient_checkpointing_kwargs.selective and activation_checkpointing_policy both choose what checkpointing keeps", "recipe key gradient_checkpointing_kwargs", "drop selective from gradient_checkpointing_kwargs; activation_checkpointing_policy: [attention] keeps what it keeps")
    if kwargs.get("use_reentrant", False):
        raise SmoeError("selective activation checkpointing runs on torch's non-reentrant checkpoint only", "recipe key gradient_checkpointing_kwargs", "set gradient_checkpointing_kwargs: {use_reentrant: false}, or activation_checkpointing_policy: full")
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if peft and plugin is not None and plugin.zero_stage == 3:  # TRL 1.16 then forces use_reentrant: true
        raise SmoeError("TRL runs LoRA under DeepSpeed ZeRO-3 with reentrant checkpointing, where selective checkpointing cannot run", KEY, "set activation_checkpointing_policy: full for LoRA under ZeRO-3")
    if kwargs.get("context_fn") == SelectiveCheckpointing(kinds):
        return
    kwargs["context_fn"] = SelectiveCheckpointing(kinds)
    kwargs["use_reentrant"] = False  # transformers fills it in only when no kwargs are given
    # transformers holds the old and the new name as one dict: set both, whichever is read
    training_args.activation_checkpointing_kwargs = training_args.gradient_checkpointing_kwargs = kwargs
    print(f"note: activation checkpointing keeps the outputs of the {', '.join(kinds)} ops and recomputes the rest", file=sys.stderr)
