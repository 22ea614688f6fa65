"""Teacher backends behind one interface: `complete(conversations, sampling) -> completions`.

`conversations` is a list of message lists; the answer is, for each conversation, a list of
`sampling.n` completions. Backends are built from a recipe mapping `{backend: NAME, ...}` through the
`BACKENDS` table: `skills` (synthetic, exact), `hf` (a local transformers model), `openai` (any
OpenAI-compatible endpoint), `vllm` (the optional offline engine).
"""

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


class OpenAITeacher:
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, TGI, `transformers serve`, llama.cpp, Ollama).

    The key is read from the environment variable the recipe names (`api_key_env`) and never stored.
    Requests run `concurrency` at a time; 429, 5xx, timeouts, dropped connections and unreadable
    answers are retried with exponential backoff and jitter, then recorded as a failed completion.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        name: str | None = None,
    ):
        import openai

        key = os.environ.get(api_key_env)
        if key is None and base_url is None:
            raise SmoeError(f"environment variable {api_key_env} is not set", "openai teacher", f"export {api_key_env}=... (the key is never written to disk)")
        self.client = openai.OpenAI(base_url=base_url, api_key=key or "none", timeout=timeout, max_retries=0)
        self.model, self.name = model, name or model
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        self.usage = {"requests": 0, "retries": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()

    def _count(self, **add):
        with self._lock:
            for key, value in add.items():
                self.usage[key] += value

    def _request(self, messages: list[dict], sampling: Sampling, index: int) -> Completion:
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_new_tokens,
                    seed=sampling.seed + index,
                )
                choice = response.choices[0]
                if not isinstance(choice.message.content, str):
                    raise ValueError("no text in the answer")
                usage = response.usage
                self._count(requests=1, prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0, completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
                return Completion(choice.message.content, "length" if choice.finish_reason == "length" else "stop")
            except openai.APIStatusError as err:
                self._count(requests=1)
                if err.status_code != 429 and err.status_code < 500:
                    break  # a 4xx other than 429 will not change on a retry
            except (openai.APIError, ValueError, IndexError, AttributeError):  # timeouts, dropped connections, garbage
                self._count(requests=1)
            if attempt < self.max_retries:
                self._count(retries=1)
                time.sleep(self.backoff * 2**attempt * random.uniform(0.5, 1.5))
        self._count(failures=1)
        return Completion(None, "error")

    def complete(self, conversations, sampling: Sampling) -> list[list[Completion]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [[pool.submit(self._request, m, sampling, i) for i in range(sampling.n)] for m in conversations]
            return [[f.result() for f in row] for row in futures]


class VLLMTeacher:
    """vLLM's offline engine (optional extra `vllm`, CUDA machines): continuous batching, paged KV cache."""

    def __init__(self, model: str, dtype: str = "auto", tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, name: str | None = None):
        try:
            from vllm import LLM
        except ImportError:
            raise SmoeError("vllm is not installed", "vllm teacher", "pip install vllm on a CUDA machine, or use backend: hf") from None
        self.name = name or model
        self.llm = LLM(model=model, dtype=dtype, tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)

    def complete(self, conversations, sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, seed=sampling.seed)
        outputs = self.llm.chat(conversations, params, use_tqdm=True)
        return [[Completion(o.text, "length" if o.finish_reason == "length" else "stop") for o in out.outputs] for out in outputs]


BACKENDS = {"skills": SkillsTeacher, "hf": HFTeacher, "openai": OpenAITeacher, "vllm": VLLMTeacher}


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
