"""Recipes: YAML files whose keys are the fields of typed dataclasses.

A stage declares the dataclasses it reads (its own arguments plus TRL's `SFTConfig` / `DPOConfig` /
`ModelConfig` where they apply, so keys keep their TRL / transformers names). `load_recipe` merges the
YAML with `--key value` overrides, reports every unknown key at once with the closest known name, checks
every value against its field's annotation and the range its name implies (before anything is loaded),
and turns the errors raised by the dataclasses' own checks into `SmoeError`s that name the recipe.
"""

import dataclasses
import difflib
import enum
import functools
import re
import sys
import types
import typing
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


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A recipe's keys. `base: file` (or a list of files, merged in order), relative to the recipe's
    directory, names recipes this one extends: their keys first, this file's on top, a key replacing the
    base's value whole. What comes back is the whole recipe, with no `base` left in it."""
    path = Path(path)
    if not path.is_file():
        raise SmoeError("recipe file not found", str(path), "pass an existing YAML file to --config")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SmoeError(f"not valid YAML ({err})", str(path), "fix the YAML syntax at the line shown") from None
    if not isinstance(data, dict):
        raise SmoeError("a recipe must be a mapping of key: value", str(path))
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise SmoeError(f"base: {bases!r} is not a recipe path or a list of them", str(path), "write base: other.yaml (relative to this recipe's directory)")
    merged = {}
    for base in bases:
        base_path = (path.parent / base).resolve()
        if base_path in _seen or base_path == path.resolve():
            raise SmoeError(f"base: {base} extends itself (through {' -> '.join(p.name for p in _seen)})", str(path), "remove the loop of base: keys")
        if not base_path.is_file():
            raise SmoeError(f"base: {base} does not exist ({base_path})", str(path), "name a recipe file relative to this recipe's directory")
        merged.update(read_yaml(base_path, _seen + (path.resolve(),)))
    return {**merged, **data}


def _yaml_or_text(raw: str):
    """A value as YAML reads it, or the text itself when it is not YAML (a Jinja chat template, say)."""
    try:
        return load_yaml(raw)
    except yaml.YAMLError:
        return raw


def parse_overrides(args: list[str]) -> dict:
    """`--key value` pairs; values are read as YAML so numbers, booleans and lists work."""
    overrides, i = {}, 0
    while i < len(args):
        key = args[i]
        if not key.startswith("--") or i + 1 >= len(args):
            raise SmoeError(f"cannot read override {key!r}", "command line", "write overrides as --key value")
        raw = args[i + 1]
        # YAML 1.1 reads yes/no/on/off as booleans; on a command line they are words (save_strategy no)
        overrides[key[2:].replace("-", "_")] = raw if raw.lower() in ("yes", "no", "on", "off") else _yaml_or_text(raw)
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


# key pattern -> (lowest, highest, whether the lowest itself is allowed); the first match counts. A field's
# own default always passes (max_steps -1 means "unset").
RANGES = {
    r"dropout$|^top_p$|^adam_beta\d$|^label_smoothing|mixup_alpha$|^ld_alpha$": (0, 1, True),
    r"^(num_train_epochs|logging_steps|save_steps|eval_steps|beta|adam_epsilon|lora_alpha)$": (0, None, False),
    r"rate$|^weight_decay$|^warmup_steps$|_coef$|^max_grad_norm$|seed$|_workers$|^temperature$|_margin$|_tau$|^eval_delay$|noise_alpha$|^prompts_per_skill$": (0, None, True),
    r"batch_size$|accumulation_steps$|_sync_steps$|_cache_steps$|^max_|max_new_tokens$|^num_|_size$|^lora_r$|_ngram$|_samples$|^seq_len$|^kv_channels$|^save_total_limit$|_prefetch_factor$|_timeout$|^dataset_num_proc$": (1, None, True),
}
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping", list: "a list", type(None): "null"}
_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings", dict: "mappings"}


def _accepts(hint, value) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
            args = [a for a in args if a is not str]  # `SchedulerType | str` takes the enum's values only
        return any(_accepts(a, value) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple) or hint in (list, tuple):
        if not args:
            return isinstance(value, list)
        return all(_accepts(args[0], v) for v in (value if isinstance(value, list) else [value]))  # one value: a one-item list, as on the command line
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or any(value == e.value for e in hint)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return hint is typing.Any or not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
            args = [a for a in args if a is not str]
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is typing.Literal or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return "one of " + ", ".join(repr(getattr(a, "value", a)) for a in (args or hint))
    if origin in (list, tuple) and args:
        return "a list of " + _PLURALS.get(args[0], f"items each {_describe(args[0])}")
    return _KINDS.get(origin or hint, f"a {getattr(hint, '__name__', hint)} (not settable from a recipe)")


_type_hints = functools.cache(typing.get_type_hints)  # TrainingArguments' string annotations take a while to evaluate


def _out_of_range(name: str, value) -> str | None:
    """What a number named `name` must be, when `value` lies outside the range RANGES gives that name."""
    low, high, closed = next((r for p, r in RANGES.items() if re.search(p, name)), (None, None, True))
    if low is None or ((value >= low if closed else value > low) and (high is None or value <= high)):
        return None
    return f"a number from {low} to {high}" if high is not None else f"a number of at least {low}" if closed else f"a number above {low}"


def _place(key: str, where: str, flags) -> str:
    return f"override --{key}" if key in flags else f"{where}: key {key}"


def check_values(values: dict, classes: tuple, where: str, flags=()):
    """Each value against its field's annotation, its `choices` and the range its name implies; the first bad
    one stops with the recipe file (or the override flag), the key, the value and what was expected."""
    for cls in classes:
        hints = _type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name not in values:
                continue
            value, hint, choices = values[f.name], hints[f.name], f.metadata.get("choices")
            expected = None
            if not _accepts(hint, value):
                expected = _describe(hint)
            elif choices and value is not None and not all(v in list(choices) for v in (value if isinstance(value, list) else [value])):
                expected = "one of " + ", ".join(map(repr, choices))
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and value != f.default:
                expected = _out_of_range(f.name, value)
            if expected is None:
                continue
            place = _place(f.name, where, flags)
            quote = " (YAML reads unquoted yes/no/on/off as true/false: quote the word)" if isinstance(value, bool) and "string" in expected else ""
            default = f" (its default: {f.default!r})" if f.default not in (None, dataclasses.MISSING) else ""
            raise SmoeError(f"{value!r} is not {expected}", place, f"give {f.name} {expected}{default}{quote}")


def build(values: dict, classes: tuple, where: str, flags=()) -> tuple:
    """Instantiate each dataclass from the keys it owns; keys may be shared (e.g. `seed`).

    `flags` are the keys that came from the command line, so that an error names the flag."""
    check_keys(values, field_names(*classes), where)
    check_values(values, classes, where, flags)
    built = []
    for cls in classes:
        own = {k: v for k, v in values.items() if k in field_names(cls)}
        try:
            built.append(cls(**own))
        except (ValueError, TypeError) as err:
            # name the key when the class's own message mentions exactly one key or one key's value
            named = [k for k, v in own.items() if re.search(rf"\b{k}\b", str(err)) or (isinstance(v, str) and len(v) > 3 and v in str(err))]
            place = _place(named[0], where, flags) if len(named) == 1 else where
            raise SmoeError(f"invalid recipe for {cls.__name__}: {err}", place, "correct the keys named above") from None
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
    flags = {RENAMED.get(k, ALIASES.get(k, k)) for k in overrides}
    return build(values, classes, str(path) if path else "command line", flags=flags), values


def write_resolved(values: dict, output_dir: str | Path):
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "recipe.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
