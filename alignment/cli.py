"""`smoe-align <stage> --config RECIPE.yaml [--key value ...]`"""

import argparse
import os
import sys

from alignment.errors import SmoeError

USAGE = """smoe-align <stage> --config RECIPE.yaml [--key value ...]

stages, in pipeline order:
  init-model     build the tiny JetMoE and its tokenizer (the embedded default base model)
  teacher-sft    a teacher answers prompts: the dSFT dataset
  sft            distilled SFT of the student (TRL SFTTrainer)
  teacher-prefs  policies answer, a judge scores, pairs are binarized: the preference dataset
  dpo            distilled DPO of the dSFT model (TRL DPOTrainer)
  quantize       save a model (or adapter chain, merged) with NF4 expert banks, for QLoRA runs
  eval           held-out accuracy per skill and judge score of each model
  pipeline       every stage of a pipeline recipe, skipping complete ones, then the report
  estimate-memory  predicted peak training memory of an sft or dpo recipe: full, LoRA, QLoRA
  export         a stage output (model, adapter, adapter chain) as one standalone merged model directory
  chat           a conversation in the terminal: smoe-align chat --model DIR

Keys are the recipe's dataclass fields (TRL / transformers names where they exist);
`smoe-align <stage> --help` lists them. Without --config, the keys come from the command line alone."""


def main(argv: list[str] | None = None) -> int:
    from alignment.stages import STAGES

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "estimate-memory":
        return estimate_memory(argv[1:])
    if argv and argv[0] == "chat":
        from alignment.export import chat

        try:
            return chat(argv[1:])
        except SmoeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print(USAGE)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown stage {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    stage, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"smoe-align {stage}", add_help=False)
    parser.add_argument("--config", required=False)
    parser.add_argument("--help", "-h", action="store_true")
    known, extra = parser.parse_known_args(rest)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from alignment.configs import field_names, parse_overrides
        from alignment.stages import recipe_classes, run_stage

        if known.help:
            print(f"smoe-align {stage} --config RECIPE.yaml [--key value ...]\nkeys: " + ", ".join(sorted(field_names(*recipe_classes(stage)))))
            return 0
        overrides = parse_overrides(extra)
        if not known.config and not overrides:
            raise SmoeError("no recipe given", f"smoe-align {stage}", f"pass --config recipes/tiny/{stage.replace('-', '_')}.yaml, or every key as --key value")
        out = run_stage(stage, known.config, overrides)
        print(f"[{stage}] done: {out}")
        return 0
    except SmoeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def estimate_memory(argv: list[str]) -> int:
    """Reads an sft / dpo recipe (plus --key value overrides of its keys) and prints the estimate."""
    from alignment.configs import build, check_keys, check_values, field_names, parse_overrides, resolve
    from alignment.memory import MemoryArgs, format_estimate, guess_stage, run_estimate
    from alignment.stages import recipe_classes

    try:
        if len(argv) < 2 or argv[0] != "--config":
            raise SmoeError("no recipe given", "smoe-align estimate-memory", "pass --config RECIPE.yaml (an sft or dpo recipe)")
        overrides = parse_overrides(argv[2:])
        own = {k: overrides.pop(k) for k in list(overrides) if k in field_names(MemoryArgs)}
        (args,) = build(own, (MemoryArgs,), "command line", flags=set(own))
        recipe = resolve(argv[1], overrides)
        args.stage = args.stage or guess_stage(recipe)
        check_keys(recipe, field_names(*recipe_classes(args.stage)), argv[1])
        check_values(recipe, recipe_classes(args.stage), argv[1], flags=set(overrides))
        print(format_estimate(run_estimate(recipe, args)))
        return 0
    except SmoeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
