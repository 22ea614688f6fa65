"""Router auxiliary losses for JetMoE's two routers per layer (attention experts and MLP experts).

Stock TRL reads `router_aux_loss_coef` while JetMoE calls its coefficient `aux_loss_coef`, so the
load-balancing loss is silently off; setting TRL's key instead crashes inside JetMoE. Here forward hooks
on every `JetMoeTopKGating` collect the router logits of the training forward pass, a pre-hook on the
decoder collects which token belongs to which sequence (padding belongs to none), and a trainer mixin
adds, with the recipe's coefficients:
  load balancing (Switch Transformer)  E * sum_e f_e * P_e   (f_e: share of top-k assignments to expert e,
                                                              P_e: mean router probability of e)
  router z-loss (ST-MoE)               mean over tokens of logsumexp(logits)^2
each measured per sequence over its real tokens (the sequence-wise form of DeepSeek-V3), averaged over
the sequences and over all routers, and logs them apart with the expert load and routing entropy per
router. Per sequence, because a mean over sequences does not depend on how a batch is cut into
micro-batches or processes, nor on padding; a batch-level balance would change with both.
"""

from dataclasses import dataclass

import torch
from transformers.models.jetmoe.modeling_jetmoe import JetMoeTopKGating

from alignment.errors import SmoeError


@dataclass
class MoEArgs:
    moe_aux_loss_coef: float = 0.0  # load balancing over both routers of every layer (JetMoE-8B used 0.01)
    moe_z_loss_coef: float = 0.0  # router z-loss (ST-MoE suggests 0.001)


def load_balancing_loss(logits: torch.Tensor, top_k: int, sequences: torch.Tensor | None = None) -> torch.Tensor:
    """logits [tokens, E], sequences [S, tokens] (which tokens each sequence owns; one sequence of all
    tokens when None) -> scalar, the mean over sequences; 1.0 when routing is perfectly balanced."""
    num_experts = logits.shape[-1]
    owners = _owners(logits, sequences)
    probs = logits.softmax(-1)
    chosen = torch.zeros_like(probs).scatter(1, logits.topk(top_k, dim=-1).indices, 1.0)
    share = (owners @ chosen) / top_k, owners @ probs  # [S, E] each: f_e and P_e per sequence
    return num_experts * (share[0] * share[1]).sum(-1).mean()


def z_loss(logits: torch.Tensor, sequences: torch.Tensor | None = None) -> torch.Tensor:
    return (_owners(logits, sequences) @ logits.logsumexp(-1).square()).mean()


def _owners(logits: torch.Tensor, sequences: torch.Tensor | None) -> torch.Tensor:
    """[S, tokens] weights: 1 / (tokens of the sequence) on each of its tokens, 0 elsewhere."""
    if sequences is None:
        sequences = torch.ones(1, logits.shape[0], device=logits.device)
    sequences = sequences.to(logits.dtype)
    return sequences / sequences.sum(-1, keepdim=True)


def sequence_membership(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """[S, B*T] 0/1: which flattened token belongs to which sequence. A padded batch has one sequence per
    row (its mask's ones); a packed row (position ids restarting at 0, no mask) holds several."""
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.bool()
        if position_ids is None or mask.shape[0] > 1 or not mask.all():
            rows = torch.eye(mask.shape[0], dtype=torch.bool, device=mask.device)
            return (rows[:, :, None] & mask[None]).flatten(1)[mask.any(-1)]
    if position_ids is not None and position_ids.dim() == 2:
        starts = (position_ids.flatten() == 0).cumsum(0) - 1  # sequence index of every token
        return starts[None, :] == torch.arange(int(starts.max()) + 1, device=starts.device)[:, None]
    return None


def short_name(module_name: str) -> str:
    """model.layers.3.self_attention.experts.router -> L3.attn; model.layers.3.mlp.router -> L3.mlp"""
    parts = module_name.split(".")
    return f"L{parts[parts.index('layers') + 1]}." + ("attn" if "self_attention" in parts else "mlp")


class RouterLosses:
    """Collects the router logits of grad-enabled forward passes of one model."""

    def __init__(self, model: torch.nn.Module, aux_coef: float, z_coef: float):
        self.aux_coef, self.z_coef, self.records, self.sequences = aux_coef, z_coef, [], None
        self.handles = [m.register_forward_hook(self._hook(short_name(n))) for n, m in model.named_modules() if isinstance(m, JetMoeTopKGating)]
        decoders = [m for m in model.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList) and hasattr(m, "embed_tokens")]
        self.batch_handles = [m.register_forward_pre_hook(self._see_batch, with_kwargs=True) for m in decoders[:1]]

    def _see_batch(self, module, args, kwargs):
        if torch.is_grad_enabled():
            ids = kwargs.get("input_ids", args[0] if args else None)
            shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
            self.sequences = sequence_membership(kwargs.get("attention_mask"), kwargs.get("position_ids"), shape)

    def _hook(self, name: str):
        def hook(module, args, output):
            if torch.is_grad_enabled():  # not the reference model's pass, nor generation
                self.records.append((name, output[4], module.top_k, self.sequences))

        return hook

    def pop(self) -> tuple[torch.Tensor, dict]:
        """The weighted loss over the routers recorded since the last call, and metrics to log."""
        records, self.records = self.records, []
        if not records:
            return torch.tensor(0.0), {}
        metrics, balance, zs = {}, [], []
        for name, logits, top_k, sequences in records:
            balance.append(load_balancing_loss(logits, top_k, sequences))
            zs.append(z_loss(logits, sequences))
            with torch.no_grad():
                if sequences is not None:  # health over real tokens only
                    logits = logits[sequences.any(0)]
                probs = logits.softmax(-1)
                load = torch.zeros_like(probs).scatter(1, logits.topk(top_k, dim=-1).indices, 1.0).mean(0) / top_k
                metrics[f"router/{name}/entropy"] = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean().item()
                metrics[f"router/{name}/max_load"] = (load.max() * logits.shape[-1]).item()  # 1.0 = balanced
        aux, z = torch.stack(balance).mean(), torch.stack(zs).mean()
        metrics["router/aux_loss"], metrics["router/z_loss"] = aux.item(), z.item()
        return self.aux_coef * aux + self.z_coef * z, metrics

    def remove(self):
        for handle in self.handles + self.batch_handles:
            handle.remove()


class RouterLossMixin:
    """Put before a TRL trainer class: adds the router losses to `compute_loss` and logs them."""

    router_losses: RouterLosses | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.router_losses is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.router_losses.records.clear()  # drop what checkpointed recomputation recorded in backward
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        extra, metrics = self.router_losses.pop()
        if model.training and self._loss_already_scaled_for_accumulation(num_items_in_batch):
            extra = extra / self.current_gradient_accumulation_steps  # the trainer divides only unscaled losses
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if return_outputs:
            return out[0] + extra.to(out[0].device), out[1]
        return out + extra.to(out.device)

    def _loss_already_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Trainer.training_step's own rule for whether it will divide the loss by the accumulation steps."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None


def attach_router_losses(trainer, moe: MoEArgs):
    """Give the trainer (a RouterLossMixin) its router losses when the recipe asks for them."""
    if not (moe.moe_aux_loss_coef or moe.moe_z_loss_coef):
        return
    trainer.router_losses = RouterLosses(trainer.model, moe.moe_aux_loss_coef, moe.moe_z_loss_coef)
    if not trainer.router_losses.handles:
        raise SmoeError("moe_aux_loss_coef / moe_z_loss_coef are set but the model has no JetMoE routers", "recipe", "set them to 0 for this model")
