"""activation_checkpointing_policy: selective checkpointing computes the loss and gradients of the plain path
and of whole-layer checkpointing, in sft and dpo through the real trainers, on JetMoE and a fused-expert
family (bf16 weights and NF4 experts included); it keeps what it says (matmuls are not rerun in backward, the
element-wise ops are); what cannot be honoured is refused."""

import json
import pickle
from collections import Counter

import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from alignment.cli import main
from alignment.models import checkpointing
from alignment.models import onednn
from alignment.models.checkpointing import CheckpointingArgs, SelectiveCheckpointing
from alignment.models.jetmoe import load_causal_lm, load_tokenizer
from alignment.models.router import MoEArgs

SELECTIVE = ["matmul", "grouped_matmul", "attention"]


@pytest.fixture(autouse=True)
def tiny_reduction(monkeypatch):
    """The tiny models' widths (32-192) are all under the real threshold of 256: scaled down with them, so
    that their projections are kept and rank-4 LoRA B products still fall below it."""
    monkeypatch.setattr(checkpointing, "MIN_REDUCTION", 16)
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]


def sft_rows():
    return [{"messages": [{"role": "user", "content": f"spell {w}"}, {"role": "assistant", "content": " ".join(w)}]} for w in WORDS]


def dpo_rows():
    return [{"prompt": [{"role": "user", "content": f"spell {w}"}], "chosen": [{"role": "assistant", "content": " ".join(w)}], "rejected": [{"role": "assistant", "content": w[::-1]}]} for w in WORDS]


def lora_for(path):
    from peft import LoraConfig

    targets = ["kv_proj", "input_linear", "output_linear"] if "micro" in str(path) else "all-linear"
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


class KeepGradients(TrainerCallback):
    def __init__(self, trainer, seen: dict):
        self.trainer, self.seen = trainer, seen

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.seen["grads"] = {n: p.grad.clone() for n, p in self.trainer.model.named_parameters() if p.requires_grad}


def one_step(path, stage: str, policy: str, tmp_path, peft: bool = False, quantized: bool = False):
    """The loss and the gradients of one training step of the stage's trainer; policy none (no
    checkpointing), full or selective."""
    from trl import DPOConfig, ModelConfig, SFTConfig

    from alignment import dpo, sft
    from alignment.models.lora import expert_lora_config
    from alignment.train_common import DataArgs, load_student

    torch.manual_seed(0)
    common = dict(output_dir=str(tmp_path / f"{stage}-{policy}"), max_steps=1, per_device_train_batch_size=4, report_to="none", save_strategy="no", bf16=False, use_cpu=True, gradient_checkpointing=policy != "none", max_length=64, max_grad_norm=0.0)
    if quantized:
        model, tokenizer, peft_config = load_student(ModelConfig(model_name_or_path=str(path), dtype="float32", use_peft=True, load_in_4bit=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear"), DataArgs())
    else:
        model, tokenizer = load_causal_lm(str(path), "float32"), load_tokenizer(str(path))
        peft_config = expert_lora_config(lora_for(path), model) if peft else None
    checkpointing = CheckpointingArgs("selective" if policy == "selective" else "full")
    if stage == "sft":
        args = SFTConfig(**common, assistant_only_loss=True)
        trainer = sft.build_trainer(model, tokenizer, peft_config, args, Dataset.from_list(sft_rows()), MoEArgs(moe_aux_loss_coef=0.01), checkpointing=checkpointing)
    else:
        args = DPOConfig(**common, precompute_ref_log_probs=False)  # the reference pass in every step: TRL turns checkpointing off and on around it
        trainer = dpo.build_trainer(model, tokenizer, peft_config, args, Dataset.from_list(dpo_rows()), MoEArgs(moe_aux_loss_coef=0.01), checkpointing=checkpointing)
    seen = {}
    compute_loss = trainer.compute_loss

    def keep_loss(*args, **kwargs):
        seen["loss"] = compute_loss(*args, **kwargs)
        return seen["loss"]

    trainer.compute_loss = keep_loss
    trainer.add_callback(KeepGradients(trainer, seen))
    trainer.train()
    if policy == "selective":  # every decoder layer checkpoints through the policy, still after the step (and the DPO reference pass)
        layers = [m for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert layers and all(m._gradient_checkpointing_func.keywords["context_fn"] == SelectiveCheckpointing(SELECTIVE) for m in layers)
    loss, grads = seen["loss"].item(), seen["grads"]
    assert grads and all(g is not None for g in grads.values())
    return loss, grads


def assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-6, abs=1e-7)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-5, atol=1e-7, msg=name)


CASES = [("jetmoe", "sft", False), ("jetmoe", "dpo", True), ("mixtral-8x7b", "sft", False), ("mixtral-8x7b", "dpo", True)]


@pytest.mark.parametrize("family, stage, peft", CASES, ids=[f"{f}-{s}" + ("-lora" if p else "") for f, s, p in CASES])
def test_selective_computes_the_loss_and_gradients_of_the_plain_path(family, stage, peft, micro_model, tiny_families, tmp_path):
    path = micro_model if family == "jetmoe" else tiny_families / family
    plain, full, selective = (one_step(path, stage, policy, tmp_path, peft) for policy in ("none", "full", "selective"))
    assert_same(selective, plain)
    assert_same(selective, full)


def test_selective_with_nf4_experts_matches_whole_layer_checkpointing(tiny_families, tmp_path):
    """QLoRA on fused experts: the NF4 grouped matmul is an autograd Function; the policy sees its matmul."""
    path = tiny_families / "mixtral-8x7b"
    full, selective = (one_step(path, "sft", policy, tmp_path, quantized=True) for policy in ("full", "selective"))
    assert_same(selective, full)


ONEDNN = ("_linear_pointwise", "expert_linear")
# the fp32 products of a model on this CPU: dense and expert (grouped) ones
DENSE, GROUPED = ONEDNN if onednn.AVAILABLE else ("mm", "_grouped_mm")


class CountMatmuls(TorchDispatchMode):
    """Per op name, the calls; for matmuls also (name, reduction) so that LoRA's rank-wide products stand apart."""

    def __init__(self):
        super().__init__()
        self.ran = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ran[name] += 1
        if name in ("mm", "_grouped_mm", *ONEDNN):
            width = args[1].shape[-2] if name in ONEDNN else args[1].shape[-1]  # oneDNN's weights are [out, in]
            self.ran[(name, args[0].shape[-1])] += 1  # by reduction
            self.ran[(name, args[0].shape[-1], width)] += 1  # by reduction and output width
        return func(*args, **(kwargs or {}))


def backward_ops(model, policy: str) -> Counter:
    """The aten ops that run during backward (a saved op's output is taken from the cache, not run)."""
    if policy != "none":
        kwargs = {"use_reentrant": False}
        if policy != "full":
            kwargs["context_fn"] = SelectiveCheckpointing(CheckpointingArgs(policy).kinds())
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    with CountMatmuls() as counted:
        loss.backward()
    return counted.ran


@pytest.mark.parametrize("family", ["jetmoe", "mixtral-8x7b"])
def test_selective_keeps_matmul_outputs_and_recomputes_the_rest(family, micro_model, tiny_families):
    path = micro_model if family == "jetmoe" else str(tiny_families / family)
    ran = {policy: backward_ops(load_causal_lm(path, "float32"), policy) for policy in ("none", "full", "selective", "attention")}
    grouped = GROUPED if family == "jetmoe" else "_grouped_mm"  # a full fused-experts model runs transformers' own grouped_mm
    matmuls = (DENSE, grouped, "_scaled_dot_product_flash_attention_for_cpu")
    layers = 2
    assert ran["full"]["_scaled_dot_product_flash_attention_for_cpu"] == layers  # whole layers: attention forward again
    for op in matmuls:  # selective: no forward matmul runs again, only those of the gradients (as without checkpointing)
        assert ran["selective"][op] == ran["none"][op] < ran["full"][op], op
    for op in ("rsqrt", "silu"):  # the element-wise forward ops are rerun, as under whole-layer checkpointing
        assert ran["none"][op] == 0 and ran["selective"][op] == ran["full"][op] > 0, op
    assert ran["attention"]["_scaled_dot_product_flash_attention_for_cpu"] == 0 and ran["attention"][DENSE] == ran["full"][DENSE]  # a list keeps those kinds only


def test_matmuls_over_a_short_reduction_are_recomputed():
    mm, keep = torch.ops.aten.mm.default, checkpointing.keep_outputs
    ops = checkpointing.ops_of(SELECTIVE)
    assert keep(ops, 16, None, mm, torch.ones(8, 32), torch.ones(32, 64)) == checkpointing.CheckpointPolicy.MUST_SAVE
    assert keep(ops, 16, None, mm, torch.ones(8, 4), torch.ones(4, 64)) == checkpointing.CheckpointPolicy.PREFER_RECOMPUTE  # a rank-4 LoRA B product
    assert keep(ops, 16, None, torch.ops.aten.addmm.default, torch.ones(64), torch.ones(8, 4), torch.ones(4, 64)) == checkpointing.CheckpointPolicy.PREFER_RECOMPUTE
    assert keep(ops, 16, None, torch.ops.aten.silu.default, torch.ones(8, 64)) == checkpointing.CheckpointPolicy.PREFER_RECOMPUTE


def test_policy_values_and_the_context_function():
    assert CheckpointingArgs().kinds() is None
    assert CheckpointingArgs("selective").kinds() == SELECTIVE
    assert CheckpointingArgs("attention").kinds() == ["attention"]  # one kind, as a --flag gives it
    assert CheckpointingArgs(["grouped_matmul", "attention"]).kinds() == ["grouped_matmul", "attention"]
    for bad in ([], ["full", "attention"]):
        with pytest.raises(ValueError, match="activation_checkpointing_policy"):
            CheckpointingArgs(bad)
    context = SelectiveCheckpointing(SELECTIVE)
    assert json.loads(json.dumps({"context_fn": context})) == {"context_fn": {"keep_outputs_of": SELECTIVE, "min_matmul_reduction": 16}}  # TrainingArguments still dump to JSON
    assert pickle.loads(pickle.dumps(context)) == context and len(context()) == 2  # and save with the checkpoint


@pytest.mark.parametrize("extra, message", [
    (["--gradient_checkpointing", "false"], "needs activation checkpointing, which is off"),
    (["--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", "{use_reentrant: true}"], "non-reentrant checkpoint only"),
    (["--activation_checkpointing_policy", "[selective, attention]"], "write full or selective alone"),
    (["--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", "{use_reentrant: false, selective: true}"], "both choose what checkpointing keeps"),
])
def test_what_cannot_be_honoured_is_refused(extra, message, micro_model, tmp_path, capsys):
    args = ["sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"), "--activation_checkpointing_policy", "selective", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and ("activation_checkpointing_policy" in err or "gradient_checkpointing_kwargs" in err)
    assert "fix:" in err


@pytest.mark.parametrize("family", ["jetmoe", "jetmoe-nf4", "mixtral-8x7b"])
def test_estimate_memory_models_what_selective_checkpointing_keeps(family, micro_model, tiny_families):
    """alignment.memory.kept_bytes against the outputs torch's selective checkpointing holds between forward
    and backward (its cache), per layer per token, on a tiny model in fp32 (the formula counts bf16)."""
    from torch.utils._pytree import tree_leaves

    from alignment.memory import kept_bytes

    model = load_causal_lm(micro_model if family.startswith("jetmoe") else str(tiny_families / family), "float32")
    if family == "jetmoe-nf4":  # NF4 banks multiply by grouped matmuls too: kept as grouped_matmul
        from alignment.models.quant import quantize_experts

        quantize_experts(model, torch.float32)
    caches = []

    def context_fn():
        caching, cached = SelectiveCheckpointing(SELECTIVE)()
        caches.append(caching.storage)
        return caching, cached

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})
    model.train()
    tokens = 64
    model(input_ids=torch.randint(3, 200, (1, tokens), generator=torch.Generator().manual_seed(0)))
    held = sum(leaf.val.nbytes for cache in caches for outputs in cache.values() for entry in outputs.values() for leaf in tree_leaves(entry) if hasattr(leaf, "val"))
    layers = model.config.num_hidden_layers
    assert len(caches) == layers
    assert held / layers == pytest.approx(2 * kept_bytes(model.config, tokens, SELECTIVE), rel=0.05)


def test_nf4_experts_under_selective_redo_the_dequantisation_not_the_product(tiny_families):
    """The NF4 expert matmul is an autograd Function: its forward's ops reach the policy, so its grouped
    product is taken from the cache in the recompute while the dequantisation (the bf16 bank, not kept) runs again."""
    from peft import get_peft_model
    from trl import ModelConfig

    from alignment.train_common import DataArgs, load_student

    ran = {}
    for policy in ("none", "full", "selective"):
        model_args = ModelConfig(model_name_or_path=str(tiny_families / "mixtral-8x7b"), dtype="float32", use_peft=True, load_in_4bit=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear")
        model, _, peft_config = load_student(model_args, DataArgs())
        model = get_peft_model(model, peft_config)
        model.enable_input_require_grads()  # as the trainer does for checkpointing with adapters: the same backward for all three
        ran[policy] = backward_ops(model, policy)
    assert ran["selective"]["dequantize_4bit"] == ran["full"]["dequantize_4bit"] > ran["none"]["dequantize_4bit"]
    redone = {key: n - ran["none"][key] for key, n in ran["selective"].items() if isinstance(key, tuple) and len(key) == 3 and n > ran["none"][key]}
    # only rank-4 LoRA products run again (the CPU's expert LoRA writes its A products with out=, which the cache cannot hold)
    assert redone and all(min(reduction, width) < 16 for _, reduction, width in redone)
    assert ran["full"][(GROUPED, 128)] > ran["selective"][(GROUPED, 128)] == ran["none"][(GROUPED, 128)]  # the NF4 gate/up products
