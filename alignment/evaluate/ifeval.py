"""IFEval through lm-evaluation-harness (`pip install 'smoe-align[ifeval]'`): rule-based, no judge.

The prompts come from a local file in IFEval's own format (`input_data.jsonl`: {key, prompt,
instruction_id_list, kwargs}), never from the hub: lm_eval's registered `ifeval` task is used as it is,
with its dataset pointed at that file. A model `{name, path}` (a model directory, adapter or adapter
chain) is loaded the way every stage loads it and handed to lm_eval's HF model as an instance; an
OpenAI-compatible endpoint `{name, backend: openai, model, base_url}` goes through lm_eval's
`local-chat-completions`. Prompts are sent through the chat template, greedy, `max_new_tokens` long
(IFEval's own setting is 1280).

Two of IFEval's instruction checks (sentence counting and capital-word frequency) tokenize with nltk's
`punkt_tab` data, which nltk downloads on first use and which cannot be fetched offline: when those
instructions are in the prompts and the data is not installed, the stage stops and says so rather than
score them wrong. (lm_eval tries that download when its ifeval module is imported; offline it prints an
error and goes on.)
"""

import json
import time
from pathlib import Path

from alignment.data import read_rows
from alignment.errors import SmoeError
from alignment.manifest import write_manifest

NEEDS_PUNKT = {"length_constraints:number_sentences", "change_case:capital_word_frequency"}
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


def load_prompts(path: str) -> list[dict]:
    if not Path(path).is_file():
        raise SmoeError("IFEval prompt file not found", path, "give a local copy of IFEval's input_data.jsonl (rows {key, prompt, instruction_id_list, kwargs})")
    rows = list(read_rows(path))
    for i, row in enumerate(rows, 1):
        ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
        if not isinstance(row.get("prompt"), str) or not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
            raise SmoeError(f"row {i} is not in IFEval's format", path, "rows need prompt, instruction_id_list and kwargs (one per instruction)")
    return rows


def check_punkt(rows: list[dict], path: str):
    import nltk

    needing = sum(bool(NEEDS_PUNKT & set(r["instruction_id_list"])) for r in rows)
    if not needing:
        return
    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        raise SmoeError(
            f"{needing} prompts use instructions that need nltk's punkt_tab data ({', '.join(sorted(NEEDS_PUNKT))}), which is not installed",
            path,
            "on a machine with internet: python -m nltk.downloader punkt_tab, then copy nltk_data here and set NLTK_DATA; or leave those prompts out of the file",
        ) from None


def ifeval_task(prompt_file: str, max_new_tokens: int):
    """lm_eval's own ifeval task config with its dataset read from the local file, and a task manager
    that indexes only the ifeval folder (indexing all of lm_eval's tasks takes seconds)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = TaskManager(include_defaults=False, include_path=str(Path(lm_eval.tasks.__file__).parent / "ifeval"))
    config = load_yaml(manager.task_index["ifeval"].yaml_path, resolve_func=True)
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"train": str(Path(prompt_file).resolve())}})
    config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": max_new_tokens}
    return config, manager


def lm_for(entry: dict, batch_size: int):
    """An lm_eval model for one of our model entries."""
    spec = {k: v for k, v in entry.items() if k != "name"}
    if spec.get("backend") == "hf":
        spec["path"] = spec.pop("model")
    if "path" in spec:
        import torch
        from lm_eval.models.huggingface import HFLM

        from alignment.models.jetmoe import load_causal_lm, load_tokenizer

        device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_causal_lm(spec["path"], spec.get("dtype")).to(device).eval()
        return HFLM(pretrained=model, tokenizer=load_tokenizer(spec["path"]), batch_size=batch_size, device=device)
    if spec.get("backend") == "openai":
        import os

        from lm_eval.models.openai_completions import LocalChatCompletion

        base_url = spec.get("base_url") or "https://api.openai.com/v1"
        key = os.environ.get(spec["api_key_env"]) if spec.get("api_key_env") else None
        return LocalChatCompletion(model=spec["model"], base_url=f"{base_url.rstrip('/')}/chat/completions", auth_token=key, num_concurrent=spec.get("concurrency", 1))
    raise SmoeError(f"model {entry['name']!r}: IFEval runs local models ({{name, path}}) or OpenAI-compatible endpoints", "recipe key models", "give a path, or backend: openai with model and base_url")


def run(args):
    try:
        from lm_eval import simple_evaluate
    except ImportError:
        raise SmoeError("lm-evaluation-harness is not installed", "benchmark: ifeval", "pip install 'smoe-align[ifeval]'") from None
    started = time.time()
    out = Path(args.output_dir)
    (out / "results").mkdir(parents=True, exist_ok=True)
    rows = load_prompts(args.question_file)
    check_punkt(rows, args.question_file)
    task, manager = ifeval_task(args.question_file, args.max_new_tokens)
    summary = {"prompts": len(rows), "instructions": sum(len(r["instruction_id_list"]) for r in rows), "ifeval": {}}
    for entry in args.models:
        done = out / "results" / f"{entry['name']}.json"
        if not done.is_file():  # a model already scored is not redone on a rerun
            found = simple_evaluate(model=lm_for(entry, args.batch_size), tasks=[dict(task)], task_manager=manager, apply_chat_template=True, log_samples=True, bootstrap_iters=0, random_seed=args.seed)
            metrics = found["results"]["ifeval"]
            result = {m: metrics[f"{m},none"] for m in METRICS}
            samples = [{"key": s["doc"].get("key"), "prompt": s["doc"]["prompt"], "response": s["filtered_resps"][0], **{m: s[m] for m in METRICS}} for s in found["samples"]["ifeval"]]
            with (out / "results" / f"{entry['name']}.samples.jsonl").open("w") as f:
                f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
            done.write_text(json.dumps(result, indent=2))
        summary["ifeval"][entry["name"]] = json.loads(done.read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report(summary))
    write_manifest(out, "eval", started, models=list(summary["ifeval"]))
    print(report(summary))
    return summary


def report(summary: dict) -> str:
    lines = [f"# IFEval ({summary['prompts']} prompts, {summary['instructions']} instructions; lm-evaluation-harness)", "",
             "| model | prompt-level strict (%) | instruction-level strict (%) | prompt-level loose (%) | instruction-level loose (%) |", "|---|---|---|---|---|"]
    for name, r in summary["ifeval"].items():
        lines.append(f"| {name} | **{100 * r['prompt_level_strict_acc']:.1f}** | {100 * r['inst_level_strict_acc']:.1f} | {100 * r['prompt_level_loose_acc']:.1f} | {100 * r['inst_level_loose_acc']:.1f} |")
    return "\n".join(lines + [""])
