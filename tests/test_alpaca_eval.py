"""AlpacaEval 2 in alpaca_eval's file formats, and one length-controlled win rate equal to the package's."""

import hashlib
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from alignment.cli import main
from alignment.evaluate.length_control import length_controlled_win_rate
from teacher_data import skills
from teacher_data.teachers import Sampling, SkillsTeacher
from tests.fault_server import FaultServer

VICUNA = Path(__file__).parent / "fixtures" / "vicuna_bench_question.jsonl"


def package_metrics(annotations: list[dict], tmp_path) -> dict:
    """alpaca_eval's own get_length_controlled_winrate with its GLM without instruction difficulty.

    The package downloads `df_gamed.csv` from the hub for the instruction difficulty of its 805
    questions (and its gamed baselines, used only by the regularised GLMs); this GLM uses neither, so a
    local stand-in of that file's shape replaces the download and the package's code runs as it is.
    """
    pd = pytest.importorskip("pandas")
    glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    stand_in = tmp_path / "df_gamed.csv"
    pd.DataFrame({"model": "none", "index": range(len(annotations)), "instruction_difficulty": 0.0, "preference": 1.5, "not_gamed_baseline": False}).to_csv(stand_in, index=False)
    frame = pd.DataFrame([{**a, "index": i} for i, a in enumerate(annotations)])
    with mock.patch.object(glm, "hf_hub_download", return_value=str(stand_in)):
        return glm.get_length_controlled_winrate(frame, glm_name="length_controlled_minimal", save_weights_dir=None, is_warn_extreme_changes=False)


def reference_file(tmp_path, per_skill=15):
    """Skills instructions with the flawed teacher's outputs (error rate 0.5) as the reference, alpaca_eval's
    format; every third one wordier and so unformatted (it loses the 3 format points): lengths vary."""
    prompts = skills.make_prompts("heldout", per_skill, seed=3)
    answers = SkillsTeacher(error_rate=0.5).complete([p["messages"] for p in prompts], Sampling(temperature=0.0))
    rows = [{"instruction": p["messages"][0]["content"], "output": ("Here it is. " * (1 + i % 4) if i % 3 == 0 else "") + a.text, "generator": "flawed_teacher", "dataset": "skills"}
            for i, (p, (a,)) in enumerate(zip(prompts, answers))]
    path = tmp_path / "reference_outputs.json"
    path.write_text(json.dumps(rows))
    return path, rows


def run_alpaca(tmp_path, reference, models, judge=None):
    args = ["--benchmark", "alpaca_eval", "--reference_outputs", str(reference), "--models", json.dumps(models), "--judge", json.dumps(judge or {"backend": "skills"}),
            "--temperature", "0", "--output_dir", str(tmp_path / "alpaca")]
    assert main(["eval", "--config", "recipes/tiny/eval.yaml", *args]) == 0
    return json.loads((tmp_path / "alpaca" / "summary.json").read_text())


def test_alpaca_eval_files_and_win_rates_equal_the_package(tmp_path):
    reference, rows = reference_file(tmp_path)
    worse = sum(skills.judge([{"role": "user", "content": r["instruction"]}], r["output"]).score < 10 for r in rows)  # wrong or unformatted
    models = [{"name": "exact", "backend": "skills", "error_rate": 0.0}, {"name": "same", "backend": "skills", "error_rate": 0.5}]
    summary = run_alpaca(tmp_path, reference, models)
    exact, same = summary["alpaca_eval"]["exact"], summary["alpaca_eval"]["same"]
    assert 0 < worse < len(rows) and (exact["win"], exact["tie"], exact["loss"]) == (worse, len(rows) - worse, 0)
    assert exact["win_rate"] == pytest.approx((worse + 0.5 * (len(rows) - worse)) / len(rows))
    # the reference's own answers, but formatted: it wins exactly where the reference is wordier, so at equal length it is a tie
    assert (same["win"], same["loss"]) == (len(rows) // 3, 0) and same["win_rate"] > 0.6 and abs(same["length_controlled_win_rate"] - 0.5) < 0.01

    out = tmp_path / "alpaca"
    outputs = json.loads((out / "model_outputs" / "exact.json").read_text())
    assert len(outputs) == len(rows) and set(outputs[0]) == {"instruction", "output", "generator", "dataset"} and outputs[0]["generator"] == "exact"
    annotations = json.loads((out / "annotations.json").read_text())
    assert set(annotations[0]) == {"instruction", "dataset", "output_1", "generator_1", "output_2", "generator_2", "annotator", "preference"}
    assert {a["preference"] for a in annotations if a["generator_2"] == "exact"} == {1.5, 2.0}
    for name, ours in summary["alpaca_eval"].items():  # skipped where alpaca_eval is not installed
        package = package_metrics([a for a in annotations if a["generator_2"] == name], tmp_path)
        assert package["win_rate"] / 100 == pytest.approx(ours["win_rate"], abs=1e-9)
        assert abs(package["length_controlled_winrate"] / 100 - ours["length_controlled_win_rate"]) < 1e-3
    assert "| exact |" in (out / "report.md").read_text()


def test_length_controlled_win_rate_equals_the_package_on_805_annotations(tmp_path):
    """AlpacaEval's size, a wordier model, a judge that likes length, a third of the verdicts ties."""
    rng = np.random.default_rng(7)
    n = 805
    ref_len, model_len = rng.integers(100, 2500, n), rng.integers(600, 4000, n)  # the model is wordier
    p_model = 1 / (1 + np.exp(-(0.2 + 1.2 * np.tanh((model_len - ref_len) / 800))))
    preference = np.where(rng.random(n) < p_model, 2.0, 1.0)
    preference[rng.random(n) < 0.3] = 1.5
    annotations = [{"instruction": f"q{i}", "output_1": "r" * int(ref_len[i]), "output_2": "m" * int(model_len[i]), "generator_1": "ref", "generator_2": "m",
                    "annotator": "judge", "preference": float(preference[i])} for i in range(n)]
    ours = length_controlled_win_rate(list(preference - 1), list(model_len - ref_len))
    package = package_metrics(annotations, tmp_path)
    assert abs(package["length_controlled_winrate"] / 100 - ours) < 1e-3
    assert package["win_rate"] / 100 - ours > 0.05  # length control moved it: the check is not vacuous


def varied(model, messages):
    """Answers of varied length from 'wordy' and 'terse'; a judge whose verdicts follow a hash of the prompt."""
    text = messages[-1]["content"]
    digest = int(hashlib.sha1(text.encode()).hexdigest(), 16)
    if model in ("wordy", "terse"):
        return ("more words " * (digest % 40 + 5)) if model == "wordy" else "short " * (digest % 9 + 1)
    return "Verdict: [[%s]]" % "AABBC"[digest % 5]


def test_mt_bench_pairwise_length_control_is_the_same_model(tmp_path):
    """MT-Bench pairwise rows as alpaca_eval annotations: the package's LC win rate equals our summary's."""
    server = FaultServer(reply=varied)
    try:
        models = [{"name": n, "backend": "openai", "model": n, "base_url": server.base_url} for n in ("wordy", "terse")]
        args = ["--benchmark", "mt_bench", "--question_file", str(VICUNA), "--models", json.dumps(models), "--judge", json.dumps({"backend": "openai", "model": "judge", "base_url": server.base_url}),
                "--baseline", "terse", "--length_controlled", "true", "--output_dir", str(tmp_path / "mt")]
        assert main(["eval", "--config", "recipes/tiny/eval.yaml", *args]) == 0
    finally:
        server.close()
    ours = json.loads((tmp_path / "mt" / "summary.json").read_text())["pairwise"]["wordy"]
    answers = {m: {json.loads(line)["question_id"]: json.loads(line)["choices"][0]["turns"] for line in open(tmp_path / "mt" / "model_answer" / f"{m}.jsonl")} for m in ("wordy", "terse")}
    rows = [json.loads(line) for line in open(tmp_path / "mt" / "judgments.jsonl")]
    annotations = [{"instruction": f"{r['question_id']}/{r['turn']}", "output_1": answers["terse"][r["question_id"]][r["turn"] - 1], "output_2": answers["wordy"][r["question_id"]][r["turn"] - 1],
                    "generator_1": "terse", "generator_2": "wordy", "annotator": "judge", "preference": None if r["outcome"] is None else 1 + r["outcome"]}
                   for r in rows if r["mode"] == "pairwise"]
    assert len(annotations) == 80 and 0 < ours["win"] and 0 < ours["loss"] and 0 < ours["tie"]
    assert abs(package_metrics(annotations, tmp_path)["length_controlled_winrate"] / 100 - ours["length_controlled_win_rate"]) < 1e-3
