"""The openai backend against a loopback server that answers 429, 500, garbage, hangs or refuses."""

import json

import pytest

from alignment.cli import main
from alignment.manifest import read_manifest
from teacher_data.teachers import OpenAITeacher, Sampling
from tests.fault_server import FaultServer


@pytest.fixture
def server():
    server = FaultServer(hang_seconds=3.0)
    yield server
    server.close()


def teacher(server, **kw):
    return OpenAITeacher("tiny", base_url=server.base_url, api_key_env="SMOE_TEST_KEY", timeout=1.0, backoff=0.01, **kw)


def test_retries_transient_errors_and_records_permanent_ones(server):
    t = teacher(server, max_retries=2)
    prompts = ["ok a", "flaky-429 b", "flaky-500 c", "garbage d", "hang e", "refuse f"]
    out = t.complete([[{"role": "user", "content": p}] for p in prompts], Sampling(n=1))
    texts = [row[0].text for row in out]
    assert texts[:3] == ["echo: ok a", "echo: flaky-429 b", "echo: flaky-500 c"]
    assert texts[3:] == [None, None, None] and all(row[0].finish_reason == "error" for row in out[3:])
    assert server.attempts["flaky-429 b"] == 3 and server.attempts["garbage d"] == 3
    assert server.attempts["refuse f"] == 1  # a 400 is not retried
    assert t.usage["failures"] == 3 and t.usage["completion_tokens"] == sum(len(p) + 6 for p in prompts[:3])


def test_key_comes_from_the_named_variable_only(monkeypatch):
    from alignment.errors import SmoeError

    monkeypatch.delenv("SMOE_MISSING_KEY", raising=False)
    with pytest.raises(SmoeError, match="SMOE_MISSING_KEY is not set"):
        OpenAITeacher("gpt", api_key_env="SMOE_MISSING_KEY")


def test_teacher_sft_completes_and_counts_failures(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOE_TEST_KEY", "sk-secret-value")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"{kind} {i}"}]} for i, kind in enumerate(["ok", "flaky-500", "garbage", "ok"])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"backend": "openai", "model": "tiny", "base_url": server.base_url, "api_key_env": "SMOE_TEST_KEY", "timeout": 1.0, "backoff": 0.01, "max_retries": 2}
    out = tmp_path / "out"
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts", str(prompts), "--output_dir", str(out), "--teacher", json.dumps(spec)]) == 0
    manifest = read_manifest(out)
    assert manifest["counts"] == {"prompts": 4, "failed": 1, "truncated": 0, "empty": 0, "rows": 3, "duplicates_dropped": 0, "contaminated_dropped": 0}
    assert manifest["usage"]["teacher"]["failures"] == 1 and manifest["usage"]["teacher"]["retries"] >= 4
    written = "".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert "sk-secret-value" not in written


def test_vllm_backend(micro_model):
    from importlib.util import find_spec

    from alignment.errors import SmoeError
    from teacher_data.teachers import make_teacher

    if find_spec("vllm") is None:
        with pytest.raises(SmoeError, match="vllm is not installed"):
            make_teacher({"backend": "vllm", "model": micro_model}, "teacher")
        pytest.skip("vllm is not installed: only its clear error was checked")
    out = make_teacher({"backend": "vllm", "model": micro_model}, "teacher").complete([[{"role": "user", "content": "sort 321"}]], Sampling(n=2, max_new_tokens=4))
    assert len(out[0]) == 2 and all(isinstance(c.text, str) for c in out[0])
