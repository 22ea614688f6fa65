"""Judges: a teacher plus a prompt and a parser. Verdicts that cannot be parsed are counted, never guessed.

Two modes over any teacher backend:
  score     rate one answer 1-10 with our rubric (instruction following, helpfulness, truthfulness,
            honesty); the judge must end with `Rating: [[N]]`.
  pairwise  compare two answers; the judge must end with `[[A]]`, `[[B]]` or `[[C]]` (a tie). Each
            pair is judged in both orders and a disagreement counts as a tie.
The `skills` judge checks skills problems exactly and needs no teacher.
"""

import re
from dataclasses import dataclass

from teacher_data import skills
from teacher_data.teachers import Sampling, make_teacher

SCORE_PROMPT = """You are grading one reply of an AI assistant. Judge it on four things:
- instruction following: does it do what the user asked, in the form asked?
- helpfulness: is it useful, complete and to the point?
- truthfulness: is every claim correct?
- honesty: does it admit what it does not know instead of inventing?
Think briefly, then end with your rating from 1 (useless) to 10 (excellent) written exactly as
Rating: [[N]]

[Conversation]
{question}

[Reply to grade]
{answer}"""

PAIRWISE_PROMPT = """You are comparing two replies of AI assistants to the same conversation. Prefer the reply
that follows the instructions better and is more helpful, truthful and honest; ignore length and
order. Think briefly, then end with exactly one verdict: [[A]] if reply A is better, [[B]] if reply B
is better, [[C]] for a tie.

[Conversation]
{question}

[Reply A]
{answer_a}

[Reply B]
{answer_b}"""

RATINGS = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))  # [[N]], else FastChat's fallback [N]
VERDICT_RE = re.compile(r"\[\[([ABC])\]\]")


def render(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def parse_rating(text: str | None) -> float | None:
    """The last `[[N]]` (else `[N]`) in the judge's text, if it is a rating between 0 and 10."""
    for pattern in RATINGS:
        found = pattern.findall(text or "")
        if found:
            value = float(found[-1])
            return value if 0 <= value <= 10 else None
    return None


SWAP = {"A": "B", "B": "A", "C": "C", None: None}


def combine_orders(first: str | None, second: str | None) -> str | None:
    """Verdict on (a, b) from a judge asked as (a, b) and then as (b, a): a disagreement is a tie 'C'."""
    if first is None or second is None:
        return None
    return first if first == SWAP[second] else "C"


def parse_verdict(text: str | None) -> str | None:
    found = VERDICT_RE.findall(text or "")
    return found[-1] if found else None


@dataclass
class Verdict:
    score: float | None  # None: not parsed (counted as a judge failure)
    judgment: str


class SkillsJudge:
    name = "skills"

    def score(self, items: list[tuple[list[dict], str]]) -> list[Verdict]:
        out = []
        for messages, answer in items:
            v = skills.judge(messages, answer)
            out.append(Verdict(v.score, v.judgment))
        return out


class TeacherJudge:
    """An LLM judge over any teacher backend, greedy."""

    def __init__(self, teacher, max_new_tokens: int = 512):
        self.teacher, self.name = teacher, f"judge:{teacher.name}"
        self.sampling = Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens)

    def _ask(self, prompts: list[str]) -> list[str | None]:
        answers = self.teacher.complete([[{"role": "user", "content": p}] for p in prompts], self.sampling)
        return [row[0].text for row in answers]

    def score(self, items: list[tuple[list[dict], str]]) -> list[Verdict]:
        texts = self._ask([SCORE_PROMPT.format(question=render(m), answer=a) for m, a in items])
        return [Verdict(parse_rating(t), t or "") for t in texts]

    def compare(self, items: list[tuple[list[dict], str, str]]) -> list[tuple[str | None, str]]:
        """For each (messages, a, b): 'A', 'B', 'C' (tie, or the two orders disagree) or None (unparsed)."""
        prompts = []
        for m, a, b in items:
            prompts.append(PAIRWISE_PROMPT.format(question=render(m), answer_a=a, answer_b=b))
            prompts.append(PAIRWISE_PROMPT.format(question=render(m), answer_a=b, answer_b=a))
        texts = self._ask(prompts)
        out = []
        for i in range(0, len(texts), 2):
            verdict = combine_orders(parse_verdict(texts[i]), parse_verdict(texts[i + 1]))
            out.append((verdict, f"{texts[i]}\n---\n{texts[i + 1]}"))
        return out


def make_judge(spec: dict, where: str):
    spec = dict(spec)
    if spec.get("backend") == "skills":
        return SkillsJudge()
    max_new_tokens = spec.pop("max_new_tokens", 512)
    spec.pop("mode", None)
    return TeacherJudge(make_teacher(spec, where), max_new_tokens)
