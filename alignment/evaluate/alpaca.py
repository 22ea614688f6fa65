"""AlpacaEval 2: each model against a reference output file, judged in both orders, win rate and
length-controlled win rate.

Files are alpaca_eval's, so its tools read them: the reference outputs (its evaluation set, such as
GPT-4 Turbo's outputs, or your own) and each model's `model_outputs/<name>.json` are JSON lists of
{instruction, output, generator, dataset}; `annotations.json` holds one row per (model, instruction):
{instruction, dataset, output_1 (reference), generator_1, output_2 (model), generator_2, annotator,
preference}, with alpaca_eval's encoding (1: the reference wins, 2: the model wins, 1.5: a tie; null: the
verdict could not be parsed, excluded). The judge is any teacher backend with our pairwise prompt
(`pair-v2`, or yours from `judge_prompts`), asked in both orders, a disagreement a tie; `skills` judges
exactly. The length-controlled win rate is alpaca_eval's GLM without instruction difficulty
(`length_control`), since the questions need not be AlpacaEval's.
"""

import json
import time
from pathlib import Path

from alignment.errors import SmoeError
from alignment.evaluate import mt_bench as mt
from alignment.manifest import write_manifest


def load_outputs(path: str) -> list[dict]:
    """An alpaca_eval outputs file: a JSON list (or JSONL) of {instruction, output, generator?, dataset?}."""
    from alignment.data import read_rows

    if not Path(path).is_file():
        raise SmoeError("outputs file not found", path, "give an alpaca_eval outputs file: a JSON list of {instruction, output, generator, dataset}")
    text = Path(path).read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else list(read_rows(path))
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("instruction", "output")):
            raise SmoeError(f"row {i} lacks a string instruction or output", path, "rows need instruction and output, as alpaca_eval writes them")
    return rows


def outputs_of(name: str, reference: list[dict], answers: dict) -> list[dict]:
    return [{"instruction": r["instruction"], "output": answers[i][0], "generator": name, "dataset": r.get("dataset", "")} for i, r in enumerate(reference)]


def read_answers(path: Path, reference: list[dict]) -> dict:
    """{index: [output]} from a model_outputs file made for these instructions, in their order."""
    rows = load_outputs(str(path))
    if [r["instruction"] for r in rows] != [r["instruction"] for r in reference]:
        raise SmoeError("its instructions differ from the reference outputs'", str(path), "delete it to answer again, or use the reference file it was made for")
    return {i: [r["output"]] for i, r in enumerate(rows)}


def annotations(name: str, generator_1: str, judge_name: str, reference: list[dict], outputs: dict, rows: list[dict]) -> list[dict]:
    return [
        {"instruction": reference[r["question_id"]]["instruction"], "dataset": reference[r["question_id"]].get("dataset", ""),
         "output_1": reference[r["question_id"]]["output"], "generator_1": generator_1, "output_2": outputs[r["question_id"]][0], "generator_2": name,
         "annotator": judge_name, "preference": None if r["outcome"] is None else 1.0 + r["outcome"]}
        for r in rows
    ]


def run(args):
    started = time.time()
    out = Path(args.output_dir)
    (out / "model_outputs").mkdir(parents=True, exist_ok=True)
    reference = load_outputs(args.reference_outputs)[: args.max_questions]
    generator_1 = reference[0].get("generator") or "reference"
    questions = [{"question_id": i, "category": r.get("dataset") or "alpaca_eval", "turns": [r["instruction"]]} for i, r in enumerate(reference)]
    baseline = {i: [r["output"]] for i, r in enumerate(reference)}
    prompts = mt.load_judge_prompts(args.judge_prompts)
    judge = mt.CachedJudge(args.judge, out / "judgment_cache.jsonl", args.judge_max_new_tokens)

    summary, annotated = {"judge": judge.name, "reference": generator_1, "instructions": len(reference), "alpaca_eval": {}}, []
    for entry in args.models:
        path = out / "model_outputs" / f"{entry['name']}.json"
        if not path.is_file():  # outputs are kept, so a rerun only judges
            found = mt.answer_questions(mt.model_spec(entry), questions, args.max_new_tokens, args.seed, args.temperature)
            path.write_text(json.dumps(outputs_of(entry["name"], reference, found), indent=2, ensure_ascii=False))
        outputs = read_answers(path, reference)
        rows = mt.grade_pairs(judge, prompts, questions, outputs, baseline, {})
        annotated += annotations(entry["name"], generator_1, judge.name, reference, outputs, rows)
        found = mt.summarise_pairs(rows, args.bootstrap_samples, args.seed, length_controlled=True)
        found["avg_length"] = sum(len(o[0]) for o in outputs.values()) / max(1, len(outputs))
        summary["alpaca_eval"][entry["name"]] = found
    summary["judge_calls_this_run"] = judge.calls
    (out / "annotations.json").write_text(json.dumps(annotated, indent=2, ensure_ascii=False))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report(summary))
    write_manifest(out, "eval", started, models=list(summary["alpaca_eval"]), judge_calls=judge.calls)
    print(report(summary))
    return summary


def _percent(x) -> str:
    return "no verdicts" if x is None else f"{100 * x:.1f}"


def report(summary: dict) -> str:
    lines = [f"# AlpacaEval 2 ({summary['instructions']} instructions against {summary['reference']}, judge: {summary['judge']})", "",
             "| model | LC win rate (%) | win rate (%) | 95% CI | win | tie | loss | judge failures | avg length |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["alpaca_eval"].items():
        interval = "no verdicts" if s["win_rate_ci95"] is None else "-".join(_percent(x) for x in s["win_rate_ci95"])
        lines.append(f"| {name} | **{_percent(s['length_controlled_win_rate'])}** | {_percent(s['win_rate'])} | {interval} | {s['win']} | {s['tie']} | {s['loss']} | {s['judge_failures']} | {s['avg_length']:.0f} |")
    return "\n".join(lines + [""])
