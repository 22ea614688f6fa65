"""teacher-sft: a teacher writes the answers to a set of prompts (the dSFT data).

usage: smoe-align teacher-sft --config recipes/tiny/teacher_sft.yaml [--key value ...]

Writes `train.jsonl` in the ultrachat_200k schema (prompt_id, prompt, messages, teacher) into
output_dir. Resumable: answered prompts are kept in shards and skipped on a rerun.
"""

import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from alignment.data import DATA_FILE
from alignment.manifest import write_manifest
from teacher_data.prompts import load_prompts
from teacher_data.store import ShardStore, write_jsonl
from teacher_data.teachers import Sampling, make_teacher


@dataclass
class TeacherSFTArgs:
    output_dir: str = "runs/tiny/sft_data"
    prompts: str = "skills:sft"
    prompts_per_skill: int = 0
    seed: int = 0
    teacher: dict = field(default_factory=lambda: {"backend": "skills"})
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    shard_size: int = 4096


def run(args: TeacherSFTArgs):
    started = time.time()
    prompts = load_prompts(args.prompts, args.prompts_per_skill, args.seed)
    teacher = make_teacher(args.teacher, "teacher")
    store = ShardStore(args.output_dir)
    done = store.done_ids()
    todo = [p for p in prompts if p["prompt_id"] not in done]
    sampling = Sampling(n=1, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    failed = 0
    with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="teacher-sft", unit="prompt") as bar:
        for start in range(0, len(todo), args.shard_size):
            chunk = todo[start : start + args.shard_size]
            answers = teacher.complete([p["messages"] for p in chunk], sampling)
            rows = []
            for prompt, (answer,) in zip(chunk, answers):
                row = {"prompt_id": prompt["prompt_id"], "prompt": prompt["messages"][-1]["content"], "teacher": teacher.name, "finish_reason": answer.finish_reason}
                if answer.text is not None:
                    row["messages"] = prompt["messages"] + [{"role": "assistant", "content": answer.text}]
                if "category" in prompt:
                    row["category"] = prompt["category"]
                rows.append(row)  # failed rows are stored too, so a rerun does not retry them forever
            store.write(rows)
            failed += sum(a.finish_reason == "error" for (a,) in answers)
            bar.update(len(chunk))
            bar.set_postfix(failed=failed)
    kept, counts = [], {"prompts": len(prompts), "failed": 0, "truncated": 0, "empty": 0}
    for row in store.rows():
        if row["finish_reason"] == "error":
            counts["failed"] += 1
        elif row["finish_reason"] == "length":
            counts["truncated"] += 1
        elif not row["messages"][-1]["content"].strip():
            counts["empty"] += 1
        else:
            kept.append({k: v for k, v in row.items() if k != "finish_reason"})
    counts["rows"] = len(kept)
    write_jsonl(kept, f"{args.output_dir}/{DATA_FILE}")
    write_manifest(args.output_dir, "teacher-sft", started, counts=counts, teacher=teacher.name, usage=getattr(teacher, "usage", None))
    return counts
