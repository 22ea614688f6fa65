"""Speed settings compute what the plain path computes: padding-free packing of sft sequences, and DPO's
reference log-probs precomputed before training with adapters."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from alignment.cli import main
from alignment.manifest import read_manifest
from alignment.models.jetmoe import load_causal_lm
from alignment.models.packing import NAME, sequence_bounds, use_packed_attention
from tests.test_fused_moe import tiny

LENGTHS = (7, 30, 3, 18)


def sequences():
    torch.manual_seed(0)
    return [torch.randint(10, 250, (n,)).tolist() for n in LENGTHS]


def label_log_probs(model, batch) -> torch.Tensor:
    """Log-probability of every label that is not -100, in order (row by row)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep]


def test_sequence_bounds_from_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert sequence_bounds(positions) == [[(0, 3), (3, 5), (5, 9)]]


@pytest.mark.parametrize("family", ["jetmoe", "mixtral"])  # Mixtral's attention is grouped-query: 4 heads, 2 key-value heads
@pytest.mark.parametrize("attention", ["sdpa", NAME])
def test_packed_sequences_see_only_themselves(micro_model, attention, family):
    """Per-token log-probs of a padding-free batch (TRL's collator) equal each sequence run alone, to 1e-5;
    the same row without position ids (one long sequence) does not."""
    model = load_causal_lm(micro_model).eval() if family == "jetmoe" else tiny(family)
    model.config._attn_implementation = "sdpa"
    alone = torch.cat([label_log_probs(model, {"input_ids": torch.tensor([s]), "labels": torch.tensor([s])}) for s in sequences()])
    if attention == NAME:
        assert use_packed_attention(model)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s} for s in sequences()])
    assert packed["input_ids"].shape == (1, sum(LENGTHS))
    with torch.no_grad():
        assert (label_log_probs(model, packed) - alone).abs().max().item() < 1e-5
        contaminated = label_log_probs(model, {k: v for k, v in packed.items() if k != "position_ids"})
    assert (contaminated - alone).abs().max().item() > 1e-3  # the check can tell attention across sequences apart


def test_packed_attention_gradients_equal_padded(micro_model):
    """Training through `sdpa_packed`: loss and gradients of a padding-free batch equal the padded batch's."""
    grads = []
    for padding_free in (False, True):
        model = load_causal_lm(micro_model).train()
        model.config._attn_implementation = "sdpa"
        if padding_free:
            use_packed_attention(model)
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)([{"input_ids": s} for s in sequences()])
        label_log_probs(model, batch).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-5), name


FAST = ["--max_steps", "3", "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4", "--save_strategy", "no"]


def losses(out):
    return [h["loss"] for h in read_manifest(out)["log_history"] if "loss" in h]


def test_sft_padding_free_trains_like_padded_batches(micro_model, tmp_path):
    """The sft stage with `padding_free: true` switches to `sdpa_packed` and logs the padded run's losses."""
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "4", "--output_dir", str(tmp_path / "data")]) == 0
    runs = {}
    for padding_free in ("false", "true"):
        out = tmp_path / f"sft-{padding_free}"
        args = ["--model_name_or_path", micro_model, "--dataset_path", str(tmp_path / "data"), "--output_dir", str(out), "--padding_free", padding_free, "--max_length", "null"]
        assert main(["sft", "--config", "recipes/tiny/sft.yaml", *args, *FAST]) == 0
        runs[padding_free] = losses(out)
    assert len(runs["true"]) == 3
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-5)
    out = tmp_path / "sft-packed"
    args = ["--model_name_or_path", micro_model, "--dataset_path", str(tmp_path / "data"), "--output_dir", str(out), "--packing", "true"]
    assert main(["sft", "--config", "recipes/tiny/sft.yaml", *args, *FAST]) == 0
    assert len(losses(out)) == 3 and all(0 < x < 10 for x in losses(out))
    assert "sdpa_packed" not in (out / "config.json").read_text()  # the saved model loads anywhere
    AutoModelForCausalLM.from_pretrained(out)


def test_lora_dpo_with_precomputed_reference_equals_reference_pass(micro_model, tmp_path):
    """LoRA dpo: reference log-probs computed once before training (the base with the adapter off) give the
    losses and rewards of the reference pass run in every step."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join('{"prompt": "sort %d", "chosen": "Answer: %s", "rejected": "Answer: 13%d"}\n' % (i, "123" * (1 + i % 3), i) for i in range(16)))
    runs = {}
    for precompute in ("false", "true"):
        out = tmp_path / f"dpo-{precompute}"
        args = ["--model_name_or_path", micro_model, "--dataset_path", str(pairs), "--output_dir", str(out), "--precompute_ref_log_probs", precompute, "--learning_rate", "1e-2"]
        assert main(["dpo", "--config", "recipes/tiny/dpo_lora.yaml", *args, *FAST]) == 0
        runs[precompute] = [(h["loss"], h["rewards/margins"]) for h in read_manifest(out)["log_history"] if "loss" in h]
    assert len(runs["true"]) == 3
    assert abs(runs["true"][-1][1]) > 1e-3  # the policy has moved away from the reference by the last step
    for (loss_on, margin_on), (loss_pre, margin_pre) in zip(runs["false"], runs["true"]):
        assert loss_pre == pytest.approx(loss_on, abs=1e-5) and margin_pre == pytest.approx(margin_on, abs=1e-5)

