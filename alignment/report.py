"""The run report: summary.json for scripts, report.md and report.png for people."""

import json
import os
import platform
import time
from pathlib import Path

from alignment.evaluate.skills_eval import accuracy_table
from alignment.errors import SmoeError
from alignment.manifest import read_manifest

CONTROLS = {"control_teacher_sft": "control (1): more SFT on the teacher's answers", "control_chosen_sft": "control (2): SFT on judge-chosen samples"}


def _series(log_history: list[dict], key: str):
    points = [(h["step"], h[key]) for h in log_history if key in h]
    return [p[0] for p in points], [p[1] for p in points]


def grouped_bars(ax, series: dict, labels: list[str], **ticks):
    """One bar per label for each named series of values, side by side."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, **ticks)


def plot(stage_logs: dict, results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for name, (stage, logs) in stage_logs.items():
        if stage == "sft":
            ax.plot(*_series(logs, "loss"), label=name)
    ax.set(title="SFT training loss (assistant tokens)", xlabel="step", ylabel="loss", yscale="log")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for name, (stage, logs) in stage_logs.items():
        if stage == "dpo":
            ax.plot(*_series(logs, "loss"), label=f"{name} loss")
            ax.plot(*_series(logs, "rewards/margins"), label=f"{name} reward margin")
    ax.set(title="DPO loss and reward margin", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    for name, (stage, logs) in stage_logs.items():
        if stage == "dpo":
            ax.plot(*_series(logs, "rewards/accuracies"), label=f"{name} reward accuracy")
    ax.set(title="DPO reward accuracy", xlabel="step", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    ax = axes[1][1]
    skills = sorted({s for r in results.values() for s in r["accuracy"]})
    series = {name: [r["accuracy"].get(s, 0.0) for s in skills] + [r["mean_accuracy"]] for name, r in results.items()}
    grouped_bars(ax, series, skills + ["mean"])
    ax.set(title="held-out exact-match accuracy per stage (%)", ylim=(0, 130))
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_router_health(health: dict, name: str, path: Path):
    """The last logging window of a training stage: expert load as a heat map (routers x experts) and the
    routing entropy per router, beside the first window's and the largest possible (uniform routing)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    first, last = health["windows"][0], health["windows"][-1]
    routers = list(last["routers"])
    width = max(len(h["load"]) for h in last["routers"].values())
    load = np.full((len(routers), width), np.nan)
    for row, router in enumerate(routers):
        values = last["routers"][router]["load"]
        load[row, : len(values)] = values
    fig, (heat, entropy) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.3 * len(routers) + 1.5)))
    image = heat.imshow(load, aspect="auto", cmap="viridis", vmin=0)
    heat.set_yticks(range(len(routers)), routers, fontsize=7)
    if width <= 32:
        heat.set_xticks(range(width))
    heat.set(title=f"{name}: expert load, steps to {last['step']} (share of routed slots)", xlabel="expert")
    fig.colorbar(image, ax=heat)
    for window in ([first] if first is not last else []) + [last]:
        entropy.plot([window["routers"].get(r, {}).get("entropy", np.nan) for r in routers], range(len(routers)), marker="o", label=f"steps to {window['step']}")
    entropy.plot([math.log(width)] * len(routers), range(len(routers)), "k--", label="uniform")
    entropy.set_yticks(range(len(routers)), routers, fontsize=7)
    entropy.invert_yaxis()
    entropy.set(title=f"{name}: routing entropy per router (nats, real tokens)", xlabel="entropy", xlim=(0, None))
    entropy.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def router_health(name: str, stage_dir: str, out: Path) -> tuple[list[str], dict]:
    """A training stage's router health figure and its collapse warnings, as report lines."""
    from alignment.models.router import HEALTH_FILE

    path = Path(stage_dir) / HEALTH_FILE
    if not path.is_file():
        return [], {}
    health = json.loads(path.read_text())
    if not health["windows"]:
        return [], {}
    plot_router_health(health, name, out / f"router_{name}.png")
    warnings = [f"- WARNING: {name}: router {router} collapsed in the last logging window: {why}" for router, why in health["collapsed"].items()]
    return ["", f"Router health after {name}:", "", *warnings, f"![router health of {name}](router_{name}.png)"], health["collapsed"]


def write_report(outputs: dict, output_dir: str, started: float) -> dict:
    """outputs: stage name -> (stage kind, output dir), in pipeline order."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifests = {name: read_manifest(d) for name, (_, d) in outputs.items()}
    stage_logs = {name: (kind, manifests[name].get("log_history", [])) for name, (kind, _) in outputs.items() if kind in ("sft", "dpo")}
    results, chat, chat_reports = {}, {}, []
    for name, (kind, d) in outputs.items():
        if kind == "eval":
            found = json.loads((Path(d) / "summary.json").read_text())
            if "models" in found:  # the skills benchmark
                results.update(found["models"])
            else:  # a chat benchmark (MT-Bench format, AlpacaEval, IFEval): its own report goes in as a section
                chat[name] = {k: found[k] for k in ("single", "pairwise", "alpaca_eval", "ifeval") if k in found}
                section = (Path(d) / "report.md").read_text().replace("# ", "## ", 1)
                chat_reports.append(section.replace("](report.png)", f"]({os.path.relpath(Path(d) / 'report.png', out)})"))
    mean = {name: r["mean_accuracy"] for name, r in results.items()}
    deltas = {}
    if "ddpo" in mean and "dsft" in mean:
        deltas["ddpo_minus_dsft"] = mean["ddpo"] - mean["dsft"]
        for control in CONTROLS:
            if control in mean:
                deltas[f"ddpo_minus_{control}"] = mean["ddpo"] - mean[control]
    timings = {name: manifests[name].get("seconds") for name in outputs}
    table = accuracy_table(results) if results else ""
    routing, collapse = [], {}
    for name, (kind, d) in outputs.items():
        if kind in ("sft", "dpo"):
            lines, collapse[name] = router_health(name, d, out)
            routing += lines
    summary = {"models": results, "chat_benchmarks": chat, "deltas": deltas, "stage_seconds": timings, "table": table, "wall_seconds": round(time.time() - started, 1), "machine": machine(),
               "router_collapse": {name: found for name, found in collapse.items() if found}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if results or stage_logs:
        plot(stage_logs, results, out / "report.png")
    lines = ["# smoe-align run report", "", f"Measured on {summary['machine']['text']}.", "", "Held-out exact-match accuracy (%) against the true answers, greedy decoding.", "", table]
    for key, value in deltas.items():
        lines.append(f"- {key.replace('_', ' ')}: {value:+.1f} points")
    for control, what in CONTROLS.items():
        if control in results:
            lines.append(f"- {control} is {what}, with dDPO's step count")
    lines += [""] + chat_reports
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {n} | {s} |" for n, s in timings.items()]
    lines += ["", "![training and accuracy](report.png)", *routing, ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary


def machine() -> dict:
    """What the figures were measured on: the CPU (or GPU), its cores, and the library versions."""
    import torch
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), cpu)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core {cpu}"
    versions = {name: version(name) for name in ("torch", "transformers", "trl", "peft")}
    return {"device": device, **versions, "text": f"{device}, " + ", ".join(f"{k} {v}" for k, v in versions.items())}


def markers(block: str = "tiny-demo") -> tuple[str, str]:
    """The two README lines that enclose a pipeline's block; each pipeline (JetMoE, Mixtral) names its own."""
    return f"<!-- {block}:begin (written by the pipeline: do not edit) -->", f"<!-- {block}:end -->"


def record_run(summary: dict, history: str | Path, readme: str | Path | None, block: str = "tiny-demo"):
    """Append this run's figures to `history` (JSONL, kept in the repository) and rewrite the README's
    marked block: the latest run's table, and each model's mean over every recorded run (the spread)."""
    begin, end = markers(block)
    history = Path(history)
    history.parent.mkdir(parents=True, exist_ok=True)
    row = {"date": time.strftime("%Y-%m-%d"), "machine": summary["machine"]["text"], "mean": {n: round(r["mean_accuracy"], 1) for n, r in summary["models"].items()},
           "accuracy": {n: r["accuracy"] for n, r in summary["models"].items()}, "wall_seconds": summary["wall_seconds"]}
    with history.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if readme is None:
        return
    runs = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    deltas = "; ".join(f"{k.replace('_', ' ')}: **{v:+.1f}**" for k, v in summary["deltas"].items())
    spread = ["| model | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | range |", "|---" * (len(runs) + 2) + "|"]
    for name in summary["models"]:
        means = [r["mean"].get(name) for r in runs]
        known = [m for m in means if m is not None]
        spread.append(f"| {name} | " + " | ".join("" if m is None else f"{m:.1f}" for m in means) + f" | {max(known) - min(known):.1f} |")
    machines = "\n".join(f"- run {i + 1}: {r['date']}, {r['machine']}, {r['wall_seconds'] / 60:.1f} min" for i, r in enumerate(runs))
    text = "\n".join([begin, f"Latest run ({row['date']}, {summary['machine']['text']}; pipeline {summary['wall_seconds'] / 60:.1f} min):", "", summary["table"], f"- {deltas}", "",
                       *chat_tables(summary["chat_benchmarks"]),
                       f"Mean held-out accuracy of every recorded run ({history}): numbers move between CPUs and library versions", "in the last digits and, for the stages that learn abruptly, by a few points; the conclusions hold.", "", *spread, "", machines, end])
    old = Path(readme).read_text()
    if begin not in old or end not in old:
        raise SmoeError(f"no block marked {begin} ... {end}", str(readme), "put the two marker lines where the demo table belongs")
    head, rest = old.split(begin, 1)
    Path(readme).write_text(head + text + rest.split(end, 1)[1])


def chat_tables(benchmarks: dict) -> list[str]:
    """Markdown lines for each MT-Bench-format benchmark of a run: grades per turn and pairwise results."""
    lines = []
    for name, found in benchmarks.items():
        if "single" not in found:
            continue
        pairwise = found.get("pairwise", {})
        lines += [f"Chat benchmark `{name}` (MT-Bench format; grades 0-10, pairwise against the baseline):", "",
                  "| model | turn 1 | turn 2 | overall | win / tie / loss | win rate (95% CI) |", "| --- | --- | --- | --- | --- | --- |"]
        for model, grade in found["single"].items():
            pair = pairwise.get(model)
            ci = pair and pair.get("win_rate_ci95")
            result = f"{pair['win']} / {pair['tie']} / {pair['loss']} | " + (f"{pair['win_rate']:.2f} ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "no verdicts") if pair else " | "
            lines.append(f"| {model} | {grade['turn_1']:.2f} | {grade['turn_2']:.2f} | {grade['overall']:.2f} | {result} |")
        lines.append("")
    return lines


def write_between_markers(path: Path, name: str, text: str):
    """Replace what lies between `<!-- name -->` and `<!-- /name -->` in `path` (the README's measured table)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    content = path.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"error: {path} has no {start} ... {end} markers\n  fix: add both lines where the table belongs")
    head, rest = content.split(start, 1)
    path.write_text(head + start + "\n" + text + end + rest.split(end, 1)[1])
