"""Teacher throughput, as ratios measured in one run on this machine.

1. `hf` backend, batched (batch 16, left padding, length-sorted, KV cache) against stock transformers
   `generate` called one prompt at a time: generated tokens per second.
2. `openai` backend with 8 concurrent requests against 1, both against `transformers serve` hosting
   the same model on loopback.
3. (`--ray` alone, needs `pip install smoe-align[ray]`) the teacher-sft stage on Ray Data, 2 workers with
   one request each, against the local engine with the openai backend at concurrency 2, both against
   the same `transformers serve`: the two datasets compared as sets, and prompts per second. Ray is
   started once before the rounds (its start-up is printed apart). Give it a trained model
   (`--model runs/tiny/sft`): a random one never ends an answer, so both datasets would be empty.

usage: python bench/teacher_throughput.py [--model DIR] [--prompts 64] [--rounds 3] [--ray]
The model defaults to the tiny JetMoE built by `init-model` (random weights: every answer runs to
max_new_tokens, so both sides generate the same number of tokens).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from alignment.models.jetmoe import load_causal_lm, load_tokenizer
from alignment.models.tiny import TinyModelArgs, init_model
from alignment.stages import run_stage
from teacher_data import skills
from teacher_data.serve import start_transformers_serve
from teacher_data.teachers import HFTeacher, OpenAITeacher, Sampling

MAX_NEW_TOKENS = 32


def conversations(n: int) -> list[list[dict]]:
    return [p["messages"] for p in skills.make_prompts("heldout", n // 4 + 1, seed=1)][:n]


def one_at_a_time(model_dir: str, convs) -> int:
    """The stock loop: one `generate` call per prompt."""
    model, tok = load_causal_lm(model_dir).eval(), load_tokenizer(model_dir)
    tokens = 0
    with torch.no_grad():
        for messages in convs:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    return tokens


def batched(teacher: HFTeacher, convs) -> int:
    answers = teacher.complete(convs, Sampling(max_new_tokens=MAX_NEW_TOKENS))
    return sum(len(teacher.tokenizer(a.text, add_special_tokens=False)["input_ids"]) + (a.finish_reason == "stop") for (a,) in answers)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens / (time.perf_counter() - start)


def openai_tokens(teacher: OpenAITeacher, convs) -> int:
    before = teacher.usage["completion_tokens"]
    teacher.complete(convs, Sampling(max_new_tokens=MAX_NEW_TOKENS))
    return teacher.usage["completion_tokens"] - before


def teacher_sft(url: str, model_dir: str, out: Path, n: int, engine: dict) -> tuple[float, list[str]]:
    """One teacher-sft run through the stage; (prompts per second, the dataset's rows sorted)."""
    spec = {"backend": "openai", "model": model_dir, "base_url": url, "timeout": 120, "concurrency": 1 if engine else 2}
    overrides = {"prompts_per_skill": n // 4, "teacher": spec, "max_new_tokens": MAX_NEW_TOKENS, "output_dir": str(out), "shard_size": 16, **engine}
    start = time.perf_counter()
    run_stage("teacher-sft", "recipes/tiny/teacher_sft.yaml", overrides)
    seconds = time.perf_counter() - start
    return 4 * (n // 4) / seconds, sorted(out.joinpath("train.jsonl").read_text().splitlines())


def ray_against_local(model_dir: str, n: int, rounds: int):
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"Ray Data teacher-sft against the local engine (openai backend, transformers serve; Ray start-up {time.perf_counter() - start:.1f} s, not counted)")
    server, url = start_transformers_serve(model_dir)
    engine = {"engine": "ray", "ray_workers": 2, "ray_batch_size": 4}
    local, on_ray, same = [], [], True
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(rounds):
                rate, plain_rows = teacher_sft(url, model_dir, Path(tmp, f"local{r}"), n, {})
                local.append(rate)
                rate, ray_rows = teacher_sft(url, model_dir, Path(tmp, f"ray{r}"), n, engine)
                on_ray.append(rate)
                same = same and plain_rows == ray_rows
    finally:
        server.terminate()
        server.wait(timeout=30)
        ray.shutdown()
    print(f"  local engine, concurrency 2:        {max(local):8.2f} prompts/s (best of {rounds})")
    print(f"  Ray Data, 2 workers x concurrency 1: {max(on_ray):8.2f} prompts/s")
    print(f"  ratio Ray / local:                   {max(on_ray) / max(local):8.2f}x")
    print(f"  same dataset (as a set) every round: {same} ({len(ray_rows)} rows of {4 * (n // 4)} prompts)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="only Ray Data against the local engine")
    args = parser.parse_args()
    model_dir = args.model or str(init_model(TinyModelArgs(output_dir=tempfile.mkdtemp() + "/tiny")))
    convs = conversations(args.prompts)
    if args.ray:
        return ray_against_local(model_dir, args.prompts, args.rounds)
    teacher = HFTeacher(model_dir, batch_size=16)
    stock, ours = [], []
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits both sides
        stock.append(timed(one_at_a_time, model_dir, convs))
        ours.append(timed(batched, teacher, convs))
    print(f"hf backend, {len(convs)} prompts, {MAX_NEW_TOKENS} new tokens, {torch.get_num_threads()} threads")
    print(f"  stock generate, one prompt at a time: {max(stock):8.1f} tokens/s (best of {args.rounds})")
    print(f"  hf backend, batch 16:                 {max(ours):8.1f} tokens/s")
    print(f"  ratio batched / one at a time:        {max(ours) / max(stock):8.2f}x")

    server, url = start_transformers_serve(model_dir)
    try:
        sequential = OpenAITeacher(model_dir, base_url=url, concurrency=1, timeout=120)
        concurrent = OpenAITeacher(model_dir, base_url=url, concurrency=8, timeout=120)
        one, eight = [], []
        for _ in range(args.rounds):
            one.append(timed(openai_tokens, sequential, convs))
            eight.append(timed(openai_tokens, concurrent, convs))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("openai backend against transformers serve (same model, loopback)")
    print(f"  concurrency 1: {max(one):8.1f} tokens/s")
    print(f"  concurrency 8: {max(eight):8.1f} tokens/s")
    print(f"  ratio 8 / 1:   {max(eight) / max(one):8.2f}x")


if __name__ == "__main__":
    main()
