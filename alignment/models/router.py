"""Router losses and router health for every MoE family: JetMoE's two routers per layer and the top-k
routers of transformers' fused-expert families (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, DeepSeek-V3, GLM4-MoE).

Which modules route is read from the model: transformers declares, for `output_router_logits`, the class
whose output carries the router logits (`_can_record_outputs["router_logits"]`, with the output index).
How each routes is read from the router itself, once, on a probe input:
  softmax  its chosen experts are the top-k of its logits and their weights follow exp(logits)
           (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, JetMoE);
  bias     it holds an `e_score_correction_bias`: sigmoid scores, balanced by that bias without an auxiliary
           loss (DeepSeek-V3's noaux_tc, GLM4-MoE). No balancing loss and no z-loss for these (said once).
A router that is neither is refused by class name when a router loss is asked (its health is still measured).

Forward hooks collect the router logits of grad-enabled passes only (not the DPO reference, not generation),
a pre-hook on the decoder which token belongs to which sequence (padding belongs to none), and a trainer
mixin adds, with the recipe's coefficients:
  load balancing (Switch Transformer)  E * sum_e f_e * P_e   (f_e: share of top-k assignments to expert e,
                                                              P_e: mean router probability of e)
  router z-loss (ST-MoE)               mean over tokens of logsumexp(logits)^2
each measured per sequence over its real tokens (the sequence-wise form of DeepSeek-V3), averaged over the
sequences and over the softmax routers. Per sequence, because a mean over sequences does not depend on how a
batch is cut into micro-batches or processes, nor on padding; a batch-level balance (the models' own
`load_balancing_loss_func`, which TRL adds) changes with both. So this replaces TRL's: the coefficient is the
one TRL would use (`router_aux_loss_coef`, else the model config's), and TRL's own is switched off.

Router health over each logging window, on real tokens: per router the load (share of the routed token
slots each expert received), the mean routing entropy, and the experts that received none. Three scalars
per router go to the trainer's log (TensorBoard, log_history); the load vectors go to router_health.json
beside the output, and a layer that collapsed in the last window is a WARNING.
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.models.jetmoe.modeling_jetmoe import JetMoeTopKGating

from alignment.errors import SmoeError
from alignment.manifest import write_json_atomically

HEALTH_FILE = "router_health.json"


@dataclass
class MoEArgs:
    # load balancing over every softmax router; None: TRL's router_aux_loss_coef, else the model config's (as TRL does)
    moe_aux_loss_coef: float | None = None
    moe_z_loss_coef: float = 0.0  # router z-loss over every softmax router (ST-MoE suggests 0.001)


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
    """model.layers.3.self_attention.experts.router -> L3.attn; model.layers.3.mlp.gate -> L3.mlp"""
    parts = module_name.split(".")
    return f"L{parts[parts.index('layers') + 1]}." + ("attn" if "self_attention" in parts else "mlp")


def routing_stats(logits: torch.Tensor, chosen: torch.Tensor, kind: str) -> torch.Tensor:
    """logits [tokens, E], chosen [tokens, k] (real tokens only) -> [E + 2]: routed slots per expert,
    the sum of the routing entropies, the number of tokens. The routing distribution is softmax(logits), or
    for sigmoid routers their scores normalised to sum to one."""
    logits = logits.detach().float()
    probs = logits.softmax(-1) if kind != "bias" else (lambda s: s / s.sum(-1, keepdim=True))(logits.sigmoid())
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    slots = torch.bincount(chosen.reshape(-1), minlength=logits.shape[-1]).to(probs)
    return torch.cat([slots, entropy[None], torch.tensor([float(logits.shape[0])], device=probs.device)])


def window_health(stats: torch.Tensor, top_k: int) -> dict:
    """Router health of one window from the summed `routing_stats`."""
    slots, entropy, tokens = stats[:-2], stats[-2].item(), stats[-1].item()
    load = (slots / slots.sum().clamp_min(1)).tolist()
    return {"load": [round(x, 5) for x in load], "entropy": entropy / max(tokens, 1), "dead": int((slots == 0).sum()), "tokens": int(tokens), "top_k": top_k}


def collapsed(health: dict) -> str | None:
    """Why a router's window counts as collapsed, or None: an expert that received no tokens, or one chosen
    by over half of the tokens where balance would give it under a quarter (so top-2 of 4 is not flagged)."""
    load, k = health["load"], health["top_k"]
    if health["dead"]:
        return f"{health['dead']} of {len(load)} experts received no tokens"
    share = max(load) * k  # share of the tokens that chose the busiest expert
    if share > 0.5 and share > 2 * k / len(load):
        return f"expert {load.index(max(load))} took {share:.0%} of the tokens"
    return None


@dataclass
class Router:
    name: str
    module: torch.nn.Module
    index: int  # where its output holds the logits
    kind: str  # softmax | bias | unknown
    top_k: int


def routing_kind(module: torch.nn.Module, index: int, hidden_size: int) -> str:
    """softmax, bias or unknown, from what the router does with a probe input (see the module docstring)."""
    if isinstance(module, JetMoeTopKGating):
        return "softmax"  # top-k of the logits, softmax over them; its output is not (logits, weights, indices)
    if hasattr(module, "e_score_correction_bias"):
        return "bias"
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 holds a shard: gather the router's weights for the probe
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return routing_kind_of_full(module, index, hidden_size)
    return routing_kind_of_full(module, index, hidden_size)


def routing_kind_of_full(module: torch.nn.Module, index: int, hidden_size: int) -> str:
    weight = next((p for p in module.parameters() if p.dim() == 2), None)
    if weight is None:
        return "unknown"
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(16, hidden_size, generator=generator).to(weight)
    with torch.no_grad():
        out = module(probe)
        scale = 3.0 / out[index].float().std().clamp_min(1e-6)  # logits spread enough to tell exp from sigmoid
        out = module(probe * scale.to(weight.dtype))
    if not (isinstance(out, tuple) and len(out) == 3 and out[2].dtype in (torch.int64, torch.int32) and out[2].dim() == 2):
        return "unknown"
    logits, weights, chosen = out[index].float(), out[1].float(), out[2].long()
    top = logits.topk(chosen.shape[1], dim=-1).indices
    if not torch.equal(top.sort(-1).values, chosen.sort(-1).values):
        return "unknown"
    if chosen.shape[1] > 1:  # weights proportional to exp(logit) among the chosen experts
        spread = weights.clamp_min(1e-30).log() - logits.gather(1, chosen)
        if (spread.max(-1).values - spread.min(-1).values).max() > 1e-2:
            return "unknown"
    return "softmax"


def find_routers(model: torch.nn.Module) -> list[Router]:
    """Every router of the model, with how it routes (see the module docstring)."""
    recorder = next((getattr(m, "_can_record_outputs", None) or {} for m in model.modules() if "router_logits" in (getattr(m, "_can_record_outputs", None) or {})), {}).get("router_logits")
    if recorder is None:
        return []
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    hidden = config.get_text_config().hidden_size
    is_router = (lambda m: isinstance(m, recorder.target_class)) if recorder.target_class else (lambda m: type(m).__name__.endswith(recorder.class_name))
    found = []
    for name, module in model.named_modules():
        if is_router(module) and "original_module" not in name.split("."):  # PEFT keeps a frozen copy of a trained router
            found.append(Router(short_name(name), module, recorder.index, routing_kind(module, recorder.index, hidden), getattr(module, "top_k", 0)))
    return found


def recomputing() -> bool:
    """True while activation checkpointing recomputes a layer's forward: inside the backward pass, where
    the autograd engine runs a graph task. That pass routes the same tokens again; a router output kept
    from it would keep alive every tensor the recomputed attention block saved (norms, queries, keys,
    values, attention output) until the end of backward, one layer more at each layer, since nothing
    there needs them."""
    return torch._C._current_graph_task_id() != -1


class RouterLosses:
    """Collects the routing of grad-enabled forward passes of one model: losses on demand, health always."""

    def __init__(self, model: torch.nn.Module, aux_coef: float, z_coef: float):
        self.aux_coef, self.z_coef, self.records, self.sequences = aux_coef, z_coef, [], None
        self.routers = find_routers(model)
        self.handles = [r.module.register_forward_hook(self._hook(r)) for r in self.routers]
        decoders = [m for m in model.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList) and hasattr(m, "embed_tokens")]
        self.batch_handles = [m.register_forward_pre_hook(self._see_batch, with_kwargs=True) for m in decoders[:1]]
        self.window, self.windows = {}, []  # health: router name -> summed routing_stats; closed windows

    @property
    def wants_loss(self) -> bool:
        return bool(self.aux_coef or self.z_coef)

    def _see_batch(self, module, args, kwargs):
        if torch.is_grad_enabled():
            ids = kwargs.get("input_ids", args[0] if args else None)
            shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
            self.sequences = sequence_membership(kwargs.get("attention_mask"), kwargs.get("position_ids"), shape)

    def _hook(self, router: Router):
        def hook(module, args, output):
            if not torch.is_grad_enabled():  # not the reference model's pass, nor generation
                return
            if recomputing():  # kept, these logits would hold the recomputed layer's graph to the end of backward
                return
            logits = output[router.index]
            top_k = router.top_k or output[2].shape[-1]
            with torch.no_grad():  # saves nothing for backward: the recomputation, which skips this, must save as many tensors
                chosen = output[2] if router.kind == "bias" else logits.topk(top_k, dim=-1).indices
                real = self.sequences.any(0) if self.sequences is not None else slice(None)
                stats = routing_stats(logits[real], chosen[real], router.kind)
            keep = logits if self.wants_loss and router.kind == "softmax" else None
            self.records.append((router.name, keep, top_k, self.sequences, stats))

        return hook

    def pop(self) -> tuple[torch.Tensor, dict]:
        """The weighted loss over the routers recorded since the last call, and its metrics to log; the
        routing of those passes joins the health window."""
        records, self.records = self.records, []
        for name, _, top_k, _, stats in records:
            self.window[name] = self.window.get(name, 0) + stats
        losses = [(load_balancing_loss(logits, top_k, seq), z_loss(logits, seq)) for _, logits, top_k, seq, _ in records if logits is not None]
        if not losses:
            return torch.tensor(0.0), {}
        aux, z = (torch.stack(parts).mean() for parts in zip(*losses))
        return self.aux_coef * aux + self.z_coef * z, {"router/aux_loss": aux.item(), "router/z_loss": z.item()}

    def close_window(self, step: int, reduce=None) -> dict:
        """Scalars to log for the routing seen since the last window (per router: max_load, 1.0 = balanced,
        E / k = every token to one expert; entropy; dead experts), and the window kept with its load vectors."""
        if not self.window:
            return {}
        top_k = {r.name: r.top_k for r in self.routers}
        routers = {}
        for name, stats in sorted(self.window.items(), key=lambda kv: _layer_order(kv[0])):
            routers[name] = window_health(reduce(stats) if reduce else stats, top_k.get(name) or 1)
        self.window = {}
        self.windows = [w for w in self.windows if w["step"] < step] + [{"step": step, "routers": routers}]
        scalars = {}
        for name, health in routers.items():
            scalars[f"router/{name}/max_load"] = max(health["load"]) * len(health["load"])
            scalars[f"router/{name}/entropy"] = health["entropy"]
            scalars[f"router/{name}/dead"] = health["dead"]
        return scalars

    def report(self) -> dict:
        """What router_health.json holds: every window, how each router routes, and the collapsed routers of the last window."""
        last = self.windows[-1]["routers"] if self.windows else {}
        collapse = {name: why for name, health in last.items() if (why := collapsed(health))}
        return {"kinds": {r.name: r.kind for r in self.routers}, "windows": self.windows, "collapsed": collapse}

    def remove(self):
        for handle in self.handles + self.batch_handles:
            handle.remove()


def _layer_order(name: str):
    layer, _, part = name[1:].partition(".")
    return int(layer), part


class RouterLossMixin:
    """Put before a TRL trainer class: adds the router losses to `compute_loss` and logs them and the router health."""

    router_losses: RouterLosses | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.router_losses is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.router_losses.records.clear()  # drop what a grad-enabled pass outside compute_loss recorded
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        extra, metrics = self.router_losses.pop()
        if not self.router_losses.wants_loss:
            return out
        if model.training and self._loss_already_scaled_for_accumulation(num_items_in_batch):
            extra = extra / self.current_gradient_accumulation_steps  # the trainer divides only unscaled losses
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if return_outputs:
            return out[0] + extra.to(out[0].device), out[1]
        return out + extra.to(out.device)

    def log(self, logs: dict, *args, **kwargs):
        if self.router_losses is not None and self.router_losses.window:
            reduce = (lambda t: self.accelerator.reduce(t, reduction="sum")) if self.accelerator.num_processes > 1 else None
            logs.update(self.router_losses.close_window(self.state.global_step, reduce))
            if self.is_world_process_zero():
                write_health(self.router_losses, self.args.output_dir)
        return super().log(logs, *args, **kwargs)

    def _loss_already_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Trainer.training_step's own rule for whether it will divide the loss by the accumulation steps."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None


def write_health(losses: RouterLosses, output_dir: str):
    path = Path(output_dir) / HEALTH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, losses.report())  # read back when a killed run resumes


class RouterHealthWarning(TrainerCallback):
    """At the end of training: a WARNING for each router that collapsed in the last logging window."""

    def __init__(self, losses: RouterLosses, stage: str):
        self.losses, self.stage = losses, stage

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        for name, why in self.losses.report()["collapsed"].items():
            print(f"WARNING: router {name} collapsed after {self.stage} (last logging window to step {self.losses.windows[-1]['step']}): {why}; see {Path(args.output_dir) / HEALTH_FILE}", file=sys.stderr)


def balancing_coef(trainer, moe: MoEArgs) -> float:
    """The load-balancing coefficient, TRL's way (its `router_aux_loss_coef`, else the model config's), with
    `moe_aux_loss_coef` above both; TRL's own batch-level loss is switched off so it is not added twice."""
    trl_coef = trainer.router_aux_loss_coef if getattr(trainer, "aux_loss_enabled", False) else 0.0
    asked = trainer.args.router_aux_loss_coef
    if moe.moe_aux_loss_coef is not None and asked is not None and not math.isclose(moe.moe_aux_loss_coef, asked):
        raise SmoeError(f"moe_aux_loss_coef {moe.moe_aux_loss_coef} and router_aux_loss_coef {asked} disagree", "recipe keys moe_aux_loss_coef, router_aux_loss_coef", "set one of them")
    trainer.aux_loss_enabled = False
    text_config = trainer.model.config.get_text_config()
    if hasattr(text_config, "output_router_logits"):
        text_config.output_router_logits = False  # else TRL's fused forward adds the model's own loss again
    return moe.moe_aux_loss_coef if moe.moe_aux_loss_coef is not None else trl_coef


def attach_router_losses(trainer, moe: MoEArgs, stage: str = "training"):
    """Give the trainer (a RouterLossMixin) its router losses and router health, for any MoE model."""
    from alignment.train_common import last_complete_checkpoint

    aux = balancing_coef(trainer, moe)
    asked = bool(aux or moe.moe_z_loss_coef)
    keys = "recipe keys moe_aux_loss_coef / router_aux_loss_coef / moe_z_loss_coef"
    args = trainer.args
    if asked and getattr(args, "gradient_checkpointing", False) and (getattr(args, "gradient_checkpointing_kwargs", None) or {}).get("use_reentrant", False):
        # reentrant checkpointing runs the forward without gradients: the hooks would see no router
        raise SmoeError("router losses with reentrant activation checkpointing would be silently zero", "recipe key gradient_checkpointing_kwargs", "set gradient_checkpointing_kwargs: {use_reentrant: false}, or the router loss coefficients to 0")
    losses = RouterLosses(trainer.model, aux, moe.moe_z_loss_coef)
    model_name = type(trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model).__name__
    if not losses.routers:
        losses.remove()
        if asked:
            raise SmoeError(f"router losses are asked (load balancing {aux}, z-loss {moe.moe_z_loss_coef}) but {model_name} declares no router", keys, "set them to 0 for this model")
        return
    unknown = sorted({type(r.module).__name__ for r in losses.routers if r.kind == "unknown"})
    if unknown and asked:
        raise SmoeError(
            f"router losses are asked but {', '.join(unknown)} of {model_name} routes neither by softmax over its logits nor by sigmoid scores with e_score_correction_bias",
            keys,
            "set router_aux_loss_coef: 0 and moe_z_loss_coef: 0 to train it without router losses, or open an issue naming the router",
        )
    biased = [r.name for r in losses.routers if r.kind == "bias"]
    if biased and asked:
        print(f"note: {len(biased)} routers of {model_name} are balanced by their e_score_correction_bias (sigmoid scores, no auxiliary loss): no load-balancing loss and no z-loss for them", file=sys.stderr)
    if aux and len(biased) < len(losses.routers):
        print(f"note: load balancing at {aux} per sequence over real tokens for {len(losses.routers) - len(biased)} routers of {model_name} (TRL's own batch-level loss is off)", file=sys.stderr)
    health = Path(args.output_dir) / HEALTH_FILE
    if health.is_file() and last_complete_checkpoint(args.output_dir):  # resuming: the windows written before
        losses.windows = json.loads(health.read_text()).get("windows", [])
    trainer.router_losses = losses
    trainer.add_callback(RouterHealthWarning(losses, stage))
