"""Read datasets from disk and normalise them into the contracts of DESIGN.md.

Sources: a JSONL / JSON / Parquet file, a stage's output directory (its `train.jsonl`), a `datasets`
directory saved with `save_to_disk`, or a hub id (cached, or reachable). Public schemas are read as
they are: ultrachat_200k (`messages`), ultrafeedback_binarized (`prompt`, `chosen`, `rejected` as whole
conversations), TRL's conversational and standard preference formats, and MT-Bench `question.jsonl`.
A malformed row stops the run with the file, the row number and the fix.
"""

import json
from pathlib import Path

from alignment.errors import SmoeError

ROLES = {"system", "user", "assistant"}
DATA_FILE = "train.jsonl"  # what every dataset stage writes into its output directory


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SmoeError(f"row {number} is not valid JSON ({err.msg})", str(path), "fix or delete that line") from None
            if not isinstance(row, dict):
                raise SmoeError(f"row {number} is not a JSON object", str(path), "write one object per line")
            rows.append(row)
    return rows


def _from_datasets(dataset, split: str | None = None, where: str = "") -> list[dict]:
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if split is not None and split not in dataset:
            raise SmoeError(f"no split {split!r} (found {sorted(dataset)})", where, "name one of the splits it has")
        splits = [split] if split else ([s for s in dataset if s.startswith("train")] or list(dataset))
        dataset = dataset[splits[0]]
    return dataset.to_list()


def is_hub_id(source: str | Path) -> bool:
    """`owner/name` that is not a local path: something to fetch from the hub (or its cache)."""
    text = str(source)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/"))


def read_rows(source: str | Path, split: str | None = None, config: str | None = None) -> list[dict]:
    """Rows of a dataset; `split` picks a split of a `datasets` directory or hub dataset (else the first train split)."""
    path = Path(source)
    if path.is_dir():
        if (path / DATA_FILE).is_file():
            return _read_jsonl(path / DATA_FILE)
        if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            from datasets import load_from_disk

            return _from_datasets(load_from_disk(str(path)), split, str(path))
        files = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.parquet"))
        if not files:
            raise SmoeError("no dataset found in this directory", str(path), f"point at a stage output (with {DATA_FILE}), a JSONL/Parquet file or a saved `datasets` directory")
        return [row for f in files for row in read_rows(f)]
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise SmoeError("dataset file not found", str(path), "check the path in the recipe")
        return _read_jsonl(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data.get("data", [])
    if path.suffix == ".parquet":
        from datasets import Dataset

        return Dataset.from_parquet(str(path)).to_list()
    if is_hub_id(source):
        from datasets import load_dataset

        try:
            return _from_datasets(load_dataset(str(source), config), split, str(source))
        except Exception as err:  # offline with no cache, or no such dataset
            raise SmoeError(f"cannot load hub dataset ({err.__class__.__name__}: {err})", str(source), "download it once, or point at a local copy") from None
    raise SmoeError("dataset not found", str(source), "give a .jsonl/.parquet file, a directory, or a hub id")


def read_mixture(mixture: dict, where: str) -> list[dict]:
    """alignment-handbook's `dataset_mixture`: {datasets: [{id, split, columns, weight}], seed}.

    `id` is a local path or a hub id; `weight` keeps that fraction of the dataset's rows (after a seeded
    shuffle); the mixture is shuffled with the same seed.
    """
    import random

    if not isinstance(mixture, dict) or not isinstance(mixture.get("datasets"), list) or not mixture["datasets"]:
        raise SmoeError("dataset_mixture needs a non-empty `datasets` list", where, "write datasets: [{id: PATH_OR_HUB_ID, split: train, weight: 1.0}]")
    rng, rows = random.Random(mixture.get("seed", 0)), []
    for i, entry in enumerate(mixture["datasets"]):
        if "id" not in entry:
            raise SmoeError(f"dataset_mixture.datasets[{i}] has no `id`", where, "give the dataset's path or hub id as id")
        if entry.get("config") not in (None, "default") and not is_hub_id(entry["id"]):
            raise SmoeError(f"dataset_mixture.datasets[{i}] names config {entry['config']!r}, but a local dataset has no configs", where, "drop `config`, or point `id` at that configuration's own files")
        found = read_rows(entry["id"], entry.get("split"), entry.get("config"))
        if entry.get("columns"):
            found = [{k: row[k] for k in entry["columns"] if k in row} for row in found]
        rng.shuffle(found)
        rows += found[: round(entry.get("weight", 1.0) * len(found))]
    rng.shuffle(rows)
    return rows


def check_messages(messages, where: str, row: int, field: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise SmoeError(f"row {row}: `{field}` must be a non-empty list of messages", where, 'write it as [{"role": "user", "content": "..."}, ...]')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SmoeError(
                f"row {row}: message {i} of `{field}` needs a role in {sorted(ROLES)} and a string content",
                where,
                'each message is {"role": "user", "content": "..."}',
            )
    return messages


def to_prompt(row: dict, where: str, number: int) -> dict:
    """A prompt row in the prompts contract, from our own format, ultrachat / ultrafeedback or MT-Bench."""
    if "messages" in row:
        messages = check_messages(row["messages"], where, number)
        messages = [m for m in messages if m["role"] != "assistant"][: 2 if messages[0]["role"] == "system" else 1]
    elif isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
    elif isinstance(row.get("turns"), list) and row["turns"]:
        messages = [{"role": "user", "content": row["turns"][0]}]
    else:
        raise SmoeError(f"row {number} has no prompt", where, "give each row `messages`, a `prompt` string, or MT-Bench `turns`")
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise SmoeError(f"row {number}: the prompt has no non-empty user turn", where, "add the user's message")
    prompt_id = row.get("prompt_id", row.get("question_id"))
    if prompt_id is None:
        raise SmoeError(f"row {number} has no `prompt_id`", where, "give every row a unique prompt_id (or MT-Bench question_id)")
    out = {"prompt_id": str(prompt_id), "messages": messages}
    for key in ("category", "reference"):
        if key in row:
            out[key] = row[key]
    return out


def to_conversation(row: dict, field: str, where: str, number: int) -> list[dict]:
    """An SFT conversation ending in an assistant turn (ultrachat `messages`, or a preference `chosen`)."""
    if field not in row:
        raise SmoeError(f"row {number} has no `{field}` column", where, f"set messages_field to a column that holds conversations (found: {sorted(row)})")
    messages = check_messages(row[field], where, number, field)
    if messages[-1]["role"] != "assistant":
        raise SmoeError(f"row {number}: `{field}` does not end with an assistant turn", where, "drop the row or add the answer")
    return messages


def to_preference(row: dict, where: str, number: int) -> dict:
    """TRL's explicit conversational form: prompt messages, then one chosen and one rejected assistant turn.

    Accepts ultrafeedback_binarized (chosen / rejected are whole conversations that share the prompt),
    TRL conversational (`prompt` a list, `chosen` / `rejected` the answers) and TRL standard (strings).
    """
    for key in ("chosen", "rejected"):
        if key not in row:
            raise SmoeError(f"row {number} has no `{key}`", where, "preference rows need prompt, chosen and rejected")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str):
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    chosen = check_messages(chosen, where, number, "chosen")
    rejected = check_messages(rejected, where, number, "rejected")
    if isinstance(prompt, list):
        return {"prompt": check_messages(prompt, where, number, "prompt"), "chosen": chosen[-1:], "rejected": rejected[-1:]}
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise SmoeError(f"row {number}: chosen and rejected do not share one prompt", where, "both must be the same conversation up to the last assistant turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
