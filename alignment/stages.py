"""The stage table: each stage's recipe dataclasses and runner, and the one way a stage is run.

Runners are imported on first use, so `smoe-align teacher-sft` does not pay for importing TRL.
"""

import importlib
import time
from pathlib import Path

from alignment.configs import load_recipe, write_resolved
from alignment.errors import SmoeError
from alignment.manifest import fingerprint, is_complete, is_main_process, set_aside, stale_reason, write_fingerprint

# stage -> (module, name of its tuple of recipe classes or of its one class, runner)
STAGES = {
    "init-model": ("alignment.models.tiny", "TinyModelArgs", "run"),
    "teacher-sft": ("teacher_data.generate", "TeacherSFTArgs", "run"),
    "sft": ("alignment.sft", "RECIPE_CLASSES", "run"),
    "teacher-prefs": ("teacher_data.preferences", "TeacherPrefsArgs", "run"),
    "dpo": ("alignment.dpo", "RECIPE_CLASSES", "run"),
    "quantize": ("alignment.models.quant", "QuantizeArgs", "run"),
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
    """Parse the recipe; skip an output built from the same recipe and inputs, set aside one built from
    others; write the resolved recipe and its fingerprint; run. Returns the output dir."""
    instances, values = load_recipe(config, overrides or {}, recipe_classes(stage))
    output_dir = output_dir_of(instances)
    if stage != "pipeline":
        current = fingerprint({"stage": stage, **values}, output_dir)
        if not is_main_process():
            _wait_for_fingerprint(output_dir, current)
        reason = stale_reason(output_dir, current)
        if reason is None and is_complete(output_dir) and not force:
            print(f"[{stage}] {output_dir} is complete, built from this recipe and these inputs; skipping")
            return output_dir
        if reason is not None and is_main_process():
            print(f"[{stage}] rerunning {output_dir}: {reason}; the old output is now {set_aside(output_dir)}")
        if is_main_process():
            write_fingerprint(output_dir, current)
    write_resolved({"stage": stage, **values}, output_dir)
    module, _, runner = STAGES[stage]
    getattr(importlib.import_module(module), runner)(*instances)
    return output_dir


def _wait_for_fingerprint(output_dir: str, current: dict, timeout: float = 600):
    """Other ranks wait until rank 0 has set a stale output aside and marked the new one."""
    deadline = time.time() + timeout
    while stale_reason(output_dir, current) is not None:
        if time.time() > deadline:
            raise SmoeError("rank 0 did not prepare the output directory in time", output_dir, "check rank 0's log")
        time.sleep(0.5)
