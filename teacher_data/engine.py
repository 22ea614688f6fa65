"""Where a teacher stage's prompts are answered: in this process (`engine: local`) or by Ray Data workers
(`engine: ray`, the optional extra `smoe-align[ray]`; see `teacher_data.ray_engine`).

A stage hands the engine three functions, the same for both engines:
  build(args) -> state                      its teachers (and judge), built once per worker
  work(args, state, prompts) -> (rows, n)   the rows for a chunk of prompts, and how many went wrong
  usage(state) -> {name: counters}          request, retry, failure and token counts so far
The driver alone writes shards (`teacher_data.store`), so resuming and deduplication are the store's,
whichever engine ran: a rerun skips the prompt ids already in shards.
"""

from dataclasses import dataclass

from tqdm.auto import tqdm

ENGINES = ("local", "ray")


@dataclass
class EngineArgs:
    engine: str = "local"  # local: this process; ray: Ray Data workers
    ray_address: str | None = None  # a running cluster ("auto", "ray://head:10001"); none starts a local Ray for the run
    ray_workers: int = 2  # concurrent workers (Ray actors), each with its own teachers
    ray_cpus_per_worker: float = 1.0
    ray_num_cpus: int | None = None  # CPUs of the local Ray started for the run (none: all of this machine's)
    ray_batch_size: int = 16  # prompts per Ray task; a killed task's prompts are redone

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}; choose one of {list(ENGINES)}")
        if self.ray_workers < 1 or self.ray_batch_size < 1:
            raise ValueError("ray_workers and ray_batch_size must be at least 1")
        if self.engine == "local" and self.ray_address:
            raise ValueError("ray_address is set but engine is local; set engine: ray to use the cluster")


def add_usage(total: dict, more: dict):
    for name, counters in more.items():
        into = total.setdefault(name, {})
        for key, value in counters.items():
            into[key] = into.get(key, 0) + value


def run_chunks(args, todo: list[dict], store, bar: tqdm, build, work, usage, problem: str) -> tuple[int, dict]:
    """Answer `todo` into `store` in shards of `args.shard_size`; returns (problems, usage of this run)."""
    if not todo:
        return 0, {}
    if args.engine == "ray":
        from teacher_data.ray_engine import run_on_ray

        return run_on_ray(args, todo, store, bar, build, work, usage, problem)
    state, problems = build(args), 0
    for start in range(0, len(todo), args.shard_size):
        chunk = todo[start : start + args.shard_size]
        rows, wrong = work(args, state, chunk)
        store.write(rows)
        problems += wrong
        bar.update(len(chunk))
        bar.set_postfix({problem: problems})
    return problems, usage(state)
