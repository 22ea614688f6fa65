"""The pipeline on a micro config: report, summary, and resuming after a failed stage."""

import json

import yaml

from alignment.cli import main

# the untrained micro student rarely answers right: the teacher as a second policy guarantees pairs
TEACHER_POLICY = {"name": "teacher", "backend": "skills", "error_rate": 0.5, "num_samples": 2}

FAST = {"max_steps": 2, "logging_steps": 1, "report_to": "none", "per_device_train_batch_size": 4}


def micro_pipeline(root, micro_model, dpo_data):
    """The shipped tiny pipeline, every stage pointed into `root` and shrunk."""
    d = lambda name: str(root / name)  # noqa: E731
    policy = [{"name": "dsft", "backend": "hf", "model": d("sft"), "num_samples": 4, "temperature": 1.0, "max_new_tokens": 8}, TEACHER_POLICY]
    overrides = {
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
    recipe = yaml.safe_load(open("recipes/tiny/pipeline.yaml"))
    recipe["output_dir"] = str(root)
    recipe["stages"] = [{**s, "overrides": overrides[s["name"]]} for s in recipe["stages"] if s["name"] in overrides]
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

    assert main(["pipeline", "--config", str(fixed)]) == 0  # everything complete: nothing redone
    assert capsys.readouterr().out.count("is complete, built from this recipe and these inputs; skipping") == 9

    # a changed recipe reruns its stage, and every stage that reads its output reruns after it
    recipe = yaml.safe_load(fixed.read_text())
    next(s for s in recipe["stages"] if s["name"] == "dsft")["overrides"]["learning_rate"] = 3e-4
    fixed.write_text(yaml.safe_dump(recipe))
    old_eval = json.loads((tmp_path / "eval" / "results" / "dsft.json").read_text())
    assert main(["pipeline", "--config", str(fixed)]) == 0
    out = capsys.readouterr().out
    assert "rerunning " + str(tmp_path / "sft") + ": the recipe changed: learning_rate 0.001 -> 0.0003" in out
    assert out.count("is complete, built from this recipe and these inputs; skipping") == 2  # sft_data, control_data
    assert out.count("its input changed") == 6  # pref_data, ddpo, the two controls, eval, chat_eval: all that read dsft
    assert (tmp_path / "sft.previous" / "manifest.json").is_file()  # the old output set aside, not deleted
    assert json.loads((tmp_path / "eval" / "results" / "dsft.json").read_text()) != old_eval
