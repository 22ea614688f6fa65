"""The stage table: each stage's recipe dataclasses and runner, and the one way a stage is run.

Runners are imported on first use, so `smoe-align teacher-sft` does not pay for importing TRL.
"""

import importlib
from pathlib import Path

from alignment.configs import load_recipe, write_resolved
from alignment.manifest import is_complete

# stage -> (module, name of its tuple of recipe classes or of its one class, runner)
STAGES = {
    "init-model": ("alignment.models.tiny", "TinyModelArgs", "run"),
    "teacher-sft": ("teacher_data.generate", "TeacherSFTArgs", "run"),
    "sft": ("alignment.sft", "RECIPE_CLASSES", "run"),
    "teacher-prefs": ("teacher_data.preferences", "TeacherPrefsArgs", "run"),
    "dpo": ("alignment.dpo", "RECIPE_CLASSES", "run"),
    "eval": ("alignment.evaluate.stage", "EvalArgs", "run"),
    "pipeline": ("alignment.pipeline", "PipelineArgs", "run"),
    "export": ("alignment.export", "ExportArgs", "run"),
}


def recipe_classes(stage: str) -> tuple:
    module, classes, _ = STAGES[stage]
    found = getattr(importlib.import_module(module), classes)
    return found if isinstance(found, tuple) else (found,)


def output_dir_of(instances) -> str:
    return next(i.output_dir for i in instances if hasattr(i, "output_dir"))


def run_stage(stage: str, config: str | Path | None, overrides: dict | None = None, force: bool = False):
    """Parse the recipe, skip a complete output, write the resolved recipe, run. Returns the output dir."""
    instances, values = load_recipe(config, overrides or {}, recipe_classes(stage))
    output_dir = output_dir_of(instances)
    if stage != "pipeline" and is_complete(output_dir) and not force:
        print(f"[{stage}] {output_dir} is complete; skipping (delete its manifest.json to redo it)")
        return output_dir
    write_resolved({"stage": stage, **values}, output_dir)
    module, _, runner = STAGES[stage]
    getattr(importlib.import_module(module), runner)(*instances)
    return output_dir
