"""pipeline: run a pipeline recipe stage by stage, skipping complete stages, then write the report.

usage: smoe-align pipeline --config recipes/tiny/pipeline.yaml [--key value ...]

Each entry names a stage, its recipe, optional `overrides`, and optionally `match_steps_of`: an
earlier training stage whose optimizer step count becomes this stage's max_steps (the controls use
it to get the same compute as dDPO).
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

from alignment.errors import SmoeError
from alignment.manifest import read_manifest
from alignment.report import markers
from alignment.stages import STAGES, run_stage

ENTRY_KEYS = {"name", "stage", "config", "overrides", "match_steps_of"}


@dataclass
class PipelineArgs:
    output_dir: str = "runs/tiny"
    stages: list = field(default_factory=list)
    history: str | None = None  # a JSONL file each finished run appends its figures to
    readme: str | None = None  # a README whose marked block shows the latest run and the spread of the history
    readme_block: str = "tiny-demo"  # the block's name in its markers, <!-- NAME:begin ... --> ... <!-- NAME:end -->

    def __post_init__(self):
        names = set()
        for i, entry in enumerate(self.stages):
            where = f"stages[{i}]"
            if not isinstance(entry, dict) or not {"name", "stage", "config"} <= set(entry):
                raise ValueError(f"{where} needs name, stage and config")
            if set(entry) - ENTRY_KEYS:
                raise ValueError(f"{where} has unknown keys {sorted(set(entry) - ENTRY_KEYS)}; allowed: {sorted(ENTRY_KEYS)}")
            if entry["stage"] not in STAGES or entry["stage"] == "pipeline":
                raise ValueError(f"{where}: unknown stage {entry['stage']!r}; choose one of {sorted(set(STAGES) - {'pipeline'})}")
            if entry.get("match_steps_of") not in (None, *names):
                raise ValueError(f"{where}: match_steps_of {entry['match_steps_of']!r} is not an earlier stage")
            if not Path(entry["config"]).is_file():
                raise ValueError(f"{where}: recipe {entry['config']} not found")
            names.add(entry["name"])
        if not self.stages:
            raise ValueError("stages is empty")
        if self.readme and not self.history:
            raise ValueError("readme needs history (the runs whose spread it shows)")
        begin, end = markers(self.readme_block)
        if self.readme and (not Path(self.readme).is_file() or begin not in Path(self.readme).read_text() or end not in Path(self.readme).read_text()):
            raise ValueError(f"readme {self.readme} is not a file with a block marked {begin} ... {end}; run from the repository root, or drop readme")


def run(args: PipelineArgs):
    from alignment.report import record_run, write_report

    started = time.time()
    outputs = {}
    for entry in args.stages:
        overrides = dict(entry.get("overrides") or {})
        if entry.get("match_steps_of"):
            source = outputs[entry["match_steps_of"]][1]
            overrides["max_steps"] = read_manifest(source)["global_step"]
        print(f"\n=== [{entry['name']}] smoe-align {entry['stage']} --config {entry['config']}" + "".join(f" --{k} {v}" for k, v in overrides.items()))
        try:
            outputs[entry["name"]] = (entry["stage"], run_stage(entry["stage"], entry["config"], overrides))
        except SmoeError as err:
            raise SmoeError(f"stage {entry['name']!r} failed: {err}", "pipeline", "fix it and rerun: complete stages are skipped") from None
    summary = write_report(outputs, args.output_dir, started)
    ran = any((Path(d) / "manifest.json").stat().st_mtime >= started for _, d in outputs.values())
    if args.history and summary["models"] and ran:  # a rerun that skipped every stage adds no run
        record_run(summary, args.history, args.readme, args.readme_block)
    print(f"\nreport: {Path(args.output_dir) / 'report.md'}")
    print(summary["table"])
    return summary
