"""Prompt sources for the teacher stages, deduplicated and decontaminated.

A source is `skills:<split>` (synthetic, checkable) or anything `alignment.data.read_rows` reads (JSONL,
Parquet, a saved `datasets` directory, a hub id), with `column_map` renaming a dataset's own columns
into ours (e.g. `{instruction: prompt, id: prompt_id}`). Prompts are deduplicated exactly and after
normalisation (case, spacing, punctuation), and any prompt sharing a word n-gram with an evaluation
question file (MT-Bench `question.jsonl` or any prompt file) is dropped; the dropped ids are reported.
"""

import re
from dataclasses import dataclass, field

from alignment.data import check_messages, read_rows, to_prompt
from alignment.errors import SmoeError
from teacher_data import skills


@dataclass
class PromptSource:
    prompts: str = "skills:sft"
    prompts_per_skill: int = 0
    seed: int = 0
    column_map: dict = field(default_factory=dict)  # source column -> our column
    max_prompts: int | None = None
    dedup: bool = True
    decontaminate_against: list = field(default_factory=list)  # evaluation question files
    decontaminate_ngram: int = 8
    system_prompt: str | None = None


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    if len(words) < n:  # a short question is one n-gram of its own length
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def eval_ngrams(paths: list[str], n: int) -> set:
    grams = set()
    for path in paths:
        for number, row in enumerate(read_rows(path), 1):
            if isinstance(row.get("messages"), list):
                texts = [m["content"] for m in check_messages(row["messages"], path, number) if m["role"] == "user"]
            else:  # MT-Bench `turns`, or a prompt in any form `to_prompt` reads
                texts = row.get("turns") or [to_prompt({"prompt_id": number, **row}, path, number)["messages"][-1]["content"]]
            for text in texts:
                if not isinstance(text, str):
                    raise SmoeError(f"row {number}: `turns` holds a value of type {type(text).__name__}, not a string", path, "write each turn as one string")
                grams |= ngrams(text, n)
    return grams


def load_prompts(source: PromptSource) -> tuple[list[dict], dict]:
    """(prompts, report): the report lists the ids dropped as duplicates and as contaminated."""
    if source.prompts.startswith("skills:"):
        split = source.prompts.split(":", 1)[1]
        if split not in skills.SPLIT_BUCKETS:
            raise SmoeError(f"unknown skills split {split!r}", f"prompts: {source.prompts}", f"use one of {sorted(skills.SPLIT_BUCKETS)}")
        if source.prompts_per_skill <= 0:
            raise SmoeError("skills prompts need prompts_per_skill > 0", f"prompts: {source.prompts}", "set prompts_per_skill")
        rows = skills.make_prompts(split, source.prompts_per_skill, source.seed)
    else:
        raw = read_rows(source.prompts)[: source.max_prompts]
        rows = [to_prompt({source.column_map.get(k, k): v for k, v in row.items()}, source.prompts, i) for i, row in enumerate(raw, 1)]
    report = {"duplicates": [], "contaminated": []}
    kept, seen_ids, seen_text = [], set(), set()
    contaminated = eval_ngrams(source.decontaminate_against, source.decontaminate_ngram) if source.decontaminate_against else set()
    for row in rows:
        text = normalise(row["messages"][-1]["content"])
        if row["prompt_id"] in seen_ids or (source.dedup and text in seen_text):
            report["duplicates"].append(row["prompt_id"])
            continue
        if contaminated and ngrams(row["messages"][-1]["content"], source.decontaminate_ngram) & contaminated:
            report["contaminated"].append(row["prompt_id"])
            continue
        seen_ids.add(row["prompt_id"])
        seen_text.add(text)
        if source.system_prompt and row["messages"][0]["role"] != "system":
            row["messages"] = [{"role": "system", "content": source.system_prompt}] + row["messages"]
        kept.append(row)
    return kept, report
