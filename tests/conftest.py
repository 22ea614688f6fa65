import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from datasets import Dataset, DatasetDict

from alignment.models.tiny import TinyModelArgs, init_model

MICRO = dict(hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8, intermediate_size=32)


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
