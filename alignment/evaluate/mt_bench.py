"""Chat benchmarks in the MT-Bench format: two-turn answers, single-answer grading, pairwise win rate.

Files are FastChat's: `question.jsonl` ({question_id, category, turns}), answer files ({question_id,
answer_id, model_id, choices: [{index, turns}], tstamp}) for model answers and reference answers, and
`judge_prompts.jsonl` ({name, type, system_prompt, prompt_template, output_format, ...}). Our own judge
prompts (same names and placeholders, our wording) are used when no judge-prompt file is given.

Any category is read (vicuna_bench's generic, fermi, ... as well as MT-Bench's eight); `categories`
restricts them only when given. Turn 2 sees the model's own turn-1 answer. Sampling temperature is set
per category as FastChat does, 0.7 for a category it has no entry for.
Grading is reference-guided for math, reasoning and coding when a reference answer exists. Pairwise
verdicts are judged in both orders and a disagreement is a tie. Verdicts that cannot be parsed are
counted and excluded, never guessed; the length-controlled win rate is AlpacaEval 2's model
(`length_control`). Judgments are also written in FastChat's `model_judgment` format, which its
show_result.py reads. They are cached by (judge, prompt), so a rerun pays nothing twice.
"""

import hashlib
import json
import random
import re
import time
from pathlib import Path

from alignment.data import read_rows
from alignment.errors import SmoeError
from alignment.evaluate.length_control import length_controlled_win_rate
from teacher_data import skills
from teacher_data.judge import SWAP, combine_orders, parse_rating, parse_verdict
from teacher_data.teachers import Sampling, make_teacher

CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7  # FastChat's, for categories missing above
NEEDS_REFERENCE = {"math", "reasoning", "coding"}

PLACEHOLDERS = {
    "single-v1": {"question", "answer"},
    "single-math-v1": {"question", "answer", "ref_answer_1"},
    "single-v1-multi-turn": {"question_1", "answer_1", "question_2", "answer_2"},
    "single-math-v1-multi-turn": {"question_1", "answer_1", "question_2", "answer_2", "ref_answer_1", "ref_answer_2"},
    "pair-v2": {"question", "answer_a", "answer_b"},
    "pair-math-v1": {"question", "answer_a", "answer_b", "ref_answer_1"},
    "pair-v2-multi-turn": {"question_1", "question_2", "answer_a_1", "answer_a_2", "answer_b_1", "answer_b_2"},
    "pair-math-v1-multi-turn": {"question_1", "question_2", "answer_a_1", "answer_a_2", "answer_b_1", "answer_b_2", "ref_answer_1", "ref_answer_2"},
}

_SINGLE_SYSTEM = "You grade the replies of AI assistants fairly and strictly. Rate helpfulness, relevance, accuracy, depth and clarity; be brief in your reasoning, then give the rating from 1 to 10 exactly as [[N]], e.g. Rating: [[6]]."
_PAIR_SYSTEM = "You compare the replies of two AI assistants fairly. Ignore the order in which they are shown, their length and the assistants' names; judge which follows the user's instructions and answers better. Be brief, then end with exactly one verdict: [[A]] if A is better, [[B]] if B is better, [[C]] for a tie."
_REF = "\n\n[Reference answer]\n{ref_answer_1}"
DEFAULT_PROMPTS = {
    "single-v1": (_SINGLE_SYSTEM, "[Question]\n{question}\n\n[Assistant's answer]\n{answer}"),
    "single-math-v1": (_SINGLE_SYSTEM + " Compare with the reference answer; a wrong result is a low rating.", "[Question]\n{question}" + _REF + "\n\n[Assistant's answer]\n{answer}"),
    "single-v1-multi-turn": (_SINGLE_SYSTEM + " Grade only the second answer.", "[User]\n{question_1}\n\n[Assistant]\n{answer_1}\n\n[User]\n{question_2}\n\n[Assistant, to be graded]\n{answer_2}"),
    "single-math-v1-multi-turn": (
        _SINGLE_SYSTEM + " Grade only the second answer, against the reference answers.",
        "[Reference answers]\n1: {ref_answer_1}\n2: {ref_answer_2}\n\n[User]\n{question_1}\n\n[Assistant]\n{answer_1}\n\n[User]\n{question_2}\n\n[Assistant, to be graded]\n{answer_2}",
    ),
    "pair-v2": (_PAIR_SYSTEM, "[Question]\n{question}\n\n[Assistant A]\n{answer_a}\n\n[Assistant B]\n{answer_b}"),
    "pair-math-v1": (_PAIR_SYSTEM + " Check both against the reference answer.", "[Question]\n{question}" + _REF + "\n\n[Assistant A]\n{answer_a}\n\n[Assistant B]\n{answer_b}"),
    "pair-v2-multi-turn": (
        _PAIR_SYSTEM + " Judge the second answers.",
        "[Assistant A's conversation]\nUser: {question_1}\nA: {answer_a_1}\nUser: {question_2}\nA: {answer_a_2}\n\n[Assistant B's conversation]\nUser: {question_1}\nB: {answer_b_1}\nUser: {question_2}\nB: {answer_b_2}",
    ),
    "pair-math-v1-multi-turn": (
        _PAIR_SYSTEM + " Judge the second answers against the reference answers.",
        "[Reference answers]\n1: {ref_answer_1}\n2: {ref_answer_2}\n\n[Assistant A's conversation]\nUser: {question_1}\nA: {answer_a_1}\nUser: {question_2}\nA: {answer_a_2}\n\n[Assistant B's conversation]\nUser: {question_1}\nB: {answer_b_1}\nUser: {question_2}\nB: {answer_b_2}",
    ),
}



def skills_questions(split: str, per_skill: int, seed: int) -> list[dict]:
    """Two-turn questions in MT-Bench format from skills problems (two of the same skill per question)."""
    rows = skills.make_prompts(split, 2 * per_skill, seed)
    return [
        {"question_id": i + 1, "category": a["category"], "turns": [a["messages"][0]["content"], b["messages"][0]["content"]]}
        for i, (a, b) in enumerate(zip(rows[0::2], rows[1::2]))
    ]


def load_questions(path: str, categories: list[str] | None = None, per_skill: int = 25, seed: int = 0) -> list[dict]:
    """A question.jsonl file, or `skills:<split>` for two-turn skills questions checked by the skills judge."""
    if path.startswith("skills:"):
        return skills_questions(path.split(":", 1)[1], per_skill, seed)
    questions, seen = [], set()
    for i, row in enumerate(read_rows(path), 1):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise SmoeError(f"row {i}: `turns` must be a non-empty list of non-empty strings", path, "give each question its user turns")
        if not isinstance(row.get("category"), str) or not row["category"]:
            raise SmoeError(f"row {i}: no category", path, "give every question a category (any name; FastChat's temperature applies where it has one)")
        if categories and row["category"] not in categories:
            raise SmoeError(f"row {i}: category {row['category']!r} is not under `categories`", path, f"use one of {sorted(categories)}, or drop `categories` to accept any")
        if "question_id" not in row or row["question_id"] in seen:
            raise SmoeError(f"row {i}: missing or repeated question_id", path, "give every question a unique question_id")
        seen.add(row["question_id"])
        questions.append(row)
    return questions


def load_answer_file(path: str, question_ids: set, require_all: bool) -> dict:
    """{question_id: [turn answers]} from a FastChat answer file; refuses answers to other questions."""
    answers = {}
    for i, row in enumerate(read_rows(path), 1):
        try:
            qid, turns = row["question_id"], row["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise SmoeError(f"row {i} is not in FastChat's answer format", path, "rows need question_id and choices[0].turns") from None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise SmoeError(f"row {i}: choices[0].turns must be a non-empty list of strings", path, "write each turn's answer as one string")
        if qid not in question_ids:
            raise SmoeError(f"row {i}: question_id {qid} is not in the question file", path, "use the answer file made for these questions")
        answers[qid] = turns
    missing = question_ids - set(answers)
    if require_all and missing:
        raise SmoeError(f"no answer for questions {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}", path, "use the answer file made for these questions")
    return answers


def load_judge_prompts(path: str | None) -> dict:
    """name -> (system, template), checked for the placeholders each name needs."""
    if path is None:
        return dict(DEFAULT_PROMPTS)
    prompts = dict(DEFAULT_PROMPTS)
    for i, row in enumerate(read_rows(path), 1):
        name, template = row.get("name"), row.get("prompt_template", "")
        if name not in PLACEHOLDERS:
            continue
        if not isinstance(template, str) or not isinstance(row.get("system_prompt", ""), str):
            raise SmoeError(f"row {i}: judge prompt {name!r} needs string prompt_template and system_prompt", path, "write each as one string")
        missing = PLACEHOLDERS[name] - set(re.findall(r"\{(\w+)\}", template))
        if missing:
            raise SmoeError(f"row {i}: judge prompt {name!r} lacks the placeholders {sorted(missing)}", path, "add them to prompt_template")
        prompts[name] = (row.get("system_prompt", ""), template)
    return prompts


def answer_questions(spec: dict, questions: list[dict], max_new_tokens: int, seed: int, temperature: float | None = None) -> dict:
    """{question_id: [answer per turn]}; turn k sees the model's own earlier answers. One `temperature`
    for every question, or FastChat's per category when it is None."""
    teacher = make_teacher(spec, f"model {spec.get('name')}")
    histories = {q["question_id"]: [] for q in questions}

    def temperature_of(q):
        return CATEGORY_TEMPERATURE.get(q["category"], DEFAULT_TEMPERATURE) if temperature is None else temperature

    for turn in range(max(len(q["turns"]) for q in questions)):
        asked = [q for q in questions if turn < len(q["turns"])]
        for t in sorted({temperature_of(q) for q in asked}):
            group = [q for q in asked if temperature_of(q) == t]
            for q in group:
                histories[q["question_id"]].append({"role": "user", "content": q["turns"][turn]})
            out = teacher.complete([histories[q["question_id"]] for q in group], Sampling(temperature=t, max_new_tokens=max_new_tokens, seed=seed))
            for q, (answer,) in zip(group, out):
                histories[q["question_id"]].append({"role": "assistant", "content": answer.text or ""})
    return {qid: [m["content"] for m in h if m["role"] == "assistant"] for qid, h in histories.items()}


def answer_rows(model_id: str, answers: dict) -> list[dict]:
    return [
        {"question_id": qid, "answer_id": hashlib.sha1(f"{model_id}:{qid}".encode()).hexdigest()[:22], "model_id": model_id, "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()}
        for qid, turns in answers.items()
    ]


class CachedJudge:
    """A judge backend with a judgment cache keyed by (judge, system prompt, prompt), kept as JSONL."""

    def __init__(self, spec: dict, cache_path: Path, max_new_tokens: int):
        self.spec = dict(spec)
        self.exact = self.spec.get("backend") == "skills"
        self.teacher = None if self.exact else make_teacher(self.spec, "judge")
        self.name = "skills" if self.exact else self.teacher.name
        self.cache_path, self.max_new_tokens = cache_path, max_new_tokens
        self.cache = {}
        if cache_path.is_file():
            for line in cache_path.open():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut off by a crash: that judgment is asked again
                    continue
                self.cache[row["key"]] = row["output"]
        self.calls = 0

    def key(self, system: str, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.name, system, prompt]).encode()).hexdigest()

    def ask(self, requests: list[tuple[str, str]]) -> list[str | None]:
        """(system, prompt) pairs -> the judge's texts; only what is not cached is sent."""
        keys = [self.key(s, p) for s, p in requests]
        todo = sorted({k: r for k, r in zip(keys, requests) if k not in self.cache}.items())
        if todo:
            conversations = [([{"role": "system", "content": s}] if s else []) + [{"role": "user", "content": p}] for _, (s, p) in todo]
            out = self.teacher.complete(conversations, Sampling(temperature=0.0, max_new_tokens=self.max_new_tokens))
            self.calls += len(todo)
            with self.cache_path.open("a") as f:
                for (key, _), (answer,) in zip(todo, out):
                    if answer.text is not None:  # a failed request is not cached: a rerun retries it
                        self.cache[key] = answer.text
                        f.write(json.dumps({"key": key, "output": answer.text}) + "\n")
        return [self.cache.get(k) for k in keys]


def exact_rating(question: str, answer: str) -> float | None:
    """The skills judge as an MT-Bench grader: checks skills problems exactly, 0-10."""
    return skills.judge([{"role": "user", "content": question}], answer).score


def fill(prompts: dict, name: str, **values) -> tuple[str, str]:
    system, template = prompts[name]
    return system, template.format(**values)


def single_requests(prompts, question, answers, reference) -> list[tuple[int, str, tuple[str, str]]]:
    """(turn, prompt name, (system, prompt)) for each turn of one question."""
    math = "math-" if question["category"] in NEEDS_REFERENCE and reference else ""
    refs = {f"ref_answer_{k + 1}": r for k, r in enumerate(reference or [])}
    out = [(1, f"single-{math}v1", fill(prompts, f"single-{math}v1", question=question["turns"][0], answer=answers[0], **refs))]
    if len(question["turns"]) > 1:
        name = f"single-{math}v1-multi-turn"
        out.append((2, name, fill(prompts, name, question_1=question["turns"][0], question_2=question["turns"][1], answer_1=answers[0], answer_2=answers[1], **refs)))
    return out


def pair_requests(prompts, question, a, b, reference) -> list[tuple[int, str, tuple[str, str]]]:
    math = "math-" if question["category"] in NEEDS_REFERENCE and reference else ""
    refs = {f"ref_answer_{k + 1}": r for k, r in enumerate(reference or [])}
    version = "v1" if math else "v2"
    out = [(1, f"pair-{math}{version}", fill(prompts, f"pair-{math}{version}", question=question["turns"][0], answer_a=a[0], answer_b=b[0], **refs))]
    if len(question["turns"]) > 1:
        name = f"pair-{math}{version}-multi-turn"
        out.append((2, name, fill(prompts, name, question_1=question["turns"][0], question_2=question["turns"][1], answer_a_1=a[0], answer_a_2=a[1], answer_b_1=b[0], answer_b_2=b[1], **refs)))
    return out


def bootstrap_ci(outcomes: list[float], samples: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile interval of the mean of per-question outcomes (win 1, tie 0.5, loss 0); None without any."""
    if not outcomes:
        return None
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(outcomes, k=len(outcomes))) / len(outcomes) for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def model_spec(entry: dict) -> dict:
    """A local model or adapter ({name, path}) runs through the hf backend; anything else names its backend."""
    spec = {k: v for k, v in entry.items() if k != "name"}
    return {"backend": "hf", "model": spec.pop("path"), **spec} if "path" in spec else spec


def grade_single(judge: CachedJudge, prompts, questions, answers, references) -> list[dict]:
    jobs = [(q, turn, name, request) for q in questions for turn, name, request in single_requests(prompts, q, answers[q["question_id"]], references.get(q["question_id"]))]
    if judge.exact:
        texts = [None] * len(jobs)
        ratings = [exact_rating(q["turns"][turn - 1], answers[q["question_id"]][turn - 1]) for q, turn, _, _ in jobs]
    else:
        texts = judge.ask([request for *_, request in jobs])
        ratings = [parse_rating(t) for t in texts]
    return [
        {"question_id": q["question_id"], "category": q["category"], "turn": turn, "judge_prompt": name, "user_prompt": request[1], "rating": rating, "judgment": text}
        for (q, turn, name, request), rating, text in zip(jobs, ratings, texts)
    ]


def grade_pairs(judge: CachedJudge, prompts, questions, mine, baseline, references) -> list[dict]:
    """Each (question, turn) judged with the model as A and again as B; outcome 1 win, 0.5 tie, 0 loss."""
    rows = []
    for q in questions:
        a, b, ref = mine[q["question_id"]], baseline[q["question_id"]], references.get(q["question_id"])
        for (turn, name, first), (_, _, second) in zip(pair_requests(prompts, q, a, b, ref), pair_requests(prompts, q, b, a, ref)):
            if judge.exact:  # the exact judge has no order to be biased by: one comparison, stated both ways
                mine_score, base_score = exact_rating(q["turns"][turn - 1], a[turn - 1]), exact_rating(q["turns"][turn - 1], b[turn - 1])
                verdict = None if None in (mine_score, base_score) else "A" if mine_score > base_score else "B" if base_score > mine_score else "C"
                verdicts, texts = (verdict, SWAP[verdict]), ("exact", "exact")
            else:
                texts = tuple(judge.ask([first, second]))
                verdicts = tuple(parse_verdict(t) for t in texts)
            rows.append({"question_id": q["question_id"], "category": q["category"], "turn": turn, "judge_prompt": name, "user_prompts": [first[1], second[1]], "verdicts": verdicts, "judgment": list(texts), "length_diff": len(a[turn - 1]) - len(b[turn - 1])})
    for row in rows:  # unparsed: None, counted and excluded; the two orders disagreeing: a tie
        row["outcome"] = {"A": 1.0, "B": 0.0, "C": 0.5, None: None}[combine_orders(*row["verdicts"])]
    return rows


def summarise_single(rows: list[dict]) -> dict:
    rated = [r for r in rows if r["rating"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "turn_1": mean([r["rating"] for r in rated if r["turn"] == 1]),
        "turn_2": mean([r["rating"] for r in rated if r["turn"] == 2]),
        "overall": mean([r["rating"] for r in rated]),
        "per_category": {c: mean([r["rating"] for r in rated if r["category"] == c]) for c in sorted({r["category"] for r in rows})},
        "judged": len(rated),
        "judge_failures": len(rows) - len(rated),
    }


def summarise_pairs(rows: list[dict], samples: int, seed: int, length_controlled: bool) -> dict:
    judged = [r for r in rows if r["outcome"] is not None]
    outcomes = [r["outcome"] for r in judged]
    summary = {
        "win": sum(o == 1.0 for o in outcomes),
        "tie": sum(o == 0.5 for o in outcomes),
        "loss": sum(o == 0.0 for o in outcomes),
        "win_rate": sum(outcomes) / len(outcomes) if outcomes else None,
        "win_rate_ci95": bootstrap_ci(outcomes, samples, seed),
        "judge_failures": len(rows) - len(judged),
    }
    if length_controlled:
        summary["length_controlled_win_rate"] = length_controlled_win_rate([r["outcome"] for r in rows], [r["length_diff"] for r in rows])
    return summary


# FastChat's model_judgment rows: an unparsed score is -1, an unparsed verdict "error" (show_result.py drops both)
G1_WINNER = {"A": "model_1", "B": "model_2", "C": "tie", None: "error"}
G2_WINNER = {"A": "model_2", "B": "model_1", "C": "tie", None: "error"}  # the second game shows the pair swapped


def judge_file_stem(judge_name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", judge_name).strip("_") or "judge"


def fastchat_single_rows(model: str, judge_name: str, rows: list[dict]) -> list[dict]:
    return [
        {"question_id": r["question_id"], "model": model, "judge": [judge_name, r["judge_prompt"]], "user_prompt": r["user_prompt"],
         "judgment": r["judgment"] or "", "score": -1 if r["rating"] is None else r["rating"], "turn": r["turn"], "tstamp": time.time()}
        for r in rows
    ]


def fastchat_pair_rows(model: str, baseline: str, judge_name: str, rows: list[dict]) -> list[dict]:
    return [
        {"question_id": r["question_id"], "model_1": model, "model_2": baseline, "g1_winner": G1_WINNER[r["verdicts"][0]], "g2_winner": G2_WINNER[r["verdicts"][1]],
         "judge": [judge_name, r["judge_prompt"]], "g1_user_prompt": r["user_prompts"][0], "g1_judgment": r["judgment"][0] or "",
         "g2_user_prompt": r["user_prompts"][1], "g2_judgment": r["judgment"][1] or "", "turn": r["turn"], "tstamp": time.time()}
        for r in rows
    ]
