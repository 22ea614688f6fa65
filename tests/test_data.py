import json

import pytest

from alignment.data import read_rows, to_conversation, to_preference, to_prompt
from alignment.errors import SmoeError
from teacher_data.store import ShardStore

PROMPT = [{"role": "user", "content": "What is 1 + 1?"}]
GOOD = {"role": "assistant", "content": "Answer: 2"}
BAD = {"role": "assistant", "content": "Answer: 3"}


def test_preference_schemas_normalise_to_one_form():
    expected = {"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]}
    ultrafeedback = {"prompt": "What is 1 + 1?", "chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]}
    trl_conversational = {"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]}
    trl_standard = {"prompt": "What is 1 + 1?", "chosen": "Answer: 2", "rejected": "Answer: 3"}
    for row in (ultrafeedback, trl_conversational, trl_standard):
        assert to_preference(row, "f.jsonl", 1) == expected


def test_preference_rows_with_different_prompts_are_refused():
    row = {"chosen": PROMPT + [GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]}
    with pytest.raises(SmoeError, match="f.jsonl: row 7: chosen and rejected do not share one prompt"):
        to_preference(row, "f.jsonl", 7)


def test_prompt_sources_ultrachat_ultrafeedback_and_mt_bench():
    assert to_prompt({"prompt_id": "a", "messages": PROMPT + [GOOD]}, "f", 1)["messages"] == PROMPT
    assert to_prompt({"prompt_id": "b", "prompt": "What is 1 + 1?"}, "f", 1)["messages"] == PROMPT
    assert to_prompt({"question_id": 81, "category": "writing", "turns": ["What is 1 + 1?", "And 2 + 2?"]}, "f", 1) == {"prompt_id": "81", "messages": PROMPT, "category": "writing"}
    with pytest.raises(SmoeError, match="row 3 has no prompt"):
        to_prompt({"prompt_id": "c", "text": "hi"}, "f", 3)


def test_bad_messages_name_row_and_field():
    with pytest.raises(SmoeError, match="row 2: message 0 of `messages` needs a role"):
        to_conversation({"messages": [{"role": "bot", "content": "x"}]}, "messages", "f", 2)
    with pytest.raises(SmoeError, match="row 4: `messages` does not end with an assistant turn"):
        to_conversation({"messages": PROMPT}, "messages", "f", 4)
    with pytest.raises(SmoeError, match="row 5 has no `chosen` column"):
        to_conversation({"messages": PROMPT}, "chosen", "f", 5)


def test_malformed_jsonl_names_file_and_row(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n{not json\n")
    with pytest.raises(SmoeError, match=r"data.jsonl: row 2 is not valid JSON"):
        read_rows(path)


def test_reads_parquet_and_saved_datasets(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt_id": str(i), "messages": PROMPT + [GOOD]} for i in range(3)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    DatasetDict({"train_sft": Dataset.from_list(rows), "test_sft": Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "saved"))
    assert read_rows(tmp_path / "d.parquet") == rows
    assert read_rows(tmp_path / "saved") == rows


def test_shard_store_resumes_without_duplicates(tmp_path):
    store = ShardStore(tmp_path)
    store.write([{"prompt_id": "a"}, {"prompt_id": "b"}])
    (store.dir / "shard-00001.jsonl.tmp").write_text('{"prompt_id": "c"}\n')  # a crash mid-write
    store = ShardStore(tmp_path)
    assert store.done_ids() == {"a", "b"}
    store.write([{"prompt_id": "c"}])
    assert [r["prompt_id"] for r in store.rows()] == ["a", "b", "c"]
