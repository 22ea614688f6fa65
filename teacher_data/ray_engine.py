"""`engine: ray`: a teacher stage's prompts answered by Ray Data workers (`pip install smoe-align[ray]`).

The prompts still to do become a `ray.data` dataset; `map_batches` hands batches of `ray_batch_size`
prompts to `ray_workers` Ray actors, each holding the stage's own teachers (the `openai` backend over
HTTP, `hf` on the actor's CPU or GPU, `vllm` with its own GPUs, `skills`), and the driver streams the
answered batches back and writes them into the same shards as the local engine. Only the driver
writes, so:
- a killed driver loses the answered rows not yet in a shard; the rerun redoes exactly those;
- a killed worker is restarted by Ray and its batch retried; its partial work was never written;
- a row is written once: the driver skips ids already in the store.
Ray is started locally for the run (`ray_num_cpus`) and stopped after it, or joined at `ray_address`
(where smoe-align must be installed on every node).

Why not `ray.data.llm`'s processors: its HTTP processor sends one request per row and raises once a row
runs out of retries (failing the job, where we record a failed row and go on), retries neither 500s
nor with jitter, counts no usage, and has no way to chain a user simulator's turns or a judge's
rounds; its vLLM processor is a one-shot row pipeline too. Our backends inside Ray actors keep each
stage's semantics (multi-turn, K samples, judging, failure counts) identical across engines.
"""

import json
import os

from alignment.errors import SmoeError


def _needs_gpus(spec: dict) -> float:
    if spec.get("backend") == "vllm":
        return float(spec.get("tensor_parallel_size", 1))
    if spec.get("backend") == "hf" and str(spec.get("device", "")).startswith("cuda"):
        return 1.0
    return 0.0


def _specs(args) -> list[dict]:
    """Every teacher mapping of a teacher-sft or teacher-prefs recipe."""
    found = [getattr(args, name, None) for name in ("teacher", "user_simulator", "judge")]
    return [s for s in found + list(getattr(args, "policies", None) or []) if s]


def _start(args):
    try:
        import ray
    except ImportError:
        raise SmoeError("ray is not installed", "recipe key engine: ray", "pip install 'smoe-align[ray]', or set engine: local") from None
    from importlib.util import find_spec

    from teacher_data.teachers import BACKENDS

    specs = _specs(args)
    for spec in specs:  # checked here: a worker's error would surface as a Ray traceback
        if spec.get("backend") not in BACKENDS:
            raise SmoeError(f"unknown teacher backend {spec.get('backend')!r}", "a teacher of the recipe", f"set backend to one of {sorted(BACKENDS)}")

    if any(s.get("backend") == "vllm" for s in specs) and find_spec("vllm") is None:
        raise SmoeError("vllm is not installed", "a teacher with backend: vllm", "pip install vllm on the CUDA machines of the Ray cluster, or use backend: hf")
    if ray.is_initialized():
        return ray, False
    if args.ray_address:
        keys = {s["api_key_env"] for s in specs if s.get("api_key_env") in os.environ}  # the workers read the key as the driver does
        ray.init(address=args.ray_address, runtime_env={"env_vars": {k: os.environ[k] for k in keys}}, log_to_driver=False)
    else:
        ray.init(num_cpus=args.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    return ray, True


class ChunkWorker:
    """A Ray actor: builds the stage's teachers once, then answers batches of prompts (JSON in, JSON out)."""

    def __init__(self, args, build, work, usage):
        self.args, self.work, self.usage = args, work, usage
        self.state = build(args)

    def __call__(self, batch: dict) -> dict:
        prompts = [json.loads(p) for p in batch["prompt"]]
        before = self.usage(self.state)
        rows, wrong = self.work(self.args, self.state, prompts)
        after = self.usage(self.state)
        spent = {name: {k: v - before.get(name, {}).get(k, 0) for k, v in counters.items()} for name, counters in after.items()}
        return {"rows": [json.dumps(rows, ensure_ascii=False)], "wrong": [wrong], "usage": [json.dumps(spent)], "prompts": [len(prompts)]}


def run_on_ray(args, todo: list[dict], store, bar, build, work, usage, problem: str) -> tuple[int, dict]:
    from teacher_data.engine import add_usage

    ray, started_here = _start(args)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # ours counts prompts across runs
        gpus = max(_needs_gpus(s) for s in _specs(args))
        answered = ray.data.from_items([{"prompt": json.dumps(p, ensure_ascii=False)} for p in todo]).map_batches(
            ChunkWorker,
            fn_constructor_args=(args, build, work, usage),
            batch_size=args.ray_batch_size,
            concurrency=args.ray_workers,
            num_cpus=args.ray_cpus_per_worker,
            num_gpus=gpus or None,
            batch_format="numpy",
        )
        written, pending, problems, spent = set(store.done_ids()), [], 0, {}
        for out in answered.iter_rows():
            for row in json.loads(out["rows"]):
                if row["prompt_id"] not in written:  # a retried batch never writes a row twice
                    written.add(row["prompt_id"])
                    pending.append(row)
            problems += int(out["wrong"])
            add_usage(spent, json.loads(out["usage"]))
            while len(pending) >= args.shard_size:
                store.write(pending[: args.shard_size])
                pending = pending[args.shard_size :]
            bar.update(int(out["prompts"]))
            bar.set_postfix({problem: problems})
        store.write(pending)
        return problems, spent
    finally:
        if started_here:
            ray.shutdown()
