"""eval: score models on a benchmark.

usage: smoe-align eval --config recipes/tiny/eval.yaml [--key value ...]

benchmark: skills    held-out exact-match accuracy per skill and mean judge score (the tiny default)
benchmark: mt_bench  a question file in MT-Bench format: two-turn answers, single-answer grades 1-10
                     (turn 1, turn 2, overall, per category) and, with `baseline`, pairwise win rates
benchmark: alpaca_eval  AlpacaEval 2: answers against `reference_outputs`, judged in both orders;
                     win rate and length-controlled win rate
benchmark: ifeval    IFEval through lm-evaluation-harness on a local copy of its prompts (`question_file`)
Models are `{name, path}` (a model or adapter directory, or hub id, run locally) or `{name, backend,
...}` for any teacher backend (an OpenAI-compatible endpoint, say). A model already answered or
scored is not redone on a rerun.
"""

from dataclasses import dataclass, field

from alignment.evaluate import alpaca, ifeval, mt_bench_stage, skills_eval


@dataclass
class EvalArgs:
    output_dir: str = "runs/tiny/eval"
    models: list = field(default_factory=list)
    benchmark: str = "skills"
    seed: int = 0
    max_new_tokens: int = 20
    batch_size: int = 256
    # skills
    prompts: str = "skills:heldout"
    prompts_per_skill: int = 500
    # mt_bench
    question_file: str | None = None  # or skills:heldout (prompts_per_skill two-turn questions per skill); ifeval: its input_data.jsonl
    categories: list | None = None  # restricts the question file to these categories; any category when unset
    max_questions: int | None = None
    judge: dict = field(default_factory=lambda: {"backend": "skills"})
    judge_prompts: str | None = None  # FastChat judge_prompts.jsonl; our own prompts when unset
    judge_max_new_tokens: int = 1024
    reference_answers: str | None = None  # FastChat answer file, used for math, reasoning and coding
    baseline: str | None = None  # a model name from `models`: pairwise win rates against it
    bootstrap_samples: int = 1000
    length_controlled: bool = False
    temperature: float | None = None  # one sampling temperature for every question; FastChat's per category when unset
    # alpaca_eval
    reference_outputs: str | None = None  # alpaca_eval outputs JSON ({instruction, output, generator, dataset}): the instructions and the baseline

    def __post_init__(self):
        if self.benchmark not in RUNNERS:
            raise ValueError(f"benchmark={self.benchmark!r}; choose one of {sorted(RUNNERS)}")
        if not self.models or not all(isinstance(m, dict) and isinstance(m.get("name"), str) and (isinstance(m.get("path"), str) or "backend" in m) for m in self.models):
            raise ValueError("models must be a list of {name, path} or {name, backend, ...} entries")
        if self.benchmark == "mt_bench" and not self.question_file:
            raise ValueError("benchmark mt_bench needs question_file (MT-Bench question.jsonl format)")
        if self.benchmark == "ifeval" and not self.question_file:
            raise ValueError("benchmark ifeval needs question_file (a local copy of IFEval's input_data.jsonl)")
        if self.benchmark == "alpaca_eval" and not self.reference_outputs:
            raise ValueError("benchmark alpaca_eval needs reference_outputs (an alpaca_eval outputs JSON file)")
        if self.baseline is not None and self.baseline not in {m["name"] for m in self.models}:
            raise ValueError(f"baseline {self.baseline!r} is not one of the models")


RUNNERS = {"skills": skills_eval.run, "mt_bench": mt_bench_stage.run, "alpaca_eval": alpaca.run, "ifeval": ifeval.run}


def run(args: EvalArgs):
    return RUNNERS[args.benchmark](args)
