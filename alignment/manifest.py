"""A stage's manifest, written last, marks its output directory complete; its fingerprint, written first,
says what the output is built from (the resolved recipe and the manifests of the stages it reads), so
that a stage reruns when either changed instead of reusing a stale output."""

import hashlib
import json
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from alignment.errors import SmoeError

MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.json"
_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


def is_complete(output_dir: str | Path) -> bool:
    path = Path(output_dir) / MANIFEST
    return path.is_file() and json.loads(path.read_text()).get("complete", False)


def read_manifest(output_dir: str | Path) -> dict:
    return json.loads((Path(output_dir) / MANIFEST).read_text())


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def write_manifest(output_dir: str | Path, stage: str, started: float, **info):
    """Atomically (write then rename), so a crash never leaves a manifest that claims completion."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"stage": stage, "complete": True, "seconds": round(time.time() - started, 2), **info}
    manifest["versions"] = _versions()
    write_json_atomically(out / MANIFEST, manifest)


def fingerprint(values: dict, output_dir: str | Path) -> dict:
    """The resolved recipe, and a hash of the manifest of every stage output that the recipe names."""
    inputs = {}

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and _is_path(value) and Path(value).resolve() != Path(output_dir).resolve():
            inputs[value] = _content_hash(Path(value))

    walk(values)
    recipe = {k: v for k, v in values.items() if k not in NOT_RESULTS}
    return {"recipe": json.loads(json.dumps(recipe, default=str)), "inputs": inputs}


# keys that change how a run is watched, how much it recomputes or which kernels multiply (the same products,
# fp32 rounding apart), not what it produces: changing them reruns nothing
NOT_RESULTS = {"report_to", "logging_steps", "logging_strategy", "logging_first_step", "log_level", "disable_tqdm", "push_to_hub", "hub_model_id", "hub_strategy", "activation_checkpointing_policy", "cpu_matmul"}


def _content_hash(path: Path) -> str:
    """A stage output by its manifest; any other file or directory by its files' sizes and times."""
    if (path / MANIFEST).is_file():
        return hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()[:16]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()).hexdigest()[:16]


def _is_path(text: str) -> bool:
    try:  # a recipe string may be a chat template, far too long for a path
        return bool(text) and "\n" not in text and Path(text).exists()
    except OSError:
        return False


def stale_reason(output_dir: str | Path, current: dict) -> str | None:
    """Why an existing output was not built from `current` (None when it was, or when there is nothing)."""
    out = Path(output_dir)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    path = out / FINGERPRINT
    if not path.is_file():
        return "it has no fingerprint (an earlier version wrote it)"
    before = json.loads(path.read_text())
    changed = sorted(k for k in {*before["recipe"], *current["recipe"]} if before["recipe"].get(k) != current["recipe"].get(k))
    if changed:
        return "the recipe changed: " + ", ".join(f"{k} {before['recipe'].get(k)!r} -> {current['recipe'].get(k)!r}" for k in changed[:4]) + (" ..." if len(changed) > 4 else "")
    inputs = sorted(k for k in {*before["inputs"], *current["inputs"]} if before["inputs"].get(k) != current["inputs"].get(k))
    if inputs:
        return "its input changed: " + ", ".join(inputs)
    return None


def set_aside(output_dir: str | Path) -> Path:
    """Move a stale output to `<output_dir>.previous` (or `.previous-2`, ...): nothing is deleted. A
    directory that no stage wrote (no fingerprint, recipe or manifest) is refused, not moved."""
    out = Path(output_dir)
    if not any((out / name).is_file() for name in (FINGERPRINT, MANIFEST, "recipe.yaml")):
        raise SmoeError("output_dir holds files that no stage wrote", str(out), "choose an empty or new output_dir")
    previous, n = out.with_name(out.name + ".previous"), 1
    while previous.exists():
        n += 1
        previous = out.with_name(f"{out.name}.previous-{n}")
    out.rename(previous)
    return previous


def write_fingerprint(output_dir: str | Path, current: dict):
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / FINGERPRINT, current)


def write_json_atomically(path: Path, value):
    """Write then rename: a crash (kill -9 in the middle) leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.rename(path)


def is_main_process() -> bool:
    """Under torchrun / accelerate every rank runs the stage; rank 0 alone moves and writes markers."""
    return int(os.environ.get("RANK", "0")) == 0
