"""The pipeline on a micro config: report, summary, and resuming after a failed stage."""

import json

import yaml

from alignment.cli import main
from tests.conftest import MICRO

# the untrained micro student rarely answers right: the teacher as a second policy guarantees pairs
TEACHER_POLICY = {"name": "teacher", "backend": "skills", "error_rate": 0.5, "num_samples": 2}

FAST = {"max_steps": 2, "logging_steps": 1, "report_to": "none", "per_device_train_batch_size": 4}


def micro_pipeline(root, micro_model, dpo_data, recipe_path="recipes/tiny/pipeline.yaml", block="tiny-demo"):
    """A shipped tiny pipeline, every stage pointed into `root` and shrunk. `micro_model` None: the recipe's
    own init-model stage builds the student, at micro size, into `root`/base."""
    d = lambda name: str(root / name)  # noqa: E731
    micro_model = micro_model or d("base")
    policy = [{"name": "dsft", "backend": "hf", "model": d("sft"), "num_samples": 4, "temperature": 1.0, "max_new_tokens": 8}, TEACHER_POLICY]
    overrides = {
        "base": {"output_dir": d("base"), **MICRO},
        "sft_data": {"output_dir": d("sft_data"), "prompts_per_skill": 12},
        "dsft": {"model_name_or_path": micro_model, "dataset_path": d("sft_data"), "output_dir": d("sft"), **FAST},
        "pref_data": {"output_dir": d("pref_data"), "prompts_per_skill": 6, "policies": policy},
        "ddpo": {"model_name_or_path": d("sft"), "dataset_path": dpo_data, "output_dir": d("dpo"), **FAST},
        "control_teacher_data": {"output_dir": d("control_data"), "prompts_per_skill": 6},
        "control_teacher_sft": {"model_name_or_path": d("sft"), "dataset_path": d("control_data"), "output_dir": d("control_teacher_sft"), **FAST},
        "control_chosen_sft": {"model_name_or_path": d("sft"), "dataset_path": d("pref_data"), "output_dir": d("control_chosen_sft"), **FAST},
        "eval": {
            "output_dir": d("eval"),
            "prompts_per_skill": 5,
            "max_new_tokens": 8,
            "models": [{"name": n, "path": d(p)} for n, p in [("dsft", "sft"), ("ddpo", "dpo"), ("control_teacher_sft", "control_teacher_sft"), ("control_chosen_sft", "control_chosen_sft")]],
        },
    }
    overrides["chat_eval"] = {
        "output_dir": d("chat_eval"),
        "prompts_per_skill": 2,
        "max_new_tokens": 8,
        "models": [{"name": "dsft", "path": d("sft")}, {"name": "ddpo", "path": d("dpo")}],
    }
    recipe = yaml.safe_load(open(recipe_path))
    recipe["output_dir"] = str(root)
    recipe["history"], recipe["readme"] = str(root / "history.jsonl"), str(root / "README.md")  # never the repository's
    (root / "README.md").write_text(f"# demo\n<!-- {block}:begin (written by the pipeline: do not edit) -->\nold\n<!-- {block}:end -->\nafter\n")
    keep_base = micro_model == d("base")
    recipe["stages"] = [{**s, "overrides": {**s.get("overrides", {}), **overrides[s["name"]]}} for s in recipe["stages"] if s["name"] != "base" or keep_base]
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_pipeline_runs_resumes_and_reports(tmp_path, micro_model, capsys):
    broken = micro_pipeline(tmp_path, micro_model, dpo_data=str(tmp_path / "missing"))
    assert main(["pipeline", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "stage 'ddpo' failed" in err and "missing" in err and "Traceback" not in err
    sft_stamp = (tmp_path / "sft" / "model.safetensors").stat().st_mtime_ns

    fixed = micro_pipeline(tmp_path, micro_model, dpo_data=str(tmp_path / "pref_data"))
    assert main(["pipeline", "--config", str(fixed)]) == 0
    out = capsys.readouterr().out
    assert out.count("is complete, built from this recipe and these inputs; skipping") == 3  # sft_data, dsft, pref_data
    assert (tmp_path / "sft" / "model.safetensors").stat().st_mtime_ns == sft_stamp

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["models"]) == {"dsft", "ddpo", "control_teacher_sft", "control_chosen_sft"}
    assert {"ddpo_minus_dsft", "ddpo_minus_control_teacher_sft", "ddpo_minus_control_chosen_sft"} <= set(summary["deltas"])
    dpo_steps = json.loads((tmp_path / "dpo" / "manifest.json").read_text())["global_step"]
    for control in ("control_teacher_sft", "control_chosen_sft"):
        assert json.loads((tmp_path / control / "manifest.json").read_text())["global_step"] == dpo_steps
    chat = summary["chat_benchmarks"]["chat_eval"]
    assert chat["single"]["ddpo"]["judged"] == 2 * 2 * 4 and "ddpo" in chat["pairwise"]  # 2 questions x 2 turns x 4 skills
    report = (tmp_path / "report.md").read_text()
    assert "## MT-Bench-format evaluation" in report
    assert "| ddpo |" in report and "report.png" in report
    assert (tmp_path / "report.png").stat().st_size > 10_000

    readme = (tmp_path / "README.md").read_text()  # the block now holds this run's table and machine, the rest is kept
    assert "\nold\n" not in readme and "| ddpo |" in readme and "run 1:" in readme and readme.startswith("# demo\n") and readme.endswith("after\n")
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 1

    assert main(["pipeline", "--config", str(fixed)]) == 0  # everything complete: nothing redone
    assert capsys.readouterr().out.count("is complete, built from this recipe and these inputs; skipping") == 9

    # a changed recipe reruns its stage, and every stage that reads its output reruns after it
    recipe = yaml.safe_load(fixed.read_text())
    next(s for s in recipe["stages"] if s["name"] == "dsft")["overrides"]["learning_rate"] = 3e-4
    fixed.write_text(yaml.safe_dump(recipe))
    assert main(["pipeline", "--config", str(fixed)]) == 0
    out = capsys.readouterr().out
    assert "rerunning " + str(tmp_path / "sft") + ": the recipe changed: learning_rate 0.001 -> 0.0003" in out
    assert out.count("is complete, built from this recipe and these inputs; skipping") == 2  # sft_data, control_data
    assert out.count("its input changed") == 6  # pref_data, ddpo, the two controls, eval, chat_eval: all that read dsft
    assert (tmp_path / "sft.previous" / "manifest.json").is_file()  # the old output set aside, not deleted
    assert (tmp_path / "eval.previous" / "results" / "dsft.json").is_file() and (tmp_path / "eval" / "results" / "dsft.json").is_file()  # scored again


def test_mixtral_pipeline_is_the_tiny_pipeline_with_a_mixtral_student(tmp_path):
    """Same stages and recipes as the JetMoE pipeline except the student; at micro size it trains a Mixtral
    (fused experts) end to end and writes its own README block."""
    jetmoe = yaml.safe_load(open("recipes/tiny/pipeline.yaml"))
    mixtral = yaml.safe_load(open("recipes/tiny/pipeline_mixtral.yaml"))
    assert [(s["name"], s["stage"]) for s in mixtral["stages"]] == [(s["name"], s["stage"]) for s in jetmoe["stages"]]
    differ = [s["name"] for s, j in zip(mixtral["stages"], jetmoe["stages"]) if s["config"] != j["config"] or s.get("match_steps_of") != j.get("match_steps_of")]
    assert differ == ["base"]  # skills, teacher, judge, training and evaluation recipes are JetMoE's, read as they are
    for stage in mixtral["stages"]:  # every path the overrides give lies under the Mixtral output dir
        paths = [v for k, v in (stage.get("overrides") or {}).items() if k in ("output_dir", "model_name_or_path", "dataset_path")]
        assert all(p.startswith(mixtral["output_dir"] + "/") for p in paths), stage["name"]

    config = micro_pipeline(tmp_path, None, dpo_data=str(tmp_path / "pref_data"), recipe_path="recipes/tiny/pipeline_mixtral.yaml", block="tiny-demo-mixtral")
    assert main(["pipeline", "--config", str(config)]) == 0
    for model in ("base", "sft", "dpo", "control_chosen_sft"):
        assert json.loads((tmp_path / model / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["models"]) == {"dsft", "ddpo", "control_teacher_sft", "control_chosen_sft"}
    assert json.loads((tmp_path / "control_teacher_sft" / "manifest.json").read_text())["global_step"] == json.loads((tmp_path / "dpo" / "manifest.json").read_text())["global_step"]
    readme = (tmp_path / "README.md").read_text()
    assert "<!-- tiny-demo-mixtral:begin" in readme and "\nold\n" not in readme and "| ddpo |" in readme and readme.endswith("after\n")


def test_pipeline_refuses_a_readme_without_its_block(tmp_path):
    """The Mixtral pipeline writes its own block: a README holding only the JetMoE block is refused before any stage runs."""
    recipe = yaml.safe_load(open("recipes/tiny/pipeline_mixtral.yaml"))
    (tmp_path / "README.md").write_text("<!-- tiny-demo:begin (written by the pipeline: do not edit) -->\n<!-- tiny-demo:end -->\n")
    recipe.update(readme=str(tmp_path / "README.md"), history=str(tmp_path / "h.jsonl"), output_dir=str(tmp_path / "out"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["pipeline", "--config", str(tmp_path / "p.yaml")]) == 2
    assert not (tmp_path / "out").exists()


def test_mixtral_student_heads_must_divide_the_width(capsys):
    args = ["init-model", "--config", "recipes/tiny/init_model_mixtral.yaml", "--kv_channels", "24", "--output_dir", "unused"]
    assert main(args) == 2
    assert "hidden_size 128 must be kv_channels 24 (the head width)" in capsys.readouterr().err
