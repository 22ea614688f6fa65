"""JetMoE specifics: activation checkpointing, router losses, and their logging in sft and dpo."""

import json
import math

import pytest
import torch

from alignment.cli import main
from alignment.manifest import read_manifest
from alignment.models.jetmoe import load_causal_lm
from alignment.models.router import RouterLosses, load_balancing_loss, z_loss


def batch(model, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(10, 250, (4, 24))
    return {"input_ids": ids, "labels": ids}


def test_checkpointing_gives_the_same_gradients(micro_model):
    grads = []
    for checkpointing in (False, True):
        model = load_causal_lm(micro_model).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        model(**batch(model)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_load_balancing_and_z_loss_values():
    experts = 8
    balanced = torch.full((experts, experts), -5.0)
    for t in range(experts):  # token t prefers experts t and t+1: every expert chosen equally often
        balanced[t, t], balanced[t, (t + 1) % experts] = 5.0, 4.0
    assert load_balancing_loss(balanced, top_k=2).item() == pytest.approx(1.0, abs=1e-4)
    collapsed = torch.full((16, experts), -20.0)
    collapsed[:, 0] = collapsed[:, 1] = 20.0  # all tokens to experts 0 and 1, half the probability each
    assert load_balancing_loss(collapsed, top_k=2).item() == pytest.approx(experts / 2, rel=1e-4)
    assert z_loss(torch.zeros(5, experts)).item() == pytest.approx(math.log(experts) ** 2)


def test_router_losses_cover_both_routers_and_train_only_with_grad(micro_model):
    model = load_causal_lm(micro_model).train()
    losses = RouterLosses(model, aux_coef=0.01, z_coef=0.001)
    layers = model.config.num_hidden_layers
    assert len(losses.handles) == 2 * layers
    with torch.no_grad():
        model(**batch(model))
    assert losses.records == []  # reference passes and generation are not counted
    model(**batch(model))
    extra, metrics = losses.pop()
    assert {f"router/L{i}.{k}/{m}" for i in range(layers) for k in ("attn", "mlp") for m in ("entropy", "max_load", "dead")} == set(losses.close_window(step=1))
    assert extra.item() == pytest.approx(0.01 * metrics["router/aux_loss"] + 0.001 * metrics["router/z_loss"], rel=1e-5)
    extra.backward()
    routers = {n: p.grad for n, p in model.named_parameters() if "router" in n}
    assert len(routers) == 2 * layers and all(g is not None and g.abs().sum() > 0 for g in routers.values())


@pytest.mark.parametrize("flags", [["--moe_aux_loss_coef", "0.01", "--moe_z_loss_coef", "0.001"], ["--router_aux_loss_coef", "0.01"]])
def test_sft_and_dpo_log_router_losses_and_reload_cleanly(micro_model, tmp_path, flags):
    from transformers import AutoModelForCausalLM

    fast = ["--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4"]
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "4", "--output_dir", str(tmp_path / "data")]) == 0
    sft = tmp_path / "sft"
    assert main(["sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(tmp_path / "data"), "--output_dir", str(sft), *fast, *flags]) == 0
    logs = [h for h in read_manifest(sft)["log_history"] if "loss" in h]
    assert len(logs) == 2 and all("router/aux_loss" in h and "router/L0.mlp/max_load" in h for h in logs)
    config = json.loads((sft / "config.json").read_text())
    assert "router_aux_loss_coef" not in config and config["output_router_logits"] is False
    AutoModelForCausalLM.from_pretrained(sft)

    pairs = tmp_path / "pairs.jsonl"
    prompt = [{"role": "user", "content": "sort 321"}]
    pairs.write_text("".join(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "Answer: 123"}], "rejected": [{"role": "assistant", "content": f"Answer: 13{i}"}]}) + "\n" for i in range(8)))
    dpo = tmp_path / "dpo"
    assert main(["dpo", "--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", str(sft), "--dataset_path", str(pairs), "--output_dir", str(dpo), *fast, *flags]) == 0
    logs = [h for h in read_manifest(dpo)["log_history"] if "loss" in h]
    assert len(logs) == 2 and all("router/z_loss" in h and "rewards/margins" in h for h in logs)


def test_full_dpo_with_precomputed_reference_log_probs(micro_model, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join('{"prompt": "sort 321", "chosen": "Answer: 123", "rejected": "Answer: 13%d"}\n' % i for i in range(8)))
    out = tmp_path / "dpo"
    args = ["--model_name_or_path", micro_model, "--dataset_path", str(pairs), "--output_dir", str(out), "--precompute_ref_log_probs", "true"]
    assert main(["dpo", "--config", "recipes/tiny/dpo.yaml", *args, "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4"]) == 0
    logs = [h for h in read_manifest(out)["log_history"] if "loss" in h]
    assert len(logs) == 2 and logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1


def test_router_losses_ignore_padding(micro_model):
    model = load_causal_lm(micro_model).train()
    losses = RouterLosses(model, aux_coef=1.0, z_coef=1.0)
    torch.manual_seed(3)
    ids = torch.randint(10, 250, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[2, 5:] = 0  # rows of different lengths, padded on the right
    model(input_ids=ids, attention_mask=mask)
    plain, _ = losses.pop()
    padded_ids = torch.cat([ids, torch.full((3, 40), 0)], 1)
    padded_mask = torch.cat([mask, torch.zeros(3, 40, dtype=mask.dtype)], 1)
    model(input_ids=padded_ids, attention_mask=padded_mask)
    padded, _ = losses.pop()
    assert plain.item() > 1.0 and padded.item() == pytest.approx(plain.item(), abs=1e-6)


def test_sequences_come_from_the_mask_or_from_packed_position_ids():
    from alignment.models.router import sequence_membership

    padded = sequence_membership(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), None, (2, 4))
    assert padded.int().tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]]
    packed = sequence_membership(None, torch.tensor([[0, 1, 2, 0, 1, 0]]), (1, 6))
    assert packed.int().tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    torch.manual_seed(5)
    logits = torch.randn(6, 8)
    per_sequence = [load_balancing_loss(logits[s], 2) for s in (slice(0, 3), slice(3, 5), slice(5, 6))]
    assert load_balancing_loss(logits, 2, packed).item() == pytest.approx(sum(per_sequence).item() / 3, rel=1e-6)
    assert z_loss(logits, packed).item() == pytest.approx(sum(z_loss(logits[s]) for s in (slice(0, 3), slice(3, 5), slice(5, 6))).item() / 3, rel=1e-6)


def router_gradient(micro_model, tmp_path, stage, recipe, data, split):
    """Weights after one SGD step of lr 1 with router losses minus without: the router losses' gradient."""
    from safetensors.torch import load_file

    batch, accumulation = split
    after = {}
    for coef in ("0", "1.0"):
        out = tmp_path / f"{stage}_{batch}x{accumulation}_{coef}"
        args = [stage, "--config", recipe, "--model_name_or_path", micro_model, "--dataset_path", str(data), "--output_dir", str(out),
                "--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--optim", "sgd", "--learning_rate", "1.0",
                "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--weight_decay", "0", "--max_grad_norm", "0",
                "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
                "--moe_aux_loss_coef", coef, "--moe_z_loss_coef", coef]
        assert main(args) == 0
        after[coef] = load_file(out / "model.safetensors")
    return torch.cat([(after["0"][k] - after["1.0"][k]).flatten() for k in sorted(after["0"])])


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_router_loss_gradient_does_not_depend_on_the_batch_split(micro_model, tmp_path, stage):
    """4 micro-batches of 2 with accumulation equal 1 batch of 8 (with padding in each)."""
    if stage == "sft":
        data = tmp_path / "chats.jsonl"
        words = ["ab", "kqzbmwx", "hello", "z", "sortme", "qq", "abcdefghij", "xyz"]
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": f"Answer: {w[::-1]}"}]}) + "\n" for w in words))
        recipe = "recipes/tiny/sft.yaml"
    else:
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"sort {'4213' * (i % 3 + 1)}", "chosen": "Answer: 1234", "rejected": f"Answer: 12{i}3"}) + "\n" for i in range(8)))
        recipe = "recipes/tiny/dpo.yaml"
    whole = router_gradient(micro_model, tmp_path, stage, recipe, data, (8, 1))
    split = router_gradient(micro_model, tmp_path, stage, recipe, data, (2, 4))
    assert whole.norm() > 1e-3  # the router losses move the weights
    assert ((split - whole).norm() / whole.norm()).item() < 1e-4
