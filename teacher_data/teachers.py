"""Teacher backends behind one interface: `complete(conversations, sampling) -> completions`.

`conversations` is a list of message lists; the answer is, for each conversation, a list of
`sampling.n` completions. Backends are built from a recipe mapping `{backend: NAME, ...}` through the
`BACKENDS` table.
"""

import random
from dataclasses import dataclass

import torch

from alignment.errors import SmoeError
from teacher_data import skills


@dataclass
class Sampling:
    n: int = 1
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0


@dataclass
class Completion:
    text: str | None  # None where the backend failed
    finish_reason: str  # "stop", "length" or "error"


class SkillsTeacher:
    """The synthetic skills teacher (see `teacher_data.skills` for its documented blind spots).

    Its randomness is keyed by the conversation and the sample index, not by call order, so a resumed
    run writes the same answers as an uninterrupted one.
    """

    def __init__(self, error_rate: float = 0.0, seed: int = 0, name: str = "skills"):
        if not 0.0 <= error_rate <= 1.0:
            raise SmoeError(f"error_rate {error_rate} is not a probability", "skills teacher", "use a value in [0, 1]")
        self.error_rate, self.seed, self.name = error_rate, seed, name

    def complete(self, conversations, sampling: Sampling) -> list[list[Completion]]:
        out = []
        for messages in conversations:
            samples = []
            for i in range(sampling.n):
                rng = random.Random(f"{self.seed}:{sampling.seed}:{i}:{messages}")
                text = skills.teacher_answer(messages, self.error_rate, rng)
                samples.append(Completion(text, "stop") if text else Completion(None, "error"))
            out.append(samples)
        return out


class HFTeacher:
    """A local transformers model: left-padded batches, sorted by length, KV cache, the usual sampling."""

    def __init__(self, model: str, batch_size: int = 64, dtype: str = "float32", device: str | None = None, name: str | None = None):
        from alignment.models.jetmoe import load_causal_lm, load_tokenizer

        self.name = name or model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(model, dtype).to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def complete(self, conversations, sampling: Sampling) -> list[list[Completion]]:
        torch.manual_seed(sampling.seed)
        prompts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[Completion]] = [[] for _ in prompts]
        eos = self.tokenizer.eos_token_id
        per_batch = max(1, self.batch_size // sampling.n)
        for start in range(0, len(order), per_batch):
            ids = order[start : start + per_batch]
            batch = self.tokenizer([prompts[i] for i in ids], return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            sample = sampling.temperature > 0
            generated = self.model.generate(
                **batch,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sample,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                top_k=0 if sample else None,
                num_return_sequences=sampling.n,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=eos,
            )[:, batch["input_ids"].shape[1] :]
            for row, tokens in enumerate(generated.tolist()):
                finished = eos in tokens
                text = self.tokenizer.decode(tokens[: tokens.index(eos)] if finished else tokens, skip_special_tokens=True)
                out[ids[row // sampling.n]].append(Completion(text, "stop" if finished else "length"))
        return out


BACKENDS = {"skills": SkillsTeacher, "hf": HFTeacher}


def make_teacher(spec: dict, where: str):
    """Build a backend from `{backend: NAME, ...its arguments}`."""
    spec = dict(spec)
    backend = spec.pop("backend", None)
    if backend not in BACKENDS:
        raise SmoeError(f"unknown teacher backend {backend!r}", where, f"set backend to one of {sorted(BACKENDS)}")
    try:
        return BACKENDS[backend](**spec)
    except TypeError as err:
        raise SmoeError(f"bad arguments for the {backend} teacher: {err}", where, "check the keys under this teacher") from None
