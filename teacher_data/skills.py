"""Synthetic skills with checkable answers: the embedded default teacher and judge.

Four skills on short words and digit strings: `reverse` a word, `sort` the digits of a number,
`shift` every letter one step on in the alphabet (z wraps to a), `upper`-case a word. Every prompt is one short user turn (`reverse kqzbm`); every answer is one
line, `Answer: X`. Terse prompts are deliberate: a 2M-parameter model learns the skills from them in
about a thousand steps, and not from wordy ones.

The skills teacher is honestly imperfect, as a real teacher is: it has a systematic blind spot per skill
and falls into it with probability `error_rate` whenever the blind spot applies:
  sort     swaps the last pair of differing adjacent digits (1359 -> 1395)
  shift    leaves the last letter unshifted (abc -> bcc)
  upper    leaves the first letter lower-case (abcd -> aBCD)
  reverse  never wrong
The skills judge checks exactly, so it knows more than the teacher's data: that is where a preference
stage can gain over distilled SFT (see FINDINGS: with a perfect teacher DPO gained nothing).

Prompts are split into `heldout`, `prefs` and `sft` by a hash of the problem, so no problem is ever in
two splits, whatever the seed or the number of prompts asked for.
"""

import hashlib
import random
import re
import string
from dataclasses import dataclass

ANSWER_FORMAT = "Answer: {}"
ANSWER_RE = re.compile(r"^Answer: ([A-Za-z0-9]+)$")
SPLIT_BUCKETS = {"heldout": range(0, 2), "prefs": range(2, 6), "sft": range(6, 20)}  # of 20


@dataclass(frozen=True)
class Skill:
    name: str
    phrasings: tuple[str, ...]  # each has the placeholders of `make`'s fields, and a regex twin below
    patterns: tuple[re.Pattern, ...]

    def parse(self, text: str) -> dict | None:
        for pattern in self.patterns:
            m = pattern.fullmatch(text.strip())
            if m:
                return m.groupdict()
        return None


def _pattern(phrasing: str) -> re.Pattern:
    escaped = re.escape(phrasing)
    for name in ("word", "digits"):
        escaped = escaped.replace(re.escape("{" + name + "}"), f"(?P<{name}>[a-z0-9]+)")
    return re.compile(escaped)


def _skill(name, *phrasings):
    return Skill(name, phrasings, tuple(_pattern(p) for p in phrasings))


SKILLS = {
    s.name: s
    for s in (
        _skill("reverse", "reverse {word}"),
        _skill("sort", "sort {digits}"),
        _skill("shift", "shift {word}"),
        _skill("upper", "upper {word}"),
    )
}


def true_answer(skill: str, fields: dict) -> str:
    if skill == "reverse":
        return fields["word"][::-1]
    if skill == "sort":
        return "".join(sorted(fields["digits"]))
    if skill == "shift":
        return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in fields["word"])
    if skill == "upper":
        return fields["word"].upper()
    raise KeyError(skill)


def blind_spot_answer(skill: str, fields: dict) -> str | None:
    """The teacher's systematic mistake for this problem, or None where its blind spot does not apply."""
    if skill == "sort":
        s = list(true_answer(skill, fields))
        differing = [i for i in range(len(s) - 1) if s[i] != s[i + 1]]
        if not differing:
            return None
        i = differing[-1]
        s[i], s[i + 1] = s[i + 1], s[i]
        return "".join(s)
    if skill == "shift":
        right = true_answer(skill, fields)
        return right[:-1] + fields["word"][-1]
    if skill == "upper":
        return fields["word"][0] + fields["word"][1:].upper()
    return None


def _random_problem(skill: str, rng: random.Random) -> dict:
    if skill in ("reverse", "shift", "upper"):
        return {"word": "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))}
    if skill == "sort":
        return {"digits": "".join(rng.choices(string.digits, k=rng.randint(4, 8)))}
    raise KeyError(skill)


def _digest(*parts) -> str:
    return hashlib.sha1(":".join(map(str, parts)).encode()).hexdigest()


def _bucket(skill: str, fields: dict) -> int:
    return int(_digest(skill, *sorted(fields.items()))[:8], 16) % 20


def make_prompts(split: str, per_skill: int, seed: int = 0, skills: list[str] | None = None) -> list[dict]:
    """`per_skill` distinct problems of each skill from one split, in the prompts contract of DESIGN.md."""
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_BUCKETS)}")
    rows = []
    for skill in skills or list(SKILLS):
        rng, seen = random.Random(_digest(seed, split, skill)), set()
        while len(seen) < per_skill:
            fields = _random_problem(skill, rng)
            key = tuple(sorted(fields.items()))
            if key in seen or _bucket(skill, fields) not in SPLIT_BUCKETS[split]:
                continue
            seen.add(key)
            text = rng.choice(SKILLS[skill].phrasings).format(**fields)
            rows.append(
                {
                    "prompt_id": f"{skill}-{_digest(skill, *key)[:12]}",
                    "messages": [{"role": "user", "content": text}],
                    "category": skill,
                    "reference": true_answer(skill, fields),
                }
            )
    return rows


def parse_problem(text: str) -> tuple[str, dict] | None:
    for skill in SKILLS.values():
        fields = skill.parse(text)
        if fields is not None:
            return skill.name, fields
    return None


def last_user_text(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def teacher_answer(messages: list[dict], error_rate: float, rng: random.Random) -> str | None:
    """The skills teacher's reply, or None for a prompt it does not understand."""
    problem = parse_problem(last_user_text(messages))
    if problem is None:
        return None
    skill, fields = problem
    answer = true_answer(skill, fields)
    wrong = blind_spot_answer(skill, fields)
    if wrong is not None and rng.random() < error_rate:
        answer = wrong
    return ANSWER_FORMAT.format(answer)


def extract_answer(response: str) -> str:
    """The answer in a reply: the formatted one, else the last word (so a badly formatted right answer counts)."""
    response = response.strip()
    m = ANSWER_RE.match(response)
    if m:
        return m.group(1)
    words = re.findall(r"[A-Za-z0-9]+", response)
    return words[-1] if words else ""


@dataclass
class SkillJudgment:
    score: float | None  # 0-10; None where the prompt is not a skills problem
    correct: bool
    well_formatted: bool
    judgment: str


def judge(messages: list[dict], response: str) -> SkillJudgment:
    """Exact check: 7 points for the right answer, 3 for the format; reasons spelled out."""
    problem = parse_problem(last_user_text(messages))
    if problem is None:
        return SkillJudgment(None, False, False, "not a skills problem")
    expected = true_answer(*problem)
    well_formatted = ANSWER_RE.match(response.strip()) is not None
    correct = extract_answer(response) == expected
    score = 7.0 * correct + 3.0 * well_formatted
    why = f"expected {expected}; {'correct' if correct else 'wrong'}; {'formatted' if well_formatted else 'unformatted'}"
    return SkillJudgment(score, correct, well_formatted, why)
