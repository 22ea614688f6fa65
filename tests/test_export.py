"""export: a QLoRA stage output as one standalone model directory that stock transformers and
`transformers serve` load; chat: a terminal conversation over piped stdin."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from alignment.cli import main
from alignment.models.jetmoe import load_causal_lm
from teacher_data.serve import start_transformers_serve
from teacher_data.teachers import OpenAITeacher, Sampling

IDS = [[12, 40, 77, 90, 101, 33, 5, 250], [60, 61, 62, 63, 64, 65, 66, 67]]

# stock transformers only: no smoe-align import, so nothing of ours (fast experts, LoRA layers) is in play
STOCK_LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
assert AutoTokenizer.from_pretrained(sys.argv[1]).chat_template
with torch.no_grad():
    torch.save(model(torch.tensor(%s)).logits, sys.argv[2])
""" % IDS


@pytest.fixture(scope="module")
def qlora_sft(micro_model, tmp_path_factory):
    """A real stage output: a QLoRA sft adapter (4-bit experts in training) on the micro model."""
    root = tmp_path_factory.mktemp("export")
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "4", "--output_dir", str(root / "data")]) == 0
    fast = ["--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--load_in_4bit", "true"]
    assert main(["sft", "--config", "recipes/tiny/sft_lora.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(root / "data"), "--output_dir", str(root / "sft"), *fast]) == 0
    return root / "sft"


def test_export_equals_the_stage_output_and_stock_transformers_serves_it(qlora_sft, micro_model, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--model_name_or_path", str(qlora_sft), "--output_dir", str(out), "--dtype", "float32"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") or (out / "chat_template.jinja").is_file()

    with torch.no_grad():
        ours = load_causal_lm(str(qlora_sft), "float32").eval()(torch.tensor(IDS)).logits
        base = load_causal_lm(micro_model, "float32").eval()(torch.tensor(IDS)).logits
    subprocess.run([sys.executable, "-c", STOCK_LOGITS, str(out), str(tmp_path / "logits.pt")], check=True)
    stock = torch.load(tmp_path / "logits.pt")
    assert (stock - ours).abs().max() < 1e-5
    assert (stock - base).abs().max() > 1e-3  # the adapter is in: not the base model again

    server, url = start_transformers_serve(str(out))
    try:
        (answer,) = OpenAITeacher(str(out), base_url=url, max_retries=0).complete([[{"role": "user", "content": "reverse abc"}]], Sampling(max_new_tokens=4))[0]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert answer.text is not None and answer.finish_reason in ("stop", "length")


def test_export_in_bfloat16_and_chat_over_piped_stdin(micro_model, tmp_path):
    out = tmp_path / "bf16"
    assert main(["export", "--model_name_or_path", micro_model, "--output_dir", str(out)]) == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    talk = subprocess.run([sys.executable, "-m", "alignment.cli", "chat", "--model", str(out), "--max_new_tokens", "3"],
                          input="reverse abc\n/reset\nsort 321\n/exit\nnever read\n", capture_output=True, text=True, check=True)
    assert talk.stdout.count("assistant> ") == 2, talk.stdout


def test_export_refuses_a_missing_model_and_bad_dtype(tmp_path, capsys):
    assert main(["export", "--model_name_or_path", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "x")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["export", "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "x"), "--dtype", "int3"]) == 2
    assert "choose float32, bfloat16 or float16" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path)]) == 2  # a directory with no model in it
    assert re.search("cannot load (a model and tokenizer|the tokenizer|the model)", capsys.readouterr().err)
