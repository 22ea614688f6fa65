"""The skills benchmark: held-out exact-match accuracy per skill and mean judge score, per model.

Greedy answers to held-out skills prompts (never seen in any training split), checked exactly against
the true answers by the skills judge. Each model's raw judgments go to `judgments/<name>.jsonl` and its
figures to `results/<name>.json`; a model already scored is skipped on a rerun.
"""

import json
import time
from pathlib import Path

from alignment.manifest import write_manifest
from teacher_data import skills
from teacher_data.prompts import PromptSource, load_prompts
from teacher_data.store import write_jsonl
from teacher_data.teachers import HFTeacher, Sampling


def score_model(name: str, path: str, prompts: list[dict], args) -> dict:
    teacher = HFTeacher(path, batch_size=args.batch_size)
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens, seed=args.seed)
    answers = teacher.complete([p["messages"] for p in prompts], sampling)
    rows, per_skill = [], {}
    for prompt, (answer,) in zip(prompts, answers):
        verdict = skills.judge(prompt["messages"], answer.text or "")
        rows.append({"prompt_id": prompt["prompt_id"], "category": prompt.get("category"), "response": answer.text, "finish_reason": answer.finish_reason, "correct": verdict.correct, "score": verdict.score, "judgment": verdict.judgment})
        per_skill.setdefault(prompt.get("category") or "other", []).append(verdict)
    accuracy = {skill: 100.0 * sum(v.correct for v in verdicts) / len(verdicts) for skill, verdicts in per_skill.items()}
    scores = [v.score for verdicts in per_skill.values() for v in verdicts if v.score is not None]
    result = {
        "name": name,
        "path": path,
        "n": len(prompts),
        "accuracy": accuracy,
        "mean_accuracy": sum(accuracy.values()) / len(accuracy),
        "judge_score": sum(scores) / len(scores) if scores else None,
        "unjudged": len(prompts) - len(scores),
    }
    return result, rows


def run(args):
    started = time.time()
    out = Path(args.output_dir)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "judgments").mkdir(parents=True, exist_ok=True)
    prompts, _ = load_prompts(PromptSource(prompts=args.prompts, prompts_per_skill=args.prompts_per_skill, seed=args.seed))
    results = {}
    for entry in args.models:
        name, path = entry["name"], entry["path"]
        done = out / "results" / f"{name}.json"
        if done.is_file():
            results[name] = json.loads(done.read_text())
            continue
        result, rows = score_model(name, path, prompts, args)
        write_jsonl(rows, out / "judgments" / f"{name}.jsonl")
        tmp = done.with_suffix(".json.tmp")  # whole or absent: a rerun takes a results file as done
        tmp.write_text(json.dumps(result, indent=2))
        tmp.rename(done)
        results[name] = result
        print(f"[eval] {name}: mean accuracy {result['mean_accuracy']:.1f}% " + " ".join(f"{k} {v:.1f}" for k, v in result["accuracy"].items()))
    (out / "summary.json").write_text(json.dumps({"models": results}, indent=2))
    (out / "report.md").write_text(accuracy_table(results))
    write_manifest(out, "eval", started, models=list(results))
    return results


def accuracy_table(results: dict) -> str:
    skill_names = sorted({s for r in results.values() for s in r["accuracy"]})
    lines = ["| model | " + " | ".join(skill_names) + " | mean | judge score (0-10) |", "|---" * (len(skill_names) + 3) + "|"]
    for name, r in results.items():
        cells = [f"{r['accuracy'].get(s, float('nan')):.1f}" for s in skill_names]
        judge_score = "n/a" if r["judge_score"] is None else f"{r['judge_score']:.2f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{r['mean_accuracy']:.1f}** | {judge_score} |")
    return "\n".join(lines) + "\n"
