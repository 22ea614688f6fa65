"""teacher-sft: a teacher writes the conversations for a set of prompts (the dSFT data).

usage: smoe-align teacher-sft --config recipes/tiny/teacher_sft.yaml [--key value ...]

Single-turn, or multi-turn UltraChat style: a user-simulator teacher writes each next user turn, up to
`max_turns` assistant turns. Writes `train.jsonl` in the ultrachat_200k schema (prompt_id, prompt,
messages, teacher) into output_dir. Failed, truncated and empty answers are counted in the manifest,
not trained on. Resumable: finished prompts are kept in shards and skipped on a rerun. Answered in this
process, or by Ray Data workers with `engine: ray` (teacher_data.engine, teacher_data.ray_engine).
"""

import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from alignment.data import DATA_FILE
from alignment.manifest import write_manifest
from teacher_data.engine import EngineArgs, run_chunks
from teacher_data.judge import render
from teacher_data.prompts import PromptSource, load_prompts
from teacher_data.store import ShardStore, write_jsonl
from teacher_data.teachers import Sampling, make_teacher

USER_SIMULATOR_PROMPT = """Below is a conversation between a curious user and an AI assistant. Write the user's
next message: a natural follow-up that goes deeper into the topic or asks for something related.
Reply with the message only.

{conversation}"""


@dataclass
class TeacherSFTArgs(PromptSource, EngineArgs):
    output_dir: str = "runs/tiny/sft_data"
    teacher: dict = field(default_factory=lambda: {"backend": "skills"})
    user_simulator: dict | None = None  # a teacher spec; needed when max_turns > 1
    max_turns: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    shard_size: int = 4096

    def __post_init__(self):
        super().__post_init__()
        if self.max_turns > 1 and not self.user_simulator:
            raise ValueError("max_turns > 1 needs a user_simulator teacher to write the next user turns")


def converse(teacher, simulator, prompts: list[dict], sampling: Sampling, max_turns: int) -> list[dict]:
    """Each prompt's conversation and why it ended: 'stop' (complete), 'length' or 'error' (first answer)."""
    states = [{"messages": list(p["messages"]), "finish_reason": "stop"} for p in prompts]
    live = states
    for turn in range(max_turns):
        if turn > 0:
            asks = simulator.complete([[{"role": "user", "content": USER_SIMULATOR_PROMPT.format(conversation=render(s["messages"]))}] for s in live], sampling)
            asked = []
            for s, (ask,) in zip(live, asks):
                if ask.text and ask.text.strip():  # no next question: the conversation ends here
                    s["messages"].append({"role": "user", "content": ask.text.strip()})
                    asked.append(s)
            live = asked
        answers = teacher.complete([s["messages"] for s in live], sampling)
        still = []
        for s, (answer,) in zip(live, answers):
            if answer.finish_reason == "stop" and (answer.text or "").strip():
                s["messages"].append({"role": "assistant", "content": answer.text})
                still.append(s)
            elif turn > 0:
                s["messages"].pop()  # a later turn failed: keep the conversation up to the last answer
            else:
                s["finish_reason"] = "empty" if answer.finish_reason == "stop" else answer.finish_reason
        live = still
    return states


def build(args: TeacherSFTArgs) -> dict:
    return {
        "teacher": make_teacher(args.teacher, "teacher"),
        "user_simulator": make_teacher(args.user_simulator, "user_simulator") if args.max_turns > 1 else None,
    }


def teacher_name(spec: dict) -> str:
    """The name a teacher built from `spec` carries (and writes into each row)."""
    return spec.get("name") or spec.get("model") or spec["backend"]


def usage(teachers: dict) -> dict:
    return {name: dict(t.usage) for name, t in teachers.items() if hasattr(t, "usage")}


def work(args: TeacherSFTArgs, teachers: dict, chunk: list[dict]) -> tuple[list[dict], int]:
    """The rows of a chunk of prompts, failed ones included (a rerun skips them), and how many failed."""
    sampling = Sampling(n=1, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    rows = []
    for prompt, state in zip(chunk, converse(teachers["teacher"], teachers["user_simulator"], chunk, sampling, args.max_turns)):
        row = {"prompt_id": prompt["prompt_id"], "prompt": prompt["messages"][-1]["content"], "messages": state["messages"], "teacher": teachers["teacher"].name}
        if "category" in prompt:
            row["category"] = prompt["category"]
        rows.append({**row, "finish_reason": state["finish_reason"]})
    return rows, sum(r["finish_reason"] != "stop" for r in rows)


def run(args: TeacherSFTArgs):
    started = time.time()
    prompts, dropped = load_prompts(args)
    store = ShardStore(args.output_dir)
    done = store.done_ids()
    todo = [p for p in prompts if p["prompt_id"] not in done]
    with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="teacher-sft", unit="prompt") as bar:
        _, spent = run_chunks(args, todo, store, bar, build, work, usage, "failed")
    kept, counts = [], {"prompts": len(prompts), "failed": 0, "truncated": 0, "empty": 0}
    for row in store.rows():
        reason = row.pop("finish_reason")
        if reason == "stop":
            kept.append(row)
        else:
            counts[{"error": "failed", "length": "truncated", "empty": "empty"}[reason]] += 1
    counts["rows"] = len(kept)
    counts["duplicates_dropped"], counts["contaminated_dropped"] = len(dropped["duplicates"]), len(dropped["contaminated"])
    write_jsonl(kept, f"{args.output_dir}/{DATA_FILE}")
    write_manifest(args.output_dir, "teacher-sft", started, counts=counts, dropped_ids=dropped, teacher=teacher_name(args.teacher), usage=spent, engine=args.engine)
    return counts
