import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

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
