"""Recipes: YAML files whose keys are the fields of typed dataclasses.

A stage declares the dataclasses it reads (its own arguments plus TRL's `SFTConfig` / `DPOConfig` /
`ModelConfig` where they apply, so keys keep their TRL / transformers names). `load_recipe` merges the
YAML with `--key value` overrides, reports every unknown key at once with the closest known name, and
turns the errors raised by the dataclasses' own checks into `SmoeError`s that name the recipe.
"""

import dataclasses
import difflib
import re
import sys
from pathlib import Path

import yaml

from alignment.errors import SmoeError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; recipes mean a float, as in Python."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789"),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SmoeError("recipe file not found", str(path), "pass an existing YAML file to --config")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SmoeError(f"not valid YAML ({err})", str(path), "fix the YAML syntax at the line shown") from None
    if not isinstance(data, dict):
        raise SmoeError("a recipe must be a mapping of key: value", str(path))
    return data


def parse_overrides(args: list[str]) -> dict:
    """`--key value` pairs; values are read as YAML so numbers, booleans and lists work."""
    overrides, i = {}, 0
    while i < len(args):
        key = args[i]
        if not key.startswith("--") or i + 1 >= len(args):
            raise SmoeError(f"cannot read override {key!r}", "command line", "write overrides as --key value")
        raw = args[i + 1]
        # YAML 1.1 reads yes/no/on/off as booleans; on a command line they are words (save_strategy no)
        overrides[key[2:].replace("-", "_")] = raw if raw.lower() in ("yes", "no", "on", "off") else load_yaml(raw)
        i += 2
    return overrides


def field_names(*classes) -> set[str]:
    return {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}


def check_keys(values: dict, known: set[str], where: str):
    unknown = sorted(set(values) - known)
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            lines.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SmoeError(
            "unknown key" + ("s " if len(unknown) > 1 else " ") + ", ".join(lines),
            where,
            "remove the key or correct its name; `smoe-align <stage> --help` lists the keys",
        )


def build(values: dict, classes: tuple, where: str) -> tuple:
    """Instantiate each dataclass from the keys it owns; keys may be shared (e.g. `seed`)."""
    check_keys(values, field_names(*classes), where)
    built = []
    for cls in classes:
        own = {k: v for k, v in values.items() if k in field_names(cls)}
        try:
            built.append(cls(**own))
        except (ValueError, TypeError) as err:
            raise SmoeError(f"invalid recipe for {cls.__name__}: {err}", where, "correct the keys named above") from None
    return tuple(built)


# keys of alignment-handbook recipes that TRL / transformers now spell differently: read under the new name
ALIASES = {"torch_dtype": "dtype", "preprocessing_num_workers": "dataset_num_proc", "warmup_ratio": "warmup_steps"}  # a float below 1 is a ratio
RENAMED = {"max_seq_length": "max_length", "evaluation_strategy": "eval_strategy"}  # said in a note, then read as the new key
# keys that TRL / transformers removed: accepted with a note saying what happens instead
REMOVED = {
    "overwrite_output_dir": "transformers 5 removed it; a stage resumes an output built from the same recipe and sets aside one built from another",
    "max_prompt_length": "TRL 1 removed it; the prompt is truncated together with the completion to max_length",
}


def resolve(path: str | Path | None, overrides: dict) -> dict:
    """The recipe's keys (none without a recipe) with the command line's on top, handbook aliases renamed."""
    where = str(path) if path else "command line"
    values = {}
    for key, value in {**(read_yaml(path) if path else {}), **overrides}.items():
        if key in REMOVED:
            print(f"note: {where}: {key!r} is ignored: {REMOVED[key]}", file=sys.stderr)
            continue
        if key in RENAMED:
            print(f"note: {where}: {key!r} is now called {RENAMED[key]!r}; read as that", file=sys.stderr)
        values[RENAMED.get(key, ALIASES.get(key, key))] = value
    return values


def load_recipe(path: str | Path | None, overrides: dict, classes: tuple) -> tuple[tuple, dict]:
    """Returns (instances, resolved values). The resolved values are what gets written beside the output."""
    values = resolve(path, overrides)
    return build(values, classes, str(path) if path else "command line"), values


def write_resolved(values: dict, output_dir: str | Path):
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "recipe.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
