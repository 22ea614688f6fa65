"""Prompt sources: `skills:<split>` (synthetic, checkable) or any dataset `alignment.data` reads."""

from alignment.data import read_rows, to_prompt
from alignment.errors import SmoeError
from teacher_data import skills


def load_prompts(source: str, per_skill: int = 0, seed: int = 0) -> list[dict]:
    if source.startswith("skills:"):
        split = source.split(":", 1)[1]
        if split not in skills.SPLIT_BUCKETS:
            raise SmoeError(f"unknown skills split {split!r}", f"prompts: {source}", f"use one of {sorted(skills.SPLIT_BUCKETS)}")
        if per_skill <= 0:
            raise SmoeError("skills prompts need prompts_per_skill > 0", f"prompts: {source}", "set prompts_per_skill")
        return skills.make_prompts(split, per_skill, seed)
    rows = [to_prompt(row, source, i) for i, row in enumerate(read_rows(source), 1)]
    seen = set()
    for i, row in enumerate(rows, 1):
        if row["prompt_id"] in seen:
            raise SmoeError(f"row {i}: prompt_id {row['prompt_id']!r} appears twice", source, "make prompt ids unique")
        seen.add(row["prompt_id"])
    return rows
