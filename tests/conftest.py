import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from datasets import Dataset, DatasetDict

from alignment.models import onednn
from alignment.models.tiny import TinyModelArgs, init_model

MICRO = dict(hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8, intermediate_size=32)


@pytest.fixture(autouse=True)
def onednn_at_micro_sizes(monkeypatch):
    """The micro models' products are all below oneDNN's size floor: tests run them through oneDNN anyway,
    so that its path is what they check (tests/test_onednn.py checks the threshold itself)."""
    monkeypatch.setattr(onednn, "MIN_FLOPS", 0)
    for switch, default in (("_enabled", True), ("_every_size", False)):  # what a stage's cpu_matmul set stays in its test
        monkeypatch.setattr(onednn, switch, default)


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory):
    """A micro JetMoE (attention and MLP experts, 8 experts top-2) with the real tokenizer."""
    return str(init_model(TinyModelArgs(output_dir=str(tmp_path_factory.mktemp("micro") / "base"), **MICRO)))


@pytest.fixture(scope="session")
def served(micro_model):
    """`transformers serve` hosting the micro model on a loopback port: (base_url, model)."""
    from teacher_data.serve import start_transformers_serve

    server, url = start_transformers_serve(micro_model)
    yield url, micro_model
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def hub_copies(tmp_path_factory):
    """Local copies in the public schemas: ultrachat_200k (train_sft) and ultrafeedback_binarized (train_prefs)."""
    root = tmp_path_factory.mktemp("hub")
    prompt = [{"role": "user", "content": "sort 3021"}]
    chat = [{"prompt_id": str(i), "prompt": "sort 3021", "messages": prompt + [{"role": "assistant", "content": "Answer: 0123"}]} for i in range(8)]
    prefs = [{"prompt_id": str(i), "prompt": "sort 3021", "chosen": prompt + [{"role": "assistant", "content": "Answer: 0123"}], "rejected": prompt + [{"role": "assistant", "content": "Answer: 0132"}], "score_chosen": 10.0, "score_rejected": 3.0} for i in range(8)]
    DatasetDict({"train_sft": Dataset.from_list(chat), "test_sft": Dataset.from_list(chat[:2])}).save_to_disk(str(root / "ultrachat_200k"))
    DatasetDict({"train_prefs": Dataset.from_list(prefs), "test_prefs": Dataset.from_list(prefs[:2])}).save_to_disk(str(root / "ultrafeedback_binarized"))
    return root


# tiny models of each family, widths that bitsandbytes' CPU kernel takes (blocks of 64)
SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts_per_tok=2, max_position_embeddings=256)
FAMILIES = {
    "mixtral-8x7b": ("MixtralConfig", dict(intermediate_size=192, num_local_experts=4)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(moe_intermediate_size=192, num_experts=4)),
    "olmoe-1b-7b": ("OlmoeConfig", dict(intermediate_size=192, num_experts=4)),
}


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory):
    """A random tiny model of each family of the real-model recipes, saved with the project tokenizer (a directory per recipe directory name)."""
    import torch
    import transformers

    from alignment.models.tiny import build_tokenizer

    root, tokenizer = tmp_path_factory.mktemp("families"), build_tokenizer()
    for family, (config_class, extra) in FAMILIES.items():
        config = getattr(transformers, config_class)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPE, **extra)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    return root


def chats_and_pairs(root, prompts_per_skill: int, pairs: int):
    """Teacher-written skills chats in root/chats and `pairs` sort preference pairs in root/pairs.jsonl."""
    import json

    from alignment.cli import main

    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", str(prompts_per_skill), "--output_dir", str(root / "chats")]) == 0
    prompt = [{"role": "user", "content": "sort 4213"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "Answer: 1234"}], "rejected": [{"role": "assistant", "content": f"Answer: 12{i % 10}3"}]} for i in range(pairs)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
