"""CLI errors: a clear message naming the key, file or row, exit code 2, and no traceback."""

import subprocess
import sys

import pytest

from alignment.cli import main


def smoe(*args):
    return subprocess.run([sys.executable, "-m", "alignment.cli", *map(str, args)], capture_output=True, text=True)


def test_unknown_key_in_a_real_process(tmp_path):
    result = smoe("sft", "--config", "recipes/tiny/sft.yaml", "--learning_rat", "1e-4", "--output_dir", tmp_path / "x")
    assert result.returncode == 2
    assert "unknown key 'learning_rat' (did you mean 'learning_rate'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_file(tmp_path, capsys):
    assert main(["sft", "--config", "recipes/tiny/sft.yaml", "--dataset_path", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "none.jsonl: dataset file not found" in capsys.readouterr().err


def test_malformed_row_names_the_row(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": "oops"}\n')
    assert main(["sft", "--config", "recipes/tiny/sft.yaml", "--dataset_path", str(data), "--output_dir", str(tmp_path / "o")]) == 2
    assert "d.jsonl: row 2: `messages` must be a non-empty list" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown stage 'nope'"),
    (["sft"], "no recipe given"),
    (["teacher-prefs", "--config", "recipes/tiny/teacher_prefs.yaml", "--binarize", "coin_flip"], "choose one of"),
    (["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--teacher", "{backend: oracle}"], "unknown teacher backend 'oracle'"),
    (["eval", "--config", "recipes/tiny/eval.yaml", "--models", "[{name: x, path: runs/none/model}]"], "runs/none/model: model not found"),
])
def test_bad_invocations(args, message, capsys, tmp_path):
    if "--config" in args:
        args = args + ["--output_dir", str(tmp_path / "o")]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_help_lists_trl_keys(capsys):
    assert main(["dpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "beta" in out and "loss_type" in out and "dataset_path" in out
