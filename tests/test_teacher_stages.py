"""Teacher stages at production scale: prompt hygiene, multi-turn, LLM judges, killing a real run,
and `transformers serve` on loopback as a real OpenAI-compatible teacher."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.manifest import is_complete, read_manifest
from teacher_data.judge import TeacherJudge, parse_rating, parse_verdict
from teacher_data.prompts import PromptSource, load_prompts
from teacher_data.teachers import Completion, OpenAITeacher
from tests.fault_server import FaultServer

FIXTURES = Path(__file__).parent / "fixtures"
MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "mt_bench" / "question.jsonl"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_column_map_dedup_and_decontamination(tmp_path):
    rows = [
        {"id": "a", "instruction": "Explain how tides work."},
        {"id": "b", "instruction": "explain how TIDES work!"},  # the same after normalisation
        {"id": "c", "instruction": "Please write a short poem about the sea at night and the lights of the harbour, thanks."},
        {"id": "d", "instruction": "What is the sum of the first ten odd numbers?"},
        {"id": "e", "instruction": "Name three rivers in France."},
    ]
    source = PromptSource(prompts=write_jsonl(tmp_path / "p.jsonl", rows), column_map={"id": "prompt_id", "instruction": "prompt"}, decontaminate_against=[str(FIXTURES / "questions.jsonl")])
    kept, report = load_prompts(source)
    assert [p["prompt_id"] for p in kept] == ["a", "e"]
    assert report == {"duplicates": ["b"], "contaminated": ["c", "d"]}


@pytest.mark.skipif(not MT_BENCH.is_file(), reason="the shared MT-Bench files are not beside this checkout")
def test_decontamination_reads_the_public_mt_bench_file(tmp_path):
    question = json.loads(MT_BENCH.read_text().splitlines()[0])["turns"][0]
    rows = [{"prompt_id": "leak", "prompt": f"Hi! {question}"}, {"prompt_id": "fine", "prompt": "Name three rivers in France."}]
    kept, report = load_prompts(PromptSource(prompts=write_jsonl(tmp_path / "p.jsonl", rows), decontaminate_against=[str(MT_BENCH)]))
    assert [p["prompt_id"] for p in kept] == ["fine"] and report["contaminated"] == ["leak"]


def test_verdict_parsers_never_guess():
    assert parse_rating("Solid answer. Rating: [[8]]") == 8.0
    assert parse_rating("Rating: [[11]]") is None and parse_rating("I'd say 7") is None and parse_rating(None) is None
    assert parse_verdict("A is wordy; [[B]]") == "B" and parse_verdict("both fine") is None


class ScriptedJudge:
    """A judge backend whose verdict depends on which answer is shown first."""

    name = "scripted"

    def __init__(self, verdicts):
        self.verdicts = verdicts

    def complete(self, conversations, sampling):
        out = []
        for (message,) in conversations:
            first = message["content"].split("[Reply A]\n")[1].split("\n")[0]
            out.append([Completion(self.verdicts(first), "stop")])
        return out


def test_pairwise_judges_both_orders_and_calls_disagreement_a_tie():
    conversation = [{"role": "user", "content": "q"}]
    consistent = TeacherJudge(ScriptedJudge(lambda first: "[[A]]" if first == "good" else "[[B]]"))
    assert consistent.compare([(conversation, "good", "bad")])[0][0] == "A"
    assert consistent.compare([(conversation, "bad", "good")])[0][0] == "B"
    position_biased = TeacherJudge(ScriptedJudge(lambda first: "[[A]]"))
    assert position_biased.compare([(conversation, "good", "bad")])[0][0] == "C"
    unparseable = TeacherJudge(ScriptedJudge(lambda first: "hmm"))
    assert unparseable.compare([(conversation, "good", "bad")])[0][0] is None


@pytest.fixture
def fault_server():
    server = FaultServer()
    yield server
    server.close()


def test_multi_turn_with_a_user_simulator(fault_server, tmp_path):
    spec = {"backend": "openai", "model": "m", "base_url": fault_server.base_url, "backoff": 0.01}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "1", "prompt": "ok tell me about tides"}])
    out = tmp_path / "out"
    args = ["--prompts", prompts, "--output_dir", out, "--teacher", json.dumps(spec), "--user_simulator", json.dumps(spec), "--max_turns", "3", "--system_prompt", "Be brief."]
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", *map(str, args)]) == 0
    (row,) = [json.loads(line) for line in open(out / "train.jsonl")]
    assert [m["role"] for m in row["messages"]] == ["system"] + ["user", "assistant"] * 3
    assert row["messages"][1]["content"] == "ok tell me about tides" and row["messages"][2]["content"] == "echo: ok tell me about tides"


def test_killed_run_resumes_to_the_same_dataset(fault_server, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": f"p{i}", "prompt": f"slow {i}"} for i in range(80)])
    spec = json.dumps({"backend": "openai", "model": "m", "base_url": fault_server.base_url, "concurrency": 2})
    command = [sys.executable, "-m", "alignment.cli", "teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts", prompts, "--teacher", spec, "--shard_size", "8"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(command + ["--output_dir", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list((killed / "shards").glob("shard-*.jsonl"))) < 3 and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not is_complete(killed)
    assert subprocess.run(command + ["--output_dir", str(killed)], capture_output=True).returncode == 0
    assert subprocess.run(command + ["--output_dir", str(tmp_path / "whole")], capture_output=True).returncode == 0
    resumed = [json.loads(line) for line in open(killed / "train.jsonl")]
    whole = [json.loads(line) for line in open(tmp_path / "whole" / "train.jsonl")]
    assert len(resumed) == 80 and len({r["prompt_id"] for r in resumed}) == 80
    assert sorted(map(json.dumps, resumed)) == sorted(map(json.dumps, whole))


def test_both_teacher_stages_through_transformers_serve(served, tmp_path):
    url, model = served
    spec = {"backend": "openai", "model": model, "base_url": url, "concurrency": 4, "max_retries": 1, "backoff": 0.1}
    sft = tmp_path / "sft"
    assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "3", "--output_dir", str(sft), "--teacher", json.dumps(spec), "--max_new_tokens", "12"]) == 0
    counts = read_manifest(sft)["counts"]
    assert counts["prompts"] == 12 and counts["rows"] + counts["truncated"] + counts["empty"] == 12
    assert read_manifest(sft)["usage"]["teacher"]["completion_tokens"] > 0

    policies = [{**spec, "name": "served", "num_samples": 2, "temperature": 1.0, "max_new_tokens": 12}, {"name": "teacher", "backend": "skills", "error_rate": 0.5, "num_samples": 2}]
    prefs = tmp_path / "prefs"
    assert main(["teacher-prefs", "--config", "recipes/tiny/teacher_prefs.yaml", "--prompts_per_skill", "3", "--output_dir", str(prefs), "--policies", json.dumps(policies)]) == 0
    rows = [json.loads(line) for line in open(prefs / "train.jsonl")]
    assert rows and all({c["policy"] for c in r["completions"]} == {"served", "teacher"} for r in rows)

    judge = TeacherJudge(OpenAITeacher(model, base_url=url, max_retries=0), max_new_tokens=8)
    verdicts = judge.score([([{"role": "user", "content": "reverse abc"}], "Answer: cba")])
    assert verdicts[0].score is None and isinstance(verdicts[0].judgment, str)  # an untrained judge: unparsed, counted, not guessed
