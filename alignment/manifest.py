"""A stage's manifest: written last, it marks the output directory complete."""

import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

MANIFEST = "manifest.json"
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
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.rename(out / MANIFEST)
