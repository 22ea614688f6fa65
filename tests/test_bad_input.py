"""Every bad input a clear error, over a generated matrix of cases.

Recipe cases: every key of every stage with a value of the wrong type (in the recipe file and as a
`--key value` flag), an out-of-range value where RANGES names a range for it, and a value outside its
choices where it has some. Dataset cases: every defect that applies to every reader. Each case runs
`alignment.cli.main` in-process and must exit 2 with exactly one `error:` line naming the file or flag and
the key or row, a `fix:` line, no traceback, and no complete manifest anywhere under its directory.
"""

import dataclasses
import enum
import json
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml

from alignment.cli import main
from alignment.configs import RANGES, read_yaml
from alignment.memory import MemoryArgs
from alignment.stages import recipe_classes

STAGE_RECIPES = {
    "init-model": "recipes/tiny/init_model.yaml",
    "teacher-sft": "recipes/tiny/teacher_sft.yaml",
    "sft": "recipes/tiny/sft.yaml",
    "teacher-prefs": "recipes/tiny/teacher_prefs.yaml",
    "dpo": "recipes/tiny/dpo.yaml",
    "eval": "recipes/tiny/eval.yaml",
    "pipeline": "recipes/tiny/pipeline.yaml",
    "estimate-memory": "recipes/tiny/sft.yaml",
}


def base_recipe(stage: str, root: Path) -> dict:
    """The shipped tiny recipe, pointed at `root` and at inputs that do not exist, so that a case the checks
    miss fails fast (and names the wrong thing) instead of running a stage."""
    recipe = read_yaml(STAGE_RECIPES[stage])
    recipe["output_dir"] = str(root / "out")
    missing = str(root / "missing.jsonl")
    if stage in ("sft", "dpo", "estimate-memory"):
        recipe.update(dataset_path=missing, model_name_or_path=str(root / "no_model"))
    if stage in ("teacher-sft", "teacher-prefs"):
        recipe["prompts"] = missing
    if stage == "eval":
        recipe["models"] = [{"name": "m", "path": str(root / "no_model")}]
    if stage == "pipeline":
        recipe["stages"] = [{"name": "x", "stage": "init-model", "config": STAGE_RECIPES["init-model"]}]
    if stage == "estimate-memory":
        recipe.pop("output_dir")
    return recipe


def kinds(hint) -> set:
    """The kinds of value a field's annotation accepts: int, str, dict, an Enum class, Literal, ..."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    found = {typing.get_origin(a) or a for a in args}
    for a in args:  # a single value stands for a one-item list, as on the command line
        if typing.get_origin(a) is list:
            found |= kinds(typing.get_args(a)[0])
    return found


def is_enum(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def wrong_type(hint):
    """A value of a kind the annotation does not accept."""
    accepted = kinds(hint)
    if str not in accepted and typing.Any not in accepted:
        return "abc"
    if dict not in accepted:
        return {"wrong": 1}
    assert list not in accepted, f"no wrong value for {hint}"
    return [[1, 2]]


def out_of_range(name: str, hint, default):
    """A number outside the range RANGES gives `name`, of the field's own kind; None where it has no range."""
    accepted = kinds(hint)
    if not {int, float} & accepted:
        return None
    rule = next((r for p, r in RANGES.items() if re.search(p, name)), None)
    if rule is None:
        return None
    low, high = rule[0], rule[1]
    value = high + 0.5 if high is not None else low - 1
    return value - 1 if value == default else value


def has_choices(f, hint) -> bool:
    accepted = kinds(hint)
    return bool(f.metadata.get("choices")) or any(is_enum(k) for k in accepted) or (typing.Literal in accepted and str not in accepted)


def stage_fields(stage: str):
    classes = (MemoryArgs,) if stage == "estimate-memory" else recipe_classes(stage)
    seen = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and f.name not in seen:
                seen.add(f.name)
                yield f, hints[f.name]


def recipe_cases():
    """(stage, key, value, via): via 'recipe' writes the value into the recipe file, 'flag' passes --key."""
    cases = []
    for stage in STAGE_RECIPES:
        for f, hint in stage_fields(stage):
            vias = ("flag",) if stage == "estimate-memory" else ("recipe", "flag")  # its own keys are flags only
            cases += [(stage, f.name, wrong_type(hint), via) for via in vias]
            bad_number = out_of_range(f.name, hint, f.default)
            if bad_number is not None:
                cases += [(stage, f.name, bad_number, via) for via in vias]
            if has_choices(f, hint):
                cases.append((stage, f.name, "not-a-choice", vias[0]))
    # estimate-memory also checks every sft recipe key it reads
    for f, hint in stage_fields("sft"):
        cases.append(("estimate-memory", f.name, wrong_type(hint), "recipe"))
    return cases


RECIPE_CASES = recipe_cases()


def assert_clear_error(capfd, code: int, names: list[str], root: Path):
    out, err = capfd.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    assert re.search(r"^\s+fix: \S", err, re.M), err
    assert "Traceback" not in out + err
    complete = [p for p in root.rglob("manifest.json") if json.loads(p.read_text()).get("complete")]
    assert not complete


@pytest.mark.parametrize("stage, key, value, via", RECIPE_CASES, ids=[f"{s}-{k}-{json.dumps(v)}-{w}" for s, k, v, w in RECIPE_CASES])
def test_recipe_value(stage, key, value, via, tmp_path, capfd):
    recipe, argv = base_recipe(stage, tmp_path), []
    if via == "recipe":
        recipe[key] = value
        names = [str(tmp_path / "recipe.yaml"), f"key {key}"]
    else:
        argv, names = [f"--{key}", json.dumps(value)], [f"--{key}"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    if stage == "estimate-memory" and key != "stage":
        argv += ["--stage", "sft"]  # a DPO key in the sft recipe would otherwise make it guess dpo
    code = main([stage, "--config", str(tmp_path / "recipe.yaml"), *argv])
    assert_clear_error(capfd, code, names, tmp_path)


def test_recipe_matrix_covers_every_key():
    covered = {(stage, key) for stage, key, *_ in RECIPE_CASES}
    assert all((stage, f.name) in covered for stage in STAGE_RECIPES for f, _ in stage_fields(stage))
    print(f"\nrecipe cases: {len(RECIPE_CASES)} over {len(covered)} stage keys")
