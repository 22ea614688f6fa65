"""Router losses and router health on the fused-expert families (JetMoE's are in test_moe.py): how each
router routes, read from the module; the model's own balancing at TRL's coefficient, added once, per
sequence over real tokens; none for bias-balanced routers; health logged, written, warned and drawn."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import transformers

from alignment.cli import main
from alignment.errors import SmoeError
from alignment.manifest import read_manifest
from alignment.models.router import HEALTH_FILE, MoEArgs, RouterLosses, attach_router_losses, collapsed, find_routers, routing_stats, window_health
from alignment.models.tiny import build_tokenizer
from tests.test_moe import router_gradient

TOKENIZER = build_tokenizer()
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, vocab_size=len(TOKENIZER), pad_token_id=TOKENIZER.pad_token_id)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8, decoder_sparse_step=1)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=48, num_experts=8)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=48, num_local_experts=4, layer_types=["full_attention"] * 2)),
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, moe_intermediate_size=24, intermediate_size=48, n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                                             first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)),
    "glm4_moe": ("Glm4MoeConfig", dict(moe_intermediate_size=24, intermediate_size=48, n_routed_experts=8, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=0)),
}


def tiny(family: str, seed: int = 0):
    config_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**{**SHAPE, **extra}))


def saved(model, path) -> str:
    model.save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    return str(path)


def collapse_routers(model, bias=(3.0, 2.0, 1.0, 0.0)):
    """gpt-oss routers whose logits are their bias alone: every token goes to experts 0 and 1."""
    with torch.no_grad():
        for router in find_routers(model):
            router.module.weight.zero_()
            router.module.bias.copy_(torch.tensor(bias))
    return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("routers")
    return {
        "mixtral": saved(tiny("mixtral"), root / "mixtral"),
        "deepseek_v3": saved(tiny("deepseek_v3"), root / "deepseek_v3"),
        "collapsed": saved(collapse_routers(tiny("gpt_oss")), root / "collapsed"),
    }


def chats(path, count=8):
    words = ["ab", "kqzbmwx", "hello", "z", "sortme", "qq", "abcdefghij", "xyz", "mnop", "routers"]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": f"Answer: {w[::-1]}"}]}) + "\n" for w in (words * 2)[:count]))
    return path


def pairs(path):
    path.write_text("".join(json.dumps({"prompt": f"sort {'4213' * (i % 3 + 1)}", "chosen": "Answer: 1234", "rejected": f"Answer: 12{i}3"}) + "\n" for i in range(8)))
    return path


@pytest.mark.parametrize("family, kind", [("mixtral", "softmax"), ("qwen2_moe", "softmax"), ("olmoe", "softmax"), ("gpt_oss", "softmax"), ("deepseek_v3", "bias"), ("glm4_moe", "bias")])
def test_how_a_router_routes_is_read_from_the_module(family, kind):
    routers = find_routers(tiny(family))
    assert [(r.name, r.kind, r.top_k) for r in routers] == [("L0.mlp", kind, 2), ("L1.mlp", kind, 2)]


def fake_trainer(model, tmp_path, router_aux_loss_coef=None):
    return SimpleNamespace(model=model, args=SimpleNamespace(router_aux_loss_coef=router_aux_loss_coef, output_dir=str(tmp_path)), aux_loss_enabled=False, router_aux_loss_coef=0.0, add_callback=lambda callback: None)


def test_a_router_of_unknown_kind_is_refused_by_name_only_when_a_loss_is_asked(tmp_path):
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    class SigmoidRouter(MixtralTopKRouter):  # sigmoid scores without a correction bias: neither kind
        def forward(self, hidden_states):
            logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
            weights, indices = logits.sigmoid().topk(self.top_k, dim=-1)
            return logits, weights, indices

    model = tiny("mixtral")
    for layer in model.model.layers:
        layer.mlp.gate.__class__ = SigmoidRouter
    assert {r.kind for r in find_routers(model)} == {"unknown"}
    with pytest.raises(SmoeError, match="SigmoidRouter of MixtralForCausalLM"):
        attach_router_losses(fake_trainer(model, tmp_path), MoEArgs(moe_z_loss_coef=0.001))
    trainer = fake_trainer(model, tmp_path)
    attach_router_losses(trainer, MoEArgs(moe_aux_loss_coef=0.0))  # no loss asked: health is still measured
    model(input_ids=torch.randint(3, 200, (2, 9)))
    trainer.router_losses.pop()
    assert set(trainer.router_losses.close_window(step=1)) == {f"router/L{i}.mlp/{m}" for i in (0, 1) for m in ("max_load", "entropy", "dead")}


def test_health_by_hand_on_a_fixed_routing_over_real_tokens_only():
    """gpt-oss routers whose logits are their bias [3, 2, 1, 0]: each real token picks experts 0 and 1."""
    model = collapse_routers(tiny("gpt_oss")).train()
    losses = RouterLosses(model, aux_coef=0.0, z_coef=0.0)
    ids = torch.randint(3, 200, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = mask[2, 3:] = 0  # 10 + 6 + 3 = 19 real tokens
    model(input_ids=ids, attention_mask=mask)
    losses.pop()
    scalars = losses.close_window(step=4)
    p = [math.exp(b) / sum(math.exp(c) for c in (3, 2, 1, 0)) for b in (3, 2, 1, 0)]
    entropy = -sum(x * math.log(x) for x in p)
    for name in ("L0.mlp", "L1.mlp"):
        health = losses.windows[-1]["routers"][name]
        assert health["load"] == [0.5, 0.5, 0.0, 0.0] and health["tokens"] == 19 and health["dead"] == 2
        assert health["entropy"] == pytest.approx(entropy, rel=1e-5)
        assert scalars[f"router/{name}/max_load"] == 2.0 and scalars[f"router/{name}/dead"] == 2
    assert losses.report()["collapsed"] == {"L0.mlp": "2 of 4 experts received no tokens", "L1.mlp": "2 of 4 experts received no tokens"}


def test_collapse_rule():
    slots = lambda counts: torch.tensor([*counts, 0.0, float(sum(counts)) / 2])  # noqa: E731  [slots..., entropy sum, tokens] for top-2
    assert collapsed(window_health(slots([6, 2, 2, 2, 1, 1, 1, 1]), 2)) == "expert 0 took 75% of the tokens"  # 6 of 8 tokens
    assert collapsed(window_health(slots([3, 2, 2, 2, 2, 2, 2, 1]), 2)) is None
    assert collapsed(window_health(slots([8, 4, 4, 0]), 2)) == "1 of 4 experts received no tokens"
    assert collapsed(window_health(slots([8, 3, 3, 2]), 2)) is None  # top-2 of 4: any expert may take every token in balance's half
    stats = routing_stats(torch.tensor([[2.0, 1, 0, 0]]), torch.tensor([[0, 1]]), "bias")
    sigmoid = [1 / (1 + math.exp(-x)) for x in (2, 1, 0, 0)]
    q = [s / sum(sigmoid) for s in sigmoid]
    assert stats[-2].item() == pytest.approx(-sum(x * math.log(x) for x in q), rel=1e-6)  # sigmoid routers: their normalised scores


def test_padding_does_not_change_the_loss_on_mixtral():
    model = tiny("mixtral").train()
    losses = RouterLosses(model, aux_coef=1.0, z_coef=1.0)
    ids = torch.randint(10, 250, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[2, 5:] = 0
    model(input_ids=ids, attention_mask=mask)
    plain, _ = losses.pop()
    model(input_ids=torch.cat([ids, torch.zeros(3, 40, dtype=ids.dtype)], 1), attention_mask=torch.cat([mask, torch.zeros(3, 40, dtype=mask.dtype)], 1))
    padded, _ = losses.pop()
    assert plain.item() > 1.0 and padded.item() == pytest.approx(plain.item(), abs=1e-6)


def test_checkpointed_recomputation_records_nothing_and_its_tensors_die_with_their_backward():
    """Activation checkpointing runs each layer's forward again inside backward; the router hooks must not
    keep that pass's logits, whose graph would hold the recomputed attention block of every layer until
    backward ends (an OLMoE-1B-7B QLoRA step measured 1.25 GiB over its estimate from this)."""
    import gc
    import weakref

    model = tiny("olmoe").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    losses = RouterLosses(model, aux_coef=1.0, z_coef=0.0)
    recomputed = []  # the storage of the router's input in the first layer, as the recomputation makes it
    model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda m, a, o: recomputed.append(weakref.ref(o.untyped_storage())) if torch._C._current_graph_task_id() != -1 else None)
    ids = torch.randint(10, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    loss, _ = losses.pop()
    (out.loss + loss).backward()
    gc.collect()
    assert len(recomputed) == 1 and recomputed[0]() is None  # freed by its own layer's backward
    assert losses.records == []  # the recomputation recorded no routing (old code: one record per layer)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_mixtral_router_loss_gradient_does_not_depend_on_the_batch_split(bases, tmp_path, stage):
    data = chats(tmp_path / "chats.jsonl") if stage == "sft" else pairs(tmp_path / "pairs.jsonl")
    recipe = f"recipes/tiny/{stage}.yaml"
    whole = router_gradient(bases["mixtral"], tmp_path, stage, recipe, data, (8, 1))
    split = router_gradient(bases["mixtral"], tmp_path, stage, recipe, data, (2, 4))
    assert whole.norm() > 1e-3
    assert ((split - whole).norm() / whole.norm()).item() < 1e-4


def test_bias_balanced_routers_get_no_router_loss_and_the_log_says_so_once(bases, tmp_path, capsys):
    gradient = router_gradient(bases["deepseek_v3"], tmp_path, "sft", "recipes/tiny/sft.yaml", chats(tmp_path / "chats.jsonl"), (4, 2))
    assert gradient.abs().max().item() == 0.0  # asking for both losses changed nothing
    err = capsys.readouterr().err
    assert err.count("balanced by their e_score_correction_bias") == 1  # the run with coefficient 1.0 only


def sft_args(model, data, out, *extra):
    return ["sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", model, "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--save_strategy", "no", *extra]


def test_trl_router_aux_loss_coef_is_honoured_once(bases, tmp_path, capsys):
    from safetensors.torch import load_file

    data = chats(tmp_path / "chats.jsonl")
    weights = {}
    for key in ("router_aux_loss_coef", "moe_aux_loss_coef"):
        assert main(sft_args(bases["mixtral"], data, tmp_path / key, "--report_to", "none", f"--{key}", "0.5")) == 0
        weights[key] = load_file(tmp_path / key / "model.safetensors")
        logs = [h for h in read_manifest(tmp_path / key)["log_history"] if "loss" in h]
        assert all("router/aux_loss" in h and "aux_loss" not in h for h in logs)  # ours, not TRL's batch-level one
    assert all(torch.equal(weights["router_aux_loss_coef"][k], weights["moe_aux_loss_coef"][k]) for k in weights["moe_aux_loss_coef"])
    assert main(sft_args(bases["mixtral"], data, tmp_path / "default", "--report_to", "none")) == 0
    assert "load balancing at 0.001 per sequence" in capsys.readouterr().err  # MixtralConfig's own router_aux_loss_coef, as TRL would take it
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert config["router_aux_loss_coef"] == 0.001 and config["output_router_logits"] is False


class RoundRobinRouter(torch.nn.Module):
    """A softmax router that sends flattened token i to experts i and i + 1 (mod E): balanced by construction."""

    def __init__(self, router):
        super().__init__()
        self.weight, self.top_k, self.num_experts = router.weight, router.top_k, router.num_experts

    def forward(self, hidden_states):
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
        first = torch.arange(tokens) % self.num_experts
        logits = torch.zeros(tokens, self.num_experts).scatter(1, first[:, None], 4.0).scatter(1, (first[:, None] + 1) % self.num_experts, 3.0)
        weights, indices = logits.softmax(-1).topk(self.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), indices


@pytest.mark.parametrize("base, warned", [("collapsed", True), ("balanced", False)])
def test_sft_logs_router_health_to_tensorboard_warns_on_collapse_and_the_report_draws_it(bases, tmp_path, capsys, monkeypatch, base, warned):
    from datasets import Dataset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.models.mixtral import modeling_mixtral
    from trl import SFTConfig

    from alignment.models.jetmoe import load_causal_lm, load_tokenizer
    from alignment.report import write_report
    from alignment.sft import build_trainer
    from alignment.train_common import train_and_save

    monkeypatch.setattr(modeling_mixtral.MixtralPreTrainedModel, "_can_record_outputs", {"router_logits": modeling_mixtral.OutputRecorder(RoundRobinRouter, index=0)})
    model = load_causal_lm(bases["mixtral" if base == "balanced" else base])
    if base == "balanced":
        for layer in model.model.layers:
            layer.mlp.gate = RoundRobinRouter(layer.mlp.gate)
    rows = [json.loads(line) for line in chats(tmp_path / "chats.jsonl", 16).read_text().splitlines()]
    out = tmp_path / "sft"
    args = SFTConfig(output_dir=str(out), max_steps=2, logging_steps=2, per_device_train_batch_size=8, learning_rate=1e-5, report_to=["tensorboard"], save_strategy="no", bf16=False, use_cpu=True,
                     gradient_checkpointing=False, assistant_only_loss=True, max_length=128)
    trainer = build_trainer(model, load_tokenizer(bases["mixtral"]), None, args, Dataset.from_list(rows), MoEArgs())
    train_and_save(trainer, "sft", 0.0)
    err = capsys.readouterr().err
    logs = [h for h in trainer.state.log_history if "loss" in h]
    scalars = {f"router/L{i}.mlp/{m}" for i in (0, 1) for m in ("max_load", "entropy", "dead")}
    assert len(logs) == 1 and scalars <= set(logs[0])
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")))).Reload()
    assert {f"train/{s}" for s in scalars} <= set(events.Tags()["scalars"])
    health = json.loads((out / HEALTH_FILE).read_text())
    last = health["windows"][-1]["routers"]["L0.mlp"]
    assert sum(last["load"]) == pytest.approx(1.0, abs=1e-4) and last["tokens"] > 200
    assert logs[0]["router/L0.mlp/dead"] == last["dead"] and logs[0]["router/L0.mlp/entropy"] == pytest.approx(last["entropy"])
    if warned:
        assert last["load"] == [0.5, 0.5, 0.0, 0.0] and logs[0]["router/L0.mlp/max_load"] == 2.0
        assert "WARNING: router L0.mlp collapsed after sft" in err and "WARNING: router L1.mlp collapsed after sft" in err
    else:
        assert last["dead"] == 0 and max(last["load"]) < 0.15 and "WARNING" not in err and health["collapsed"] == {}
    write_report({"dsft": ("sft", str(out))}, str(tmp_path / "report"), 0.0)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "![router health of dsft](router_dsft.png)" in report and (tmp_path / "report" / "router_dsft.png").stat().st_size > 10_000
    assert ("WARNING: dsft: router L0.mlp collapsed" in report) == warned


def test_dpo_health_counts_the_policy_pass_only_over_real_tokens(bases, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig

    from alignment.dpo import build_trainer
    from alignment.models.jetmoe import load_causal_lm, load_tokenizer

    rows = [json.loads(line) for line in pairs(tmp_path / "pairs.jsonl").read_text().splitlines()]
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=8, logging_steps=1, report_to="none", save_strategy="no", bf16=False, use_cpu=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = build_trainer(load_causal_lm(bases["mixtral"]), load_tokenizer(bases["mixtral"]), lora, args, Dataset.from_list(rows), MoEArgs(moe_aux_loss_coef=0.01))
    batch = next(iter(trainer.get_train_dataloader()))  # the 8 chosen and 8 rejected rows, padded
    trainer.train()
    health = json.loads((tmp_path / "dpo" / HEALTH_FILE).read_text())
    tokens = {name: h["tokens"] for name, h in health["windows"][-1]["routers"].items()}
    assert tokens == {"L0.mlp": int(batch["attention_mask"].sum()), "L1.mlp": int(batch["attention_mask"].sum())}  # not twice: the reference pass is not counted
    assert batch["attention_mask"].numel() > batch["attention_mask"].sum()  # there was padding to leave out


@pytest.mark.parametrize("resumed", [True, False])
def test_a_resumed_run_keeps_the_windows_written_before_it_and_replaces_the_rest(tmp_path, resumed):
    """Resuming from a checkpoint keeps the earlier windows; a fresh run in a directory an interrupted run
    left without a checkpoint starts its own."""
    (tmp_path / HEALTH_FILE).write_text(json.dumps({"windows": [{"step": 2, "routers": {}}, {"step": 4, "routers": {}}, {"step": 6, "routers": {}}]}))
    if resumed:
        (tmp_path / "checkpoint-2").mkdir()
        (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    model = tiny("mixtral").train()
    trainer = fake_trainer(model, tmp_path)
    attach_router_losses(trainer, MoEArgs())  # resumed from the checkpoint at step 2: steps 4 and 6 run again
    model(input_ids=torch.randint(3, 200, (2, 9)))
    trainer.router_losses.pop()
    trainer.router_losses.close_window(step=4)
    assert [w["step"] for w in trainer.router_losses.windows] == ([2, 4] if resumed else [4]) and trainer.router_losses.windows[-1]["routers"]["L0.mlp"]["tokens"] == 18


def test_router_losses_with_reentrant_checkpointing_are_refused(bases, tmp_path, capsys):
    """Reentrant checkpointing runs the forward without gradients, where the router hooks record nothing:
    the loss would be silently zero, so it stops; non-reentrant checkpointing trains with it."""
    data = chats(tmp_path / "chats.jsonl")
    for reentrant, code in (("true", 2), ("false", 0)):
        args = sft_args(bases["mixtral"], data, tmp_path / reentrant, "--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", f"{{use_reentrant: {reentrant}}}", "--router_aux_loss_coef", "0.01")
        assert main(args) == code
    assert "router losses with reentrant activation checkpointing" in capsys.readouterr().err
    logs = [h for h in read_manifest(tmp_path / "false")["log_history"] if "loss" in h]
    assert logs[0]["router/aux_loss"] > 0


def test_a_write_of_router_health_cut_off_leaves_the_last_whole_file(tmp_path, monkeypatch):
    """A run killed while router_health.json is written must leave a file the resumed run can read (it reads
    the earlier windows back): the new text goes to a temporary file that is renamed over the old one."""
    from pathlib import Path

    from alignment.models.router import write_health

    losses = SimpleNamespace(report=lambda: {"windows": [{"step": 10}]})
    write_health(losses, str(tmp_path))
    write_text = Path.write_text

    def killed_halfway(self, text, *a, **k):
        write_text(self, text[: len(text) // 2], *a, **k)
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    losses.report = lambda: {"windows": [{"step": 10}, {"step": 20}]}
    with pytest.raises(KeyboardInterrupt):
        write_health(losses, str(tmp_path))
    assert json.loads((tmp_path / HEALTH_FILE).read_text()) == {"windows": [{"step": 10}]}
