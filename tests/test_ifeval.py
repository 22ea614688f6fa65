"""IFEval through lm-evaluation-harness, offline: a local copy of the prompts in IFEval's format."""

import json
from pathlib import Path

import pytest

from alignment.cli import main
from tests.fault_server import FaultServer

pytest.importorskip("lm_eval")
PROMPTS = Path(__file__).parent / "fixtures" / "ifeval_input_data.jsonl"  # our own four prompts, five instructions


def scripted(model, messages):
    """Follows every instruction but the lowercase one."""
    text = messages[-1]["content"]
    if "commas" in text:
        return "rain taps the glass\nand the street shines"
    if "lowercase" in text:
        return "The Cat sleeps by the fire."
    if "<<my title>>" in text:
        return "<<Green Days>>\nbuds open\nbirds sing\nthe light comes back\nand stays"
    return "the sun climbs over the quiet hills"


def run_ifeval(tmp_path, models, prompts=PROMPTS):
    args = ["--benchmark", "ifeval", "--question_file", str(prompts), "--models", json.dumps(models), "--max_new_tokens", "4", "--output_dir", str(tmp_path / "ifeval")]
    return main(["eval", "--config", "recipes/tiny/eval.yaml", *args])


def test_ifeval_scores_an_endpoint_and_a_model_directory(tmp_path, micro_model):
    server = FaultServer(reply=scripted)
    try:
        assert run_ifeval(tmp_path, [{"name": "scripted", "backend": "openai", "model": "scripted", "base_url": server.base_url}, {"name": "micro", "path": micro_model}]) == 0
    finally:
        server.close()
    summary = json.loads((tmp_path / "ifeval" / "summary.json").read_text())
    scripted_result = summary["ifeval"]["scripted"]
    assert scripted_result["prompt_level_strict_acc"] == 0.75 and scripted_result["inst_level_strict_acc"] == 0.8
    assert set(summary["ifeval"]["micro"]) == {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"}
    samples = [json.loads(line) for line in open(tmp_path / "ifeval" / "results" / "scripted.samples.jsonl")]
    assert [s["prompt_level_strict_acc"] for s in samples] == [True, False, True, True]
    assert "| scripted | **75.0** | 80.0 |" in (tmp_path / "ifeval" / "report.md").read_text()


def test_instructions_needing_missing_nltk_data_stop_the_stage(tmp_path, monkeypatch, capsys):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # no punkt_tab anywhere
    prompts = tmp_path / "input_data.jsonl"
    prompts.write_text(json.dumps({"key": 9, "prompt": "Answer in exactly 3 sentences.", "instruction_id_list": ["length_constraints:number_sentences"], "kwargs": [{"relation": "less than", "num_sentences": 3}]}) + "\n")
    assert run_ifeval(tmp_path, [{"name": "x", "backend": "openai", "model": "x", "base_url": "http://127.0.0.1:9"}], prompts) == 2
    assert "need nltk's punkt_tab data" in capsys.readouterr().err
