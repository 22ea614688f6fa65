"""Router auxiliary losses for JetMoE's two routers per layer (attention experts and MLP experts).

Stock TRL reads `router_aux_loss_coef` while JetMoE calls its coefficient `aux_loss_coef`, so the
load-balancing loss is silently off; setting TRL's key instead crashes inside JetMoE. Here forward hooks
on every `JetMoeTopKGating` collect the router logits of the training forward pass, and a trainer mixin
adds, with the recipe's coefficients:
  load balancing (Switch Transformer)  E * sum_e f_e * P_e   (f_e: share of top-k assignments to expert e,
                                                              P_e: mean router probability of e)
  router z-loss (ST-MoE)               mean over tokens of logsumexp(logits)^2
each averaged over all routers, and logs them apart with the expert load and routing entropy per router.
"""

from dataclasses import dataclass

import torch
from transformers.models.jetmoe.modeling_jetmoe import JetMoeTopKGating

from alignment.errors import SmoeError


@dataclass
class MoEArgs:
    moe_aux_loss_coef: float = 0.0  # load balancing over both routers of every layer (JetMoE-8B used 0.01)
    moe_z_loss_coef: float = 0.0  # router z-loss (ST-MoE suggests 0.001)


def load_balancing_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """logits [tokens, E] -> scalar; 1.0 when routing is perfectly balanced."""
    num_experts = logits.shape[-1]
    probs = logits.softmax(-1)
    chosen = torch.zeros_like(probs).scatter(1, logits.topk(top_k, dim=-1).indices, 1.0)
    return num_experts * (chosen.mean(0) / top_k * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.logsumexp(-1).square().mean()


def short_name(module_name: str) -> str:
    """model.layers.3.self_attention.experts.router -> L3.attn; model.layers.3.mlp.router -> L3.mlp"""
    parts = module_name.split(".")
    return f"L{parts[parts.index('layers') + 1]}." + ("attn" if "self_attention" in parts else "mlp")


class RouterLosses:
    """Collects the router logits of grad-enabled forward passes of one model."""

    def __init__(self, model: torch.nn.Module, aux_coef: float, z_coef: float):
        self.aux_coef, self.z_coef, self.records = aux_coef, z_coef, []
        self.handles = [m.register_forward_hook(self._hook(short_name(n))) for n, m in model.named_modules() if isinstance(m, JetMoeTopKGating)]

    def _hook(self, name: str):
        def hook(module, args, output):
            if torch.is_grad_enabled():  # not the reference model's pass, nor generation
                self.records.append((name, output[4], module.top_k))

        return hook

    def pop(self) -> tuple[torch.Tensor, dict]:
        """The weighted loss over the routers recorded since the last call, and metrics to log."""
        records, self.records = self.records, []
        if not records:
            return torch.tensor(0.0), {}
        metrics, balance, zs = {}, [], []
        for name, logits, top_k in records:
            balance.append(load_balancing_loss(logits, top_k))
            zs.append(z_loss(logits))
            with torch.no_grad():
                probs = logits.softmax(-1)
                load = torch.zeros_like(probs).scatter(1, logits.topk(top_k, dim=-1).indices, 1.0).mean(0) / top_k
                metrics[f"router/{name}/entropy"] = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean().item()
                metrics[f"router/{name}/max_load"] = (load.max() * logits.shape[-1]).item()  # 1.0 = balanced
        aux, z = torch.stack(balance).mean(), torch.stack(zs).mean()
        metrics["router/aux_loss"], metrics["router/z_loss"] = aux.item(), z.item()
        return self.aux_coef * aux + self.z_coef * z, metrics

    def remove(self):
        for handle in self.handles:
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
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if return_outputs:
            return out[0] + extra.to(out[0].device), out[1]
        return out + extra.to(out.device)


def attach_router_losses(trainer, moe: MoEArgs):
    """Give the trainer (a RouterLossMixin) its router losses when the recipe asks for them."""
    if not (moe.moe_aux_loss_coef or moe.moe_z_loss_coef):
        return
    trainer.router_losses = RouterLosses(trainer.model, moe.moe_aux_loss_coef, moe.moe_z_loss_coef)
    if not trainer.router_losses.handles:
        raise SmoeError("moe_aux_loss_coef / moe_z_loss_coef are set but the model has no JetMoE routers", "recipe", "set them to 0 for this model")
