"""teacher-prefs: policies answer prompts, a judge scores the answers, the scores become preference pairs.

usage: smoe-align teacher-prefs --config recipes/tiny/teacher_prefs.yaml [--key value ...]

Every judged prompt is kept in shards (all completions with score and judgment), so a rerun skips
what was judged. Binarization runs at the end over all of them and writes `train.jsonl` in the
ultrafeedback_binarized schema. Sampling and judging run in this process, or on Ray Data workers with
`engine: ray` (teacher_data.engine, teacher_data.ray_engine).
"""

import random
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from alignment.configs import build as build_classes, field_names
from alignment.data import DATA_FILE
from alignment.errors import SmoeError
from alignment.manifest import write_manifest
from teacher_data.engine import EngineArgs, run_chunks
from teacher_data.judge import make_judge
from teacher_data.prompts import PromptSource, load_prompts
from teacher_data.store import ShardStore, write_jsonl
from teacher_data.teachers import Sampling, make_teacher


def best_vs_random_lower(scored: list[dict], rng: random.Random):
    """Zephyr: the best completion against a random one scored lower."""
    best = max(c["score"] for c in scored)
    lower = [c for c in scored if c["score"] < best]
    if not lower:
        return None
    return rng.choice([c for c in scored if c["score"] == best]), rng.choice(lower)


def best_vs_worst(scored: list[dict], rng: random.Random):
    best, worst = max(c["score"] for c in scored), min(c["score"] for c in scored)
    if best == worst:
        return None
    return rng.choice([c for c in scored if c["score"] == best]), rng.choice([c for c in scored if c["score"] == worst])


BINARIZE = {"best_vs_random_lower": best_vs_random_lower, "best_vs_worst": best_vs_worst}


@dataclass
class TeacherPrefsArgs(PromptSource, EngineArgs):
    output_dir: str = "runs/tiny/pref_data"
    prompts: str = "skills:prefs"
    # each policy: {name, backend, ...backend arguments, num_samples, temperature, top_p, max_new_tokens}
    policies: list = field(default_factory=list)
    # {backend: skills} checks exactly; any teacher backend judges with our rubric: mode score (1-10)
    # or pairwise (every pair of completions, both orders; a completion's score is its wins, ties half)
    judge: dict = field(default_factory=lambda: {"backend": "skills"})
    binarize: str = "best_vs_random_lower"
    min_score_margin: float = 0.0
    shard_size: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if self.binarize not in BINARIZE:
            raise ValueError(f"binarize={self.binarize!r}; choose one of {sorted(BINARIZE)}")
        if not self.policies:
            raise ValueError("policies is empty; name at least one policy that answers the prompts")
        if not all(isinstance(p, dict) for p in self.policies):
            raise ValueError("each entry of policies is a mapping {name, backend, ...}")
        if self.judge.get("mode", "score") not in ("score", "pairwise") or (self.judge.get("backend") == "skills" and self.judge.get("mode", "score") != "score"):
            raise ValueError("judge.mode is score or pairwise (the skills judge only scores)")


@dataclass
class PolicySampling:
    """The sampling keys of a policy entry, checked like recipe keys (type and range)."""

    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


def _sampling(policy: dict, seed: int, where: str) -> Sampling:
    (s,) = build_classes({k: v for k, v in policy.items() if k in field_names(PolicySampling)}, (PolicySampling,), where)
    return Sampling(n=s.num_samples, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=seed)


def judge_chunk(judge, mode: str, prompts: list[dict], completions: list[list[dict]]) -> int:
    """Fill in score and judgment of every completion; returns how many verdicts could not be parsed."""
    answered = [(p, c) for p, slot in zip(prompts, completions) for c in slot if c["messages"]]
    for _, c in ((p, c) for p, slot in zip(prompts, completions) for c in slot if not c["messages"]):
        c["score"], c["judgment"] = None, "no answer (the policy failed)"
    if mode == "score":
        verdicts = judge.score([(p["messages"], c["messages"][-1]["content"]) for p, c in answered])
        for (_, c), v in zip(answered, verdicts):
            c["score"], c["judgment"] = v.score, v.judgment
        return sum(v.score is None for v in verdicts)
    pairs = []
    for p, slot in zip(prompts, completions):
        live = [c for c in slot if c["messages"]]
        for c in live:
            c["score"], c["judgment"] = 0.0, ""
        pairs += [(p, a, b) for i, a in enumerate(live) for b in live[i + 1 :]]
    results = judge.compare([(p["messages"], a["messages"][-1]["content"], b["messages"][-1]["content"]) for p, a, b in pairs])
    unparsed = 0
    for (_, a, b), (verdict, text) in zip(pairs, results):
        if verdict is None:
            unparsed += 1
            continue
        a["score"] += {"A": 1.0, "B": 0.0, "C": 0.5}[verdict]
        b["score"] += {"A": 0.0, "B": 1.0, "C": 0.5}[verdict]
        a["judgment"] += f"[vs {b['policy']}: {verdict}] "
    return unparsed


def binarize_row(row: dict, strategy: str, min_margin: float, seed: int) -> dict | None:
    scored = [c for c in row["completions"] if c["score"] is not None and c["messages"]]
    if not scored:
        return None
    pair = BINARIZE[strategy](scored, random.Random(f"{seed}:{row['prompt_id']}"))
    if pair is None or pair[0]["score"] - pair[1]["score"] < min_margin:
        return None
    chosen, rejected = pair
    return {
        "prompt_id": row["prompt_id"],
        "prompt": row["prompt"],
        "chosen": row["messages"] + chosen["messages"],
        "rejected": row["messages"] + rejected["messages"],
        "score_chosen": chosen["score"],
        "score_rejected": rejected["score"],
        "category": row["category"],
        "completions": row["completions"],
    }


def build_policies(specs: list[dict], seed: int) -> list[tuple]:
    """(name, backend, sampling) for each policy of the recipe."""
    policies = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        name, sampling = spec.pop("name", f"policy{i}"), _sampling(spec, seed + i, f"policies[{i}]")
        for key in field_names(PolicySampling):
            spec.pop(key, None)
        policies.append((name, make_teacher(spec, f"policies[{i}]"), sampling))
    return policies


def sample(policies: list[tuple], chunk: list[dict]) -> list[list[dict]]:
    """Every policy's samples for every prompt of the chunk; a failed sample has no messages."""
    completions = [[] for _ in chunk]
    for name, policy, sampling in policies:
        for slot, samples in zip(completions, policy.complete([p["messages"] for p in chunk], sampling)):
            for s in samples:
                messages = [{"role": "assistant", "content": s.text}] if s.text is not None else []
                slot.append({"policy": name, "messages": messages, "finish_reason": s.finish_reason})
    return completions


def build(args: TeacherPrefsArgs) -> dict:
    return {"policies": build_policies(args.policies, args.seed), "judge": make_judge(args.judge, "judge")}


def usage(state: dict) -> dict:
    found = {name: dict(t.usage) for name, t, _ in state["policies"] if hasattr(t, "usage")}
    if hasattr(getattr(state["judge"], "teacher", None), "usage"):
        found["judge"] = dict(state["judge"].teacher.usage)
    return found


def work(args: TeacherPrefsArgs, state: dict, chunk: list[dict]) -> tuple[list[dict], int]:
    """Every prompt of the chunk sampled and judged, and how many verdicts could not be parsed."""
    completions = sample(state["policies"], chunk)
    unparsed = judge_chunk(state["judge"], args.judge.get("mode", "score"), chunk, completions)
    rows = [{"prompt_id": p["prompt_id"], "prompt": p["messages"][-1]["content"], "messages": p["messages"], "category": p.get("category"), "completions": c} for p, c in zip(chunk, completions)]
    return rows, unparsed


def run(args: TeacherPrefsArgs):
    started = time.time()
    prompts, dropped = load_prompts(args)
    store = ShardStore(args.output_dir)
    done = store.done_ids()
    todo = [p for p in prompts if p["prompt_id"] not in done]
    with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="teacher-prefs", unit="prompt") as bar:
        unparsed, spent = run_chunks(args, todo, store, bar, build, work, usage, "unparsed_verdicts")
    pairs, judged, failed_samples = [], 0, 0
    for row in store.rows():
        judged += 1
        failed_samples += sum(not c["messages"] for c in row["completions"])
        pair = binarize_row(row, args.binarize, args.min_score_margin, args.seed)
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise SmoeError("no preference pair was formed: every prompt's completions tied", args.output_dir, "sample more completions per prompt (num_samples) or at a higher temperature")
    counts = {"prompts": len(prompts), "judged": judged, "pairs": len(pairs), "ties_dropped": judged - len(pairs), "failed_samples": failed_samples, "unparsed_verdicts_this_run": unparsed}
    counts["duplicates_dropped"], counts["contaminated_dropped"] = len(dropped["duplicates"]), len(dropped["contaminated"])
    write_jsonl(pairs, f"{args.output_dir}/{DATA_FILE}")
    write_manifest(args.output_dir, "teacher-prefs", started, counts=counts, dropped_ids=dropped, usage=spent, engine=args.engine)
    return counts
