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
from alignment.stages import STAGES, recipe_classes

STAGE_RECIPES = {
    "init-model": "recipes/tiny/init_model.yaml",
    "teacher-sft": "recipes/tiny/teacher_sft.yaml",
    "sft": "recipes/tiny/sft.yaml",
    "teacher-prefs": "recipes/tiny/teacher_prefs.yaml",
    "dpo": "recipes/tiny/dpo.yaml",
    "quantize": None,  # no shipped recipe: every key from the test
    "eval": "recipes/tiny/eval.yaml",
    "pipeline": "recipes/tiny/pipeline.yaml",
    "export": None,
    "estimate-memory": "recipes/tiny/sft.yaml",
}


def base_recipe(stage: str, root: Path) -> dict:
    """The shipped tiny recipe, pointed at `root` and at inputs that do not exist, so that a case the checks
    miss fails fast (and names the wrong thing) instead of running a stage."""
    recipe = read_yaml(STAGE_RECIPES[stage]) if STAGE_RECIPES[stage] else {}
    recipe["output_dir"] = str(root / "out")
    missing = str(root / "missing.jsonl")
    if stage in ("sft", "dpo", "estimate-memory", "quantize", "export"):
        recipe.update(dataset_path=missing, model_name_or_path=str(root / "no_model"))
    if stage in ("quantize", "export"):
        recipe.pop("dataset_path")
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
    assert set(STAGES) <= set(STAGE_RECIPES), "a new stage needs its base recipe here"
    covered = {(stage, key) for stage, key, *_ in RECIPE_CASES}
    assert all((stage, f.name) in covered for stage in STAGE_RECIPES for f, _ in stage_fields(stage))
    print(f"\nrecipe cases: {len(RECIPE_CASES)} over {len(covered)} stage keys")


# ---- dataset defects, for every reader ----

USER, ANSWER = {"role": "user", "content": "Reverse the word cat."}, {"role": "assistant", "content": "Answer: tac"}
OTHER = {"role": "assistant", "content": "Answer: cat"}
ANSWER_ROW = {"question_id": 1, "answer_id": "a1", "model_id": "m", "choices": [{"index": 0, "turns": ["one", "two"]}], "tstamp": 0}
QUESTIONS = "tests/fixtures/questions.jsonl"

# reader -> (a good row, its defects: name -> (bad row, words the error must hold besides the file))
READERS = {
    "sft": ({"messages": [USER, ANSWER]}, {
        "no assistant turn": ({"messages": [USER]}, "row 2"),
        "roles out of order": ({"messages": [USER, USER, ANSWER]}, "row 2"),
        "assistant first": ({"messages": [ANSWER, USER, ANSWER]}, "row 2"),
        "non-string content": ({"messages": [USER, {"role": "assistant", "content": 5}]}, "row 2"),
        "list content": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, ANSWER]}, "row 2"),
        "empty answer": ({"messages": [USER, {"role": "assistant", "content": " "}]}, "row 2"),
        "unknown role": ({"messages": [{"role": "bot", "content": "x"}, ANSWER]}, "row 2"),
    }),
    "dpo": ({"prompt": USER["content"], "chosen": [USER, ANSWER], "rejected": [USER, OTHER]}, {
        "no assistant turn": ({"prompt": "q", "chosen": [USER, ANSWER, USER], "rejected": [USER, ANSWER, USER]}, "row 2"),
        "empty completion": ({"prompt": "q", "chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": ""}]}, "row 2"),
        "empty completion, TRL standard form": ({"prompt": "q", "chosen": "Answer: tac", "rejected": ""}, "row 2"),
        "roles out of order": ({"prompt": "q", "chosen": [USER, USER, ANSWER], "rejected": [USER, USER, OTHER]}, "row 2"),
        "roles out of order, TRL conversational form": ({"prompt": [USER, ANSWER], "chosen": [ANSWER], "rejected": [OTHER]}, "row 2"),
        "non-string content": ({"prompt": "q", "chosen": [USER, {"role": "assistant", "content": None}], "rejected": [USER, OTHER]}, "row 2"),
        "chosen equals rejected": ({"prompt": "q", "chosen": [USER, ANSWER], "rejected": [USER, ANSWER]}, "row 2"),
        "different prompts": ({"prompt": "q", "chosen": [USER, ANSWER], "rejected": [{"role": "user", "content": "other"}, OTHER]}, "row 2"),
        "no rejected": ({"prompt": "q", "chosen": [USER, ANSWER]}, "row 2"),
    }),
    "teacher-sft prompts": ({"prompt_id": "p1", "messages": [USER]}, {
        "roles out of order": ({"prompt_id": "p2", "messages": [USER, USER]}, "row 2"),
        "non-string content": ({"prompt_id": "p2", "messages": [{"role": "user", "content": 7}]}, "row 2"),
        "no user turn": ({"prompt_id": "p2", "messages": [{"role": "system", "content": "Be brief."}]}, "row 2"),
        "empty prompt": ({"prompt_id": "p2", "prompt": "  "}, "row 2"),
        "non-string turns": ({"question_id": 2, "turns": [3]}, "row 2"),
        "no prompt": ({"prompt_id": "p2", "text": "hi"}, "row 2"),
        "no prompt_id": ({"prompt": "hi"}, "row 2"),
    }),
    "teacher-prefs prompts": ({"prompt_id": "p1", "prompt": "Reverse the word cat."}, {
        "roles out of order": ({"prompt_id": "p2", "messages": [ANSWER, USER]}, "row 2"),
        "non-string content": ({"prompt_id": "p2", "messages": [{"role": "user", "content": None}]}, "row 2"),
        "no user turn": ({"prompt_id": "p2", "messages": [{"role": "system", "content": "Be brief."}]}, "row 2"),
        "no prompt_id": ({"prompt": "hi"}, "row 2"),
    }),
    "decontamination file": ({"question_id": 1, "category": "writing", "turns": ["Write a poem."]}, {
        "non-string turns": ({"question_id": 2, "turns": ["fine", {"x": 1}]}, "row 2"),
        "roles out of order": ({"messages": [USER, USER]}, "row 2"),
        "no prompt": ({"question_id": 2, "text": "hi"}, "row 2"),
    }),
    "questions": ({"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Shorter."]}, {
        "non-string turns": ({"question_id": 2, "category": "writing", "turns": ["fine", 5]}, "row 2"),
        "empty turns": ({"question_id": 2, "category": "writing", "turns": []}, "row 2"),
        "repeated question_id": ({"question_id": 1, "category": "writing", "turns": ["again"]}, "row 2"),
    }),
    "judge prompts": ({"name": "single-v1", "type": "single", "system_prompt": "Grade.", "prompt_template": "{question} {answer} [[N]]", "output_format": "[[rating]]"}, {
        "non-string template": ({"name": "pair-v2", "system_prompt": "x", "prompt_template": ["{question}"]}, "row 2"),
        "non-string system prompt": ({"name": "pair-v2", "system_prompt": 3, "prompt_template": "{question} {answer_a} {answer_b}"}, "row 2"),
        "missing placeholders": ({"name": "pair-v2", "system_prompt": "x", "prompt_template": "{question}"}, "row 2"),
    }),
    "reference answers": ({**ANSWER_ROW, "question_id": 2}, {
        "non-string turns": ({**ANSWER_ROW, "choices": [{"index": 0, "turns": [1, 2]}]}, "row 2"),
        "not the answer format": ({"question_id": 1, "answer": "x"}, "row 2"),
        "unknown question": ({**ANSWER_ROW, "question_id": 99}, "row 2"),
    }),
    "model answers": (ANSWER_ROW, {
        "non-string turns": ({**ANSWER_ROW, "question_id": 2, "choices": [{"index": 0, "turns": ["x", None]}]}, "row 2"),
        "not the answer format": ({"question_id": 2, "choices": []}, "row 2"),
    }),
    "teacher-sft shards": ({"prompt_id": "p1", "prompt": "hi", "messages": [USER, ANSWER], "teacher": "skills", "finish_reason": "stop"}, {}),
}
PATH_READERS = set(READERS) - {"model answers", "teacher-sft shards"}  # those read a file at a fixed place in output_dir
TRAINING_READERS = ("sft", "dpo")


def reader_setup(reader: str, root: Path, micro_model: str, data: Path) -> tuple[list[str], Path]:
    """argv of a real stage run that reads `reader`'s file (`data`, where the reader takes a path), and where
    that file must be."""
    out = root / "out"
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "p1", "prompt": "Reverse the word cat."}) + "\n")
    mt_bench = ["eval", "--config", "recipes/tiny/chat_eval.yaml", "--question_file", QUESTIONS, "--baseline", "null", "--models", "[{name: m, backend: skills}]"]
    setups = {
        "sft": (["sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(data)], data),
        "dpo": (["dpo", "--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(data)], data),
        "teacher-sft prompts": (["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts", str(data)], data),
        "teacher-prefs prompts": (["teacher-prefs", "--config", "recipes/tiny/teacher_prefs.yaml", "--prompts", str(data), "--policies", "[{backend: skills}]"], data),
        "decontamination file": (["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts", str(prompts), "--decontaminate_against", json.dumps([str(data)])], data),
        "questions": (mt_bench + ["--question_file", str(data)], data),
        "judge prompts": (mt_bench + ["--judge_prompts", str(data)], data),
        "reference answers": (mt_bench + ["--reference_answers", str(data)], data),
        "model answers": (mt_bench, out / "model_answer" / "m.jsonl"),
        "teacher-sft shards": (["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts", str(prompts)], out / "shards" / "shard-00000.jsonl"),
    }
    argv, path = setups[reader]
    return argv + ["--output_dir", str(out)], path


def dataset_cases():
    """(reader, defect, file content or None for an empty split, words the error must hold besides the file)."""
    cases = []
    for reader, (good, defects) in READERS.items():
        first = json.dumps(good) + "\n"
        if reader != "teacher-sft shards":  # an empty shard holds no rows to mistake
            cases.append((reader, "empty file", "", "no rows"))
        cases.append((reader, "not JSON", first + '{"prompt": "cut off\n', "row 2"))
        cases.append((reader, "not an object", first + "[1, 2]\n", "row 2"))
        if reader in PATH_READERS:
            cases.append((reader, "empty split", None, "split 'train'"))
        if reader in TRAINING_READERS:
            cases.append((reader, "every row truncated to no answer", first, "max_length"))
        cases += [(reader, name, first + json.dumps(bad) + "\n", words) for name, (bad, words) in defects.items()]
    return cases


DATASET_CASES = dataset_cases()


@pytest.mark.parametrize("reader, defect, content, words", DATASET_CASES, ids=[f"{r}-{d}" for r, d, *_ in DATASET_CASES])
def test_dataset_defect(reader, defect, content, words, micro_model, tmp_path, capfd):
    from datasets import Dataset, DatasetDict

    argv, path = reader_setup(reader, tmp_path, micro_model, tmp_path / ("saved" if content is None else "data.jsonl"))
    if reader not in PATH_READERS:  # a stage's own output: written by a first run, then damaged, the run cut off
        assert main(argv) == 0
        (tmp_path / "out" / "manifest.json").unlink()
        capfd.readouterr()
    if content is None:  # a saved `datasets` directory whose train split is empty
        DatasetDict({"train": Dataset.from_dict({"text": []}), "test": Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(path))
    else:
        path.write_text(content)
    if defect == "every row truncated to no answer":
        argv += ["--max_length", "8"]
    code = main(argv)
    assert_clear_error(capfd, code, [str(path), words], tmp_path)


# values inside a key: the sampling keys of each policy, the weights of a dataset mixture, model entries
NESTED_CASES = [
    (["teacher-prefs", "--config", "recipes/tiny/teacher_prefs.yaml", "--policies", "[{backend: skills, num_samples: abc}]"], ["policies[0]: key num_samples"]),
    (["teacher-prefs", "--config", "recipes/tiny/teacher_prefs.yaml", "--policies", "[{backend: skills, temperature: -1}]"], ["policies[0]: key temperature"]),
    (["teacher-prefs", "--config", "recipes/tiny/teacher_prefs.yaml", "--policies", "[{backend: skills, top_p: 2}]"], ["policies[0]: key top_p"]),
    (["teacher-prefs", "--config", "recipes/tiny/teacher_prefs.yaml", "--policies", "[skills]"], ["--policies"]),
    (["sft", "--config", "recipes/tiny/sft.yaml", "--dataset_mixture", f"{{datasets: [{{id: {QUESTIONS}, weight: abc}}]}}"], ["dataset_mixture", "weight"]),
    (["sft", "--config", "recipes/tiny/sft.yaml", "--dataset_mixer", f"{{{QUESTIONS}: -0.5}}"], ["dataset_mixer", "weight"]),
    (["eval", "--config", "recipes/tiny/eval.yaml", "--models", "[{name: a, path: 5}]"], ["--models"]),
]


@pytest.mark.parametrize("argv, names", NESTED_CASES, ids=[" ".join(a[-2:]) for a, _ in NESTED_CASES])
def test_nested_value(argv, names, tmp_path, capfd):
    code = main(argv + ["--output_dir", str(tmp_path / "out")])
    assert_clear_error(capfd, code, names, tmp_path)


def test_matrix_size():
    total = len(RECIPE_CASES) + len(DATASET_CASES) + len(NESTED_CASES)
    print(f"\nmatrix: {len(RECIPE_CASES)} recipe cases + {len(DATASET_CASES)} dataset cases over {len(READERS)} readers + {len(NESTED_CASES)} nested values = {total}")
    assert len(DATASET_CASES) >= 60 and len(RECIPE_CASES) >= 1000


# ---- beyond the matrix ----


def test_some_rows_truncated_to_no_answer_are_dropped_with_a_note(micro_model, capsys):
    from types import SimpleNamespace

    from alignment.data import keep_answerable
    from alignment.models.jetmoe import load_tokenizer

    short, long = {"messages": [USER, ANSWER]}, {"messages": [{"role": "user", "content": "x" * 200}, ANSWER]}
    args = SimpleNamespace(max_length=64, truncation_mode="keep_start", packing=False)
    kept = keep_answerable([short, long, short], load_tokenizer(micro_model), args, "d.jsonl", "sft")
    assert kept == [short, short]
    assert "dropped 1 of 3 rows of d.jsonl whose prompt fills max_length 64, leaving no answer token (first: row 2)" in capsys.readouterr().out
    keep_end = SimpleNamespace(max_length=64, truncation_mode="keep_end", packing=False)
    assert keep_answerable([short, long], load_tokenizer(micro_model), keep_end, "d.jsonl", "sft") == [short, long]


def test_a_judgment_cache_line_cut_off_by_a_crash_is_asked_again(tmp_path):
    from alignment.evaluate.mt_bench import CachedJudge

    cache = tmp_path / "judgment_cache.jsonl"
    cache.write_text(json.dumps({"key": "k1", "output": "Rating: [[7]]"}) + '\n{"key": "k2", "outp')
    assert CachedJudge({"backend": "skills"}, cache, 16).cache == {"k1": "Rating: [[7]]"}


def test_4bit_without_bitsandbytes_is_refused_with_the_fix(monkeypatch):
    from alignment.errors import SmoeError
    from alignment.models.quant import bitsandbytes

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an install without the package looks like
    with pytest.raises(SmoeError, match="recipe key load_in_4bit: 4-bit expert banks need bitsandbytes"):
        bitsandbytes()


SCRIPT = """
import sys
sys.modules["bitsandbytes"] = None  # as if it were not installed
from alignment.cli import main
print("codes", main(sys.argv[1:4]), main(sys.argv[4:]))
"""


def test_sft_and_estimate_memory_run_without_bitsandbytes(micro_model, tmp_path):
    data = tmp_path / "d.jsonl"
    long = {"messages": [{"role": "user", "content": "x" * 300}, ANSWER]}  # its prompt alone fills max_length 128
    data.write_text("".join(json.dumps(row) + "\n" for row in [{"messages": [USER, ANSWER]}] * 4 + [long]))
    estimate = ["estimate-memory", "--config", "recipes/tiny/sft.yaml"]
    sft = ["sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(data), "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "2"]
    (tmp_path / "recipe_at_micro.yaml").write_text(Path("recipes/tiny/sft.yaml").read_text() + f"\nmodel_name_or_path: {micro_model}\n")
    estimate[2] = str(tmp_path / "recipe_at_micro.yaml")
    result = subprocess.run([sys.executable, "-c", SCRIPT, *estimate, *sft], capture_output=True, text=True)
    assert "codes 0 0" in result.stdout, result.stderr[-3000:]
    assert "<- this recipe" in result.stdout
    assert "dropped 1 of 5 rows" in result.stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert (manifest["rows"], manifest["dropped_truncated"]) == (4, 1)


def test_spot_check_in_a_real_process(tmp_path):
    """The matrix runs in-process; this one case runs as a user runs it."""
    args, names = ["sft", "--config", "recipes/tiny/sft.yaml", "--learning_rate", "abc"], ["override --learning_rate", "'abc' is not a number"]
    result = subprocess.run([sys.executable, "-m", "alignment.cli", *args, "--output_dir", str(tmp_path / "o")], capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr
    assert all(name in errors[0] for name in names) and "  fix: give " in result.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was written


# what only TRL, transformers or PEFT can refuse, once the model and data are there: still one clear error
RUNTIME = {
    "lora target matching nothing": ("sft", ["--use_peft", "true", "--lora_target_modules", "[nope]"]),
    "chat template that does not parse": ("sft", ["--chat_template", "{% for x in %}"]),
    "save_strategy best without a metric": ("sft", ["--save_strategy", "best"]),
    "unknown DPO loss type": ("dpo", ["--loss_type", "[nope]"]),
    "model directory without a config": ("sft", ["--model_name_or_path", "EMPTY_MODEL"]),
}


@pytest.mark.parametrize("case", sorted(RUNTIME))
def test_what_the_libraries_refuse_is_one_clear_error(case, micro_model, tmp_path, capsys):
    stage, flags = RUNTIME[case]
    data = tmp_path / "data.jsonl"
    prompt = [{"role": "user", "content": "reverse ab"}]
    row = {"messages": prompt + [{"role": "assistant", "content": "Answer: ba"}]} if stage == "sft" else {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Answer: ba"}], "rejected": [{"role": "assistant", "content": "Answer: ab"}]}
    data.write_text(json.dumps(row) + "\n")
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "empty_model" / "notes.txt").write_text("no model here")
    flags = [str(tmp_path / "empty_model") if f == "EMPTY_MODEL" else f for f in flags]
    args = [stage, "--config", f"recipes/tiny/{stage}.yaml", "--model_name_or_path", micro_model, "--dataset_path", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none"]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] and "fix:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()
