"""The mt_bench benchmark of the eval stage: answer, grade, compare, report (see `mt_bench` for the parts)."""

import json
import time
from pathlib import Path

from alignment.evaluate import mt_bench as mt
from alignment.manifest import write_manifest
from alignment.report import grouped_bars
from teacher_data.store import write_jsonl


def run(args):
    started = time.time()
    out = Path(args.output_dir)
    (out / "model_answer").mkdir(parents=True, exist_ok=True)
    questions = mt.load_questions(args.question_file, args.categories, args.prompts_per_skill, args.seed)[: args.max_questions]
    ids = {q["question_id"] for q in questions}
    references = mt.load_answer_file(args.reference_answers, ids, require_all=False) if args.reference_answers else {}
    prompts = mt.load_judge_prompts(args.judge_prompts)

    answers = {}
    for entry in args.models:
        path = out / "model_answer" / f"{entry['name']}.jsonl"
        if not path.is_file():  # answers are kept, so a rerun only judges
            found = mt.answer_questions(mt.model_spec(entry), questions, args.max_new_tokens, args.seed, args.temperature)
            write_jsonl(mt.answer_rows(entry["name"], found), path)
        answers[entry["name"]] = mt.load_answer_file(str(path), ids, require_all=True)

    judge = mt.CachedJudge(args.judge, out / "judgment_cache.jsonl", args.judge_max_new_tokens)
    summary, judgments = {"judge": judge.name, "questions": len(questions), "single": {}, "pairwise": {}}, []
    fastchat_single, fastchat_pair = [], []  # FastChat's model_judgment files, read by its show_result.py
    for name, found in answers.items():
        rows = mt.grade_single(judge, prompts, questions, found, references)
        judgments += [{"model": name, "mode": "single", **r} for r in rows]
        fastchat_single += mt.fastchat_single_rows(name, judge.name, rows)
        summary["single"][name] = mt.summarise_single(rows)
    if args.baseline:
        for name, found in answers.items():
            if name != args.baseline:
                rows = mt.grade_pairs(judge, prompts, questions, found, answers[args.baseline], references)
                judgments += [{"model": name, "baseline": args.baseline, "mode": "pairwise", **r} for r in rows]
                fastchat_pair += mt.fastchat_pair_rows(name, args.baseline, judge.name, rows)
                summary["pairwise"][name] = mt.summarise_pairs(rows, args.bootstrap_samples, args.seed, args.length_controlled)
    summary["judge_calls_this_run"] = judge.calls
    write_jsonl(judgments, out / "judgments.jsonl")
    stem = out / "model_judgment" / mt.judge_file_stem(judge.name)
    stem.parent.mkdir(exist_ok=True)
    write_jsonl(fastchat_single, Path(f"{stem}_single.jsonl"))
    if fastchat_pair:
        write_jsonl(fastchat_pair, Path(f"{stem}_pair.jsonl"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report(summary, args.baseline))
    plot_categories({n: s["per_category"] for n, s in summary["single"].items()}, out / "report.png")
    write_manifest(out, "eval", started, models=list(answers), judge_calls=judge.calls)
    print(report(summary, args.baseline))
    return summary


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def report(summary: dict, baseline: str | None) -> str:
    single = summary["single"]
    categories = sorted({c for s in single.values() for c in s["per_category"]})
    lines = [f"# MT-Bench-format evaluation ({summary['questions']} questions, judge: {summary['judge']})", "",
             "| model | turn 1 | turn 2 | overall | " + " | ".join(categories) + " | judge failures |", "|---" * (len(categories) + 5) + "|"]
    for name, s in single.items():
        lines.append(f"| {name} | {_fmt(s['turn_1'])} | {_fmt(s['turn_2'])} | **{_fmt(s['overall'])}** | " + " | ".join(_fmt(s["per_category"].get(c)) for c in categories) + f" | {s['judge_failures']} |")
    if summary["pairwise"]:
        lines += ["", f"Pairwise against {baseline} (both orders; a disagreement is a tie):", "", "| model | win | tie | loss | win rate | 95% CI | length-controlled | judge failures |", "|---|---|---|---|---|---|---|---|"]
        for name, p in summary["pairwise"].items():
            interval = "no verdicts" if p["win_rate_ci95"] is None else "-".join(_fmt(x) for x in p["win_rate_ci95"])
            win_rate = "no verdicts" if p["win_rate"] is None else f"**{_fmt(p['win_rate'])}**"
            lines.append(f"| {name} | {p['win']} | {p['tie']} | {p['loss']} | {win_rate} | {interval} | {_fmt(p.get('length_controlled_win_rate'))} | {p['judge_failures']} |")
    return "\n".join(lines + ["", "![scores per category](report.png)", ""])


def plot_categories(scores: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted({c for s in scores.values() for c in s})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(categories)), 4))
    grouped_bars(ax, {name: [per_category.get(c) or 0 for c in categories] for name, per_category in scores.items()}, categories, rotation=30)
    ax.set(title="mean judge score per category", ylim=(0, 10.5), ylabel="score (1-10)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
