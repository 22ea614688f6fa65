"""MT-Bench-format evaluation: fixtures of our own, the public files by path, and a real served judge."""

import json
import re
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.errors import SmoeError
from alignment.evaluate import mt_bench as mt
from tests.fault_server import FaultServer

FIXTURES = Path(__file__).parent / "fixtures"
PUBLIC = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "mt_bench"


def scripted(model, messages):
    """Model 'good' answers well, 'bad' badly; model 'judge' rates and compares by that word."""
    text = messages[-1]["content"]
    if model == "good":
        earlier = [m["content"][:4] for m in messages if m["role"] == "assistant"]
        return f"good answer to: {text[:20]} (seen before: {earlier})"
    if model == "bad":
        return "no idea"
    if "[Assistant A]" in text or "[Assistant A's conversation]" in text:
        a = text.split("A]")[1] if "[Assistant A]" in text else text.split("A's conversation]")[1]
        return "Verdict: [[A]]" if "good answer" in a.split("[Assistant B")[0] else "Verdict: [[B]]"
    graded = text.rsplit("]\n", 1)[-1]
    return "Rating: [[9]]" if "good answer" in graded else "Rating: [[2]]"


@pytest.fixture
def server():
    server = FaultServer(reply=scripted)
    yield server
    server.close()


def run_eval(tmp_path, server, **overrides):
    models = [{"name": n, "backend": "openai", "model": n, "base_url": server.base_url} for n in ("good", "bad")]
    judge = {"backend": "openai", "model": "judge", "base_url": server.base_url}
    args = {"benchmark": "mt_bench", "question_file": str(FIXTURES / "questions.jsonl"), "models": json.dumps(models), "judge": json.dumps(judge), "baseline": "bad", "output_dir": str(tmp_path / "eval"), "length_controlled": "true", **overrides}
    argv = ["eval", "--config", "recipes/tiny/eval.yaml"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]
    assert main(argv) == 0
    return json.loads((tmp_path / "eval" / "summary.json").read_text())


def test_single_and_pairwise_grading_with_cache(tmp_path, server):
    summary = run_eval(tmp_path, server, reference_answers=FIXTURES / "reference_answer.jsonl")
    good, bad = summary["single"]["good"], summary["single"]["bad"]
    assert (good["turn_1"], good["turn_2"], good["overall"]) == (9.0, 9.0, 9.0)
    assert bad["overall"] == 2.0 and set(good["per_category"]) == {"writing", "math", "coding"}
    assert good["judge_failures"] == 0 and good["judged"] == 6
    pair = summary["pairwise"]["good"]
    assert (pair["win"], pair["tie"], pair["loss"], pair["win_rate"]) == (6, 0, 0, 1.0)
    assert tuple(pair["win_rate_ci95"]) == (1.0, 1.0) and "length_controlled_win_rate" in pair
    assert summary["judge_calls_this_run"] == 12 + 12  # 2 models x 6 turns single, 6 turns x 2 orders pairwise

    out = tmp_path / "eval"
    answers = [json.loads(line) for line in open(out / "model_answer" / "good.jsonl")]
    assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} <= set(answers[0]) and len(answers[0]["choices"][0]["turns"]) == 2
    rows = [json.loads(line) for line in open(out / "judgments.jsonl")]
    math_turn_1 = next(r for r in rows if r["mode"] == "single" and r["question_id"] == 2 and r["turn"] == 1)
    assert math_turn_1["judge_prompt"] == "single-math-v1"  # reference-guided where a reference exists
    coding = next(r for r in rows if r["mode"] == "single" and r["question_id"] == 3 and r["turn"] == 1)
    assert coding["judge_prompt"] == "single-v1"  # coding, but no reference answer for it
    assert "| good |" in (out / "report.md").read_text() and (out / "report.png").stat().st_size > 5000

    (out / "manifest.json").unlink()  # rerun the stage: answers and judgments come from disk and cache
    requests_before = sum(server.attempts.values())
    again = run_eval(tmp_path, server, reference_answers=FIXTURES / "reference_answer.jsonl")
    assert again["judge_calls_this_run"] == 0 and sum(server.attempts.values()) == requests_before
    assert again["single"] == json.loads(json.dumps(summary["single"]))


def test_turn_two_sees_the_first_answer(tmp_path, server):
    run_eval(tmp_path, server)
    answers = {json.loads(line)["question_id"]: json.loads(line)["choices"][0]["turns"] for line in open(tmp_path / "eval" / "model_answer" / "good.jsonl")}
    assert answers[1][0].endswith("(seen before: [])")
    assert answers[1][1].startswith("good answer to: Now make it rhyme") and answers[1][1].endswith("(seen before: ['good'])")


def bad_file(tmp_path, rows):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_input_names_file_and_row(tmp_path):
    good = {"question_id": 1, "category": "writing", "turns": ["hi"]}
    with pytest.raises(SmoeError, match=r"bad.jsonl: row 2: `turns` must be"):
        mt.load_questions(bad_file(tmp_path, [good, {"question_id": 2, "category": "writing", "turns": []}]))
    with pytest.raises(SmoeError, match=r"row 1: no category"):
        mt.load_questions(bad_file(tmp_path, [{"question_id": 1, "turns": ["hi"]}]))
    with pytest.raises(SmoeError, match=r"row 1: judge prompt 'single-v1' lacks the placeholders \['answer'\]"):
        mt.load_judge_prompts(bad_file(tmp_path, [{"name": "single-v1", "system_prompt": "", "prompt_template": "{question}"}]))
    answer = {"question_id": 99, "choices": [{"index": 0, "turns": ["x"]}]}
    with pytest.raises(SmoeError, match=r"row 1: question_id 99 is not in the question file"):
        mt.load_answer_file(bad_file(tmp_path, [answer]), {1}, require_all=False)


def test_bootstrap_and_length_control():
    assert mt.bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    low, high = mt.bootstrap_ci([1.0, 0.0] * 50, seed=0)
    assert 0.38 < low < 0.5 < high < 0.62
    # wins only where the answer is longer: at equal length the model is no better than the baseline
    outcomes, diffs = [1.0] * 50 + [0.0] * 50, [100.0] * 50 + [-100.0] * 50
    assert abs(mt.length_controlled_win_rate(outcomes, diffs) - 0.5) < 0.02


@pytest.mark.skipif(not PUBLIC.is_dir(), reason="the shared MT-Bench files are not beside this checkout")
def test_public_mt_bench_files_load_by_path_and_run(tmp_path, micro_model):
    questions = mt.load_questions(str(PUBLIC / "question.jsonl"))
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    prompts = mt.load_judge_prompts(str(PUBLIC / "judge_prompts.jsonl"))
    assert set(prompts) == set(mt.PLACEHOLDERS) and prompts["single-v1"] != mt.DEFAULT_PROMPTS["single-v1"]
    references = mt.load_answer_file(str(PUBLIC / "reference_answer" / "gpt-4.jsonl"), {q["question_id"] for q in questions}, require_all=False)
    assert len(references) == 30
    server = FaultServer(reply=lambda model, messages: "Rating: [[5]]")
    try:
        judge = json.dumps({"backend": "openai", "model": "judge", "base_url": server.base_url})
        args = ["--benchmark", "mt_bench", "--question_file", str(PUBLIC / "question.jsonl"), "--judge_prompts", str(PUBLIC / "judge_prompts.jsonl"),
                "--reference_answers", str(PUBLIC / "reference_answer" / "gpt-4.jsonl"), "--models", json.dumps([{"name": "tiny", "path": micro_model}]),
                "--judge", judge, "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval")]
        assert main(["eval", "--config", "recipes/tiny/eval.yaml", *args]) == 0
    finally:
        server.close()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["single"]["tiny"]["judged"] == 160 and summary["single"]["tiny"]["overall"] == 5.0
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "judgments.jsonl")]
    assert sum(r["judge_prompt"].startswith("single-math") for r in rows) == 60  # 30 referenced questions x 2 turns


def test_end_to_end_with_transformers_serve_as_the_judge(tmp_path, served, micro_model):
    url, model = served
    judge = json.dumps({"backend": "openai", "model": model, "base_url": url, "max_retries": 1})
    args = ["--benchmark", "mt_bench", "--question_file", str(FIXTURES / "questions.jsonl"), "--models", json.dumps([{"name": "tiny", "path": micro_model}]),
            "--judge", judge, "--judge_max_new_tokens", "6", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval")]
    assert main(["eval", "--config", "recipes/tiny/eval.yaml", *args]) == 0
    single = json.loads((tmp_path / "eval" / "summary.json").read_text())["single"]["tiny"]
    assert single["judged"] + single["judge_failures"] == 6  # an untrained judge: its failures are counted, not guessed
    assert all(re.match(r"^[0-9a-f]{64}$", json.loads(line)["key"]) for line in open(tmp_path / "eval" / "judgment_cache.jsonl"))


VICUNA = FIXTURES / "vicuna_bench_question.jsonl"  # our own 80 questions in vicuna_bench's format and categories


def test_vicuna_bench_format_runs_without_categories(tmp_path, server):
    summary = run_eval(tmp_path, server, question_file=VICUNA)
    good = summary["single"]["good"]
    assert good["judged"] == 80 and good["overall"] == 9.0
    assert set(good["per_category"]) == {"generic", "knowledge", "roleplay", "common-sense", "fermi", "counterfactual", "coding", "math", "writing"}
    assert summary["pairwise"]["good"]["win"] == 80


def test_temperature_per_category_with_fastchat_default(monkeypatch):
    seen = {}

    class Recorder:
        def complete(self, conversations, sampling):
            for c in conversations:
                seen[c[-1]["content"]] = sampling.temperature
            return [[type("A", (), {"text": "x"})()] for _ in conversations]

    monkeypatch.setattr(mt, "make_teacher", lambda spec, where: Recorder())
    questions = mt.load_questions(str(VICUNA))
    mt.answer_questions({"backend": "openai"}, questions, 4, 0)
    by_category = {q["category"]: seen[q["turns"][0]] for q in questions}
    assert by_category["math"] == 0.0 and by_category["coding"] == 0.0 and by_category["writing"] == 0.7
    assert by_category["fermi"] == by_category["generic"] == mt.DEFAULT_TEMPERATURE == 0.7


def test_categories_restrict_only_when_given(tmp_path):
    assert len(mt.load_questions(str(VICUNA), categories=None)) == 80
    with pytest.raises(SmoeError, match=r"row 1: category 'generic' is not under `categories`"):
        mt.load_questions(str(VICUNA), categories=["writing", "math"])


def test_unparsed_only_comparison_reports_no_verdicts(tmp_path):
    def reply(model, messages):
        text = messages[-1]["content"]
        if model in ("good", "bad"):
            return f"{model} answer"
        return "I cannot decide." if "[Assistant A" in text else "Rating: [[5]]"

    server = FaultServer(reply=reply)
    try:
        summary = run_eval(tmp_path, server)
    finally:
        server.close()
    pair = summary["pairwise"]["good"]
    assert pair["win_rate"] is None and pair["win_rate_ci95"] is None and pair["judge_failures"] == 6
    assert pair["length_controlled_win_rate"] is None
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "no verdicts" in report and "nan" not in report
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "model_judgment" / "judge_pair.jsonl")]
    assert {(r["g1_winner"], r["g2_winner"]) for r in rows} == {("error", "error")}


def test_fastchat_show_result_reads_our_model_judgment_files(tmp_path, server, capsys):
    """FastChat's own show_result.py (the fschat package) on the files we write."""
    show_result = pytest.importorskip("fastchat.llm_judge.show_result")
    import argparse

    import pandas as pd

    summary = run_eval(tmp_path, server, question_file=VICUNA, reference_answers=FIXTURES / "reference_answer.jsonl")
    judged = tmp_path / "eval" / "model_judgment"
    single = [json.loads(line) for line in open(judged / "judge_single.jsonl")]
    assert set(single[0]) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    assert single[0]["judge"] == ["judge", "single-v1"] and single[0]["user_prompt"].startswith("[Question]")
    pair = [json.loads(line) for line in open(judged / "judge_pair.jsonl")]
    assert set(pair[0]) == {"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt", "g1_judgment", "g2_user_prompt", "g2_judgment", "turn", "tstamp"}
    assert {(r["g1_winner"], r["g2_winner"]) for r in pair} == {("model_1", "model_1")}

    args = argparse.Namespace(input_file=str(judged / "judge_single.jsonl"), bench_name="vicuna_bench", judge_model="judge", model_list=None, baseline_model="bad")
    show_result.display_result_single(args)
    printed = capsys.readouterr().out
    assert re.search(r"good\s+1\s+9\.0", printed) and re.search(r"bad\s+1\s+2\.0", printed)
    args.input_file = str(judged / "judge_pair.jsonl")
    show_result.display_result_pairwise(args)
    printed = capsys.readouterr().out
    win_rate_adjusted = float(re.search(r"good\s+80\s+0\s+0\s+\S+\s+\S+\s+(\S+)", printed).group(1))
    assert win_rate_adjusted == summary["pairwise"]["good"]["win_rate"] == 1.0
    assert pd.read_json(judged / "judge_single.jsonl", lines=True)["score"].mean() == 5.5  # 9 for good, 2 for bad
