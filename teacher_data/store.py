"""Append-only, resumable shard writer keyed by prompt id.

Each shard is written to a temporary name and renamed, so a shard on disk is always whole. A rerun
reads the ids already written and skips them: killed at any moment, a stage loses at most the shard in
flight and never writes a row twice. `finalize` joins the shards into the stage's one data file.
"""

import json
import os
from pathlib import Path

from alignment.errors import SmoeError


class ShardStore:
    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir) / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tmp"):  # a shard cut off mid-write: its rows are redone
            stale.unlink()

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.jsonl"))

    def rows(self):
        for shard in self.shards():
            with shard.open() as f:
                for number, line in enumerate(f, 1):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        row = None
                    if not isinstance(row, dict) or "prompt_id" not in row:
                        raise SmoeError(f"row {number} is not a JSON object with a prompt_id", str(shard), "delete this shard: a rerun redoes its prompts")
                    yield row

    def done_ids(self) -> set[str]:
        return {row["prompt_id"] for row in self.rows()}

    def write(self, rows: list[dict]):
        if not rows:
            return
        index = len(self.shards())
        path = self.dir / f"shard-{index:05d}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)


def write_jsonl(rows, path: str | Path):
    """Write rows atomically: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(path)
