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
        split, dataset = splits[0], dataset[splits[0]]
    if len(dataset) == 0:
        raise SmoeError(f"split {split or 'train'!r} has no rows", where, "point at a split that holds data")
    return dataset.to_list()


def is_hub_id(source: str | Path) -> bool:
    """`owner/name` that is not a local path: something to fetch from the hub (or its cache)."""
    text = str(source)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/"))


def read_rows(source: str | Path, split: str | None = None, config: str | None = None) -> list[dict]:
    """Rows of a dataset; `split` picks a split of a `datasets` directory or hub dataset (else the first train
    split), `config` a hub dataset's configuration.

    An empty file or split, and a row that is not a JSON object, stop with the file and row."""
    rows = _rows(source, split, config)
    if not rows:
        raise SmoeError("no rows: the dataset is empty", str(source), "point at a file that holds data, or rerun the stage that writes it")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise SmoeError(f"row {number} is not a JSON object", str(source), "write one object per row")
    return rows


def _rows(source: str | Path, split: str | None, config: str | None = None) -> list:
    path = Path(source)
    if path.is_dir():
        if (path / DATA_FILE).is_file():
            return _read_jsonl(path / DATA_FILE)
        if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            from datasets import load_from_disk

            for state in [path / "state.json", *path.glob("*/state.json")]:  # `datasets` cannot load an empty split back
                if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
                    name = "train" if state.parent == path else state.parent.name
                    raise SmoeError(f"split {name!r} has no rows", str(path), "drop the empty split (or give it data) and save the dataset again")
            return _from_datasets(load_from_disk(str(path)), split, str(path))
        files = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.parquet"))
        if not files:
            raise SmoeError("no dataset found in this directory", str(path), f"point at a stage output (with {DATA_FILE}), a JSONL/Parquet file or a saved `datasets` directory")
        return [row for f in files for row in _rows(f, None)]
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise SmoeError("dataset file not found", str(path), "check the path in the recipe")
        return _read_jsonl(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise SmoeError("dataset file not found", str(path), "check the path in the recipe")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SmoeError(f"not valid JSON ({err.msg}, line {err.lineno})", str(path), "fix the JSON, or write one object per line as .jsonl") from None
        return data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else [data]
    if path.suffix == ".parquet":
        from datasets import Dataset

        if not path.is_file():
            raise SmoeError("dataset file not found", str(path), "check the path in the recipe")
        try:
            return Dataset.from_parquet(str(path)).to_list()
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise SmoeError(f"not a readable Parquet file ({err.__class__.__name__})", str(path), "rewrite the file, or convert it to JSONL") from None
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
        if not isinstance(entry, dict) or "id" not in entry:
            raise SmoeError(f"dataset_mixture.datasets[{i}] has no `id`", where, "give the dataset's path or hub id as id")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise SmoeError(f"the weight of {entry['id']} is {weight!r}, not a fraction from 0 to 1", where, "give each dataset a weight from 0 to 1 (the share of its rows kept)")
        if entry.get("config") not in (None, "default") and not is_hub_id(entry["id"]):
            raise SmoeError(f"dataset_mixture.datasets[{i}] names config {entry['config']!r}, but a local dataset has no configs", where, "drop `config`, or point `id` at that configuration's own files")
        found = read_rows(entry["id"], entry.get("split"), entry.get("config"))
        if entry.get("columns"):
            found = [{k: row[k] for k in entry["columns"] if k in row} for row in found]
        rng.shuffle(found)
        rows += found[: round(weight * len(found))]
    rng.shuffle(rows)
    return rows


def check_messages(messages, where: str, row: int, field: str = "messages", first: str = "user") -> list[dict]:
    """Turns in order: an optional system turn, then `first` (user, or assistant for TRL's answer lists) and the
    other taking turns; every content a string."""
    if not isinstance(messages, list) or not messages:
        raise SmoeError(f"row {row}: `{field}` must be a non-empty list of messages", where, 'write it as [{"role": "user", "content": "..."}, ...]')
    expected = first
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise SmoeError(f"row {row}: message {i} of `{field}` needs a role in {sorted(ROLES)} and a string content", where, 'each message is {"role": "user", "content": "..."}')
        if not isinstance(m.get("content"), str):
            raise SmoeError(f"row {row}: message {i} of `{field}` has {type(m.get('content')).__name__} content, not a string", where, "write each message's content as one string")
        if m["role"] == "system" and i == 0 and first == "user":
            continue
        if m["role"] != expected:
            raise SmoeError(f"row {row}: message {i} of `{field}` has role {m['role']!r} where {expected!r} belongs", where, "order the turns: an optional system turn first, then user and assistant taking turns")
        expected = "assistant" if expected == "user" else "user"
    return messages


def _check_answers(messages: list[dict], where: str, row: int, field: str):
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise SmoeError(f"row {row}: message {i} of `{field}` is an empty assistant turn", where, "drop the row or write the answer")


def to_prompt(row: dict, where: str, number: int) -> dict:
    """A prompt row in the prompts contract, from our own format, ultrachat / ultrafeedback or MT-Bench."""
    if "messages" in row:
        messages = check_messages(row["messages"], where, number)
        messages = [m for m in messages if m["role"] != "assistant"][: 2 if messages[0]["role"] == "system" else 1]
    elif isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
    elif isinstance(row.get("prompt"), list):  # TRL's conversational prompt-only form
        messages = check_messages(row["prompt"], where, number, "prompt")
    elif isinstance(row.get("turns"), list) and row["turns"]:
        if not isinstance(row["turns"][0], str):
            raise SmoeError(f"row {number}: `turns` holds a value of type {type(row['turns'][0]).__name__}, not a string", where, "write each turn as one string")
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
    _check_answers(messages, where, number, field)
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
        out = {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    elif isinstance(prompt, list):
        out = {
            "prompt": check_messages(prompt, where, number, "prompt"),
            "chosen": check_messages(chosen, where, number, "chosen", first="assistant")[-1:],
            "rejected": check_messages(rejected, where, number, "rejected", first="assistant")[-1:],
        }
        if out["prompt"][-1]["role"] != "user":
            raise SmoeError(f"row {number}: `prompt` does not end with a user turn", where, "the prompt is the conversation up to the answer")
    else:
        chosen, rejected = check_messages(chosen, where, number, "chosen"), check_messages(rejected, where, number, "rejected")
        if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
            raise SmoeError(f"row {number}: chosen and rejected do not share one prompt", where, "both must be the same conversation up to the last assistant turn")
        out = {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    for key in ("chosen", "rejected"):
        _check_answers(out[key], where, number, key)
        if out[key][-1]["role"] != "assistant":
            raise SmoeError(f"row {number}: `{key}` does not end with an assistant turn", where, "end chosen and rejected with the answers")
    if out["chosen"][-1]["content"].strip() == out["rejected"][-1]["content"].strip():
        raise SmoeError(f"row {number}: chosen and rejected are the same answer", where, "drop the row: a pair needs two different answers")
    return out


def keep_answerable(rows: list[dict], tokenizer, args, where: str, stage: str) -> list[dict]:
    """Drop the rows whose prompt alone fills `max_length`: truncation would cut every answer token (TRL's
    DPO drops such rows silently; SFT would train on no answer). The drop is noted; all rows dropped is refused.

    `rows` are {"messages"} (sft) or {"prompt", ...} (dpo); the prompt is everything before the first answer."""
    if not rows:
        raise SmoeError("no training rows", where, "check the dataset, dataset_mixture weights and max_train_samples")
    if tokenizer.chat_template is None:
        raise SmoeError("the tokenizer has no chat template", where, "set chat_template in the recipe, or use a chat model's tokenizer")
    if args.max_length is None or args.truncation_mode != "keep_start" or getattr(args, "packing", False):
        return rows  # keep_end keeps the answer; packing splits or wraps rows instead
    prompts = []
    for row in rows:
        messages = row.get("prompt") or row["messages"]
        prompts.append(messages[: next(i for i, m in enumerate(messages + [{"role": "assistant"}]) if m["role"] == "assistant")])
    texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    cut = [number for number, length in enumerate(lengths, 1) if length >= args.max_length]
    if len(cut) == len(rows):
        raise SmoeError(f"every row's prompt is {min(lengths)} tokens or longer, which fills max_length {args.max_length}: no answer token is left", where, "raise max_length, or shorten the prompts")
    if cut:
        print(f"[{stage}] note: dropped {len(cut)} of {len(rows)} rows of {where} whose prompt fills max_length {args.max_length}, leaving no answer token (first: row {cut[0]})")
    cut = set(cut)
    return [row for number, row in enumerate(rows, 1) if number not in cut]
