"""Teacher stages on Ray Data (`engine: ray`): a local Ray started for the run, 2 workers, the same
shards, dataset, failure counts and resume as the local engine. Marked `engines` (Ray starts slowly):
`make test-engines`."""

import json
import signal
import subprocess
import sys
import time
from importlib.util import find_spec

import psutil
import pytest

from alignment.cli import main
from alignment.errors import SmoeError
from alignment.manifest import is_complete, read_manifest
from teacher_data.generate import TeacherSFTArgs
from teacher_data.ray_engine import run_on_ray
from tests.fault_server import FaultServer

RAY = ["--engine", "ray", "--ray_workers", "2", "--ray_num_cpus", "2", "--ray_batch_size", "4"]
needs_ray = pytest.mark.skipif(find_spec("ray") is None, reason="ray is not installed (pip install -e .[ray])")


def rows(output_dir):
    return sorted(map(json.dumps, (json.loads(line) for line in open(output_dir / "train.jsonl"))))


def test_vllm_on_ray_without_vllm_is_a_clear_error(micro_model, tmp_path):
    args = TeacherSFTArgs(engine="ray", teacher={"backend": "vllm", "model": micro_model}, output_dir=str(tmp_path))
    expected = "vllm is not installed" if find_spec("ray") else "ray is not installed"
    if find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(SmoeError, match=expected):
        run_on_ray(args, [{"prompt_id": "1", "messages": []}], None, None, None, None, None, "failed")


@pytest.mark.engines
@needs_ray
def test_teacher_sft_on_ray_equals_the_local_engine_through_transformers_serve(served, tmp_path):
    url, model = served
    spec = json.dumps({"backend": "openai", "model": model, "base_url": url, "concurrency": 2, "max_retries": 1, "backoff": 0.1})
    common = ["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts_per_skill", "4", "--teacher", spec, "--max_new_tokens", "8", "--shard_size", "4"]
    assert main([*common, "--output_dir", str(tmp_path / "local")]) == 0
    assert main([*common, *RAY, "--output_dir", str(tmp_path / "ray")]) == 0
    assert rows(tmp_path / "ray") == rows(tmp_path / "local")
    local, ray = read_manifest(tmp_path / "local"), read_manifest(tmp_path / "ray")
    assert ray["engine"] == "ray" and ray["counts"] == local["counts"] and local["counts"]["prompts"] == 16
    assert ray["usage"]["teacher"]["completion_tokens"] == local["usage"]["teacher"]["completion_tokens"] > 0
    assert ray["usage"]["teacher"]["requests"] == 16


@pytest.mark.engines
@needs_ray
def test_killed_ray_driver_resumes_to_the_same_dataset(tmp_path):
    server = FaultServer()
    try:
        kinds = ["slow"] * 9 + ["refuse"]  # one prompt in ten fails for good: counted once, never retried into the data
        prompts = tmp_path / "p.jsonl"
        prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"{kinds[i % 10]} {i}"}) + "\n" for i in range(80)))
        spec = json.dumps({"backend": "openai", "model": "m", "base_url": server.base_url, "concurrency": 2, "max_retries": 0})
        command = [sys.executable, "-m", "alignment.cli", "teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts", str(prompts), "--teacher", spec, "--shard_size", "8", *RAY]
        killed = tmp_path / "killed"
        driver = subprocess.Popen(command + ["--output_dir", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while len(list((killed / "shards").glob("shard-*.jsonl"))) < 3 and time.time() < deadline:
            time.sleep(0.02)
        ray_processes = psutil.Process(driver.pid).children(recursive=True)  # the local Ray the driver started
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        for process in ray_processes:  # a killed driver leaves Ray's agents behind; the rerun starts its own Ray
            if process.is_running():
                process.kill()
        assert not is_complete(killed) and len(list((killed / "shards").glob("shard-*.jsonl"))) < 10
        assert subprocess.run(command + ["--output_dir", str(killed)], capture_output=True).returncode == 0
        whole = tmp_path / "whole"
        assert main(["teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts", str(prompts), "--teacher", spec, "--shard_size", "8", "--output_dir", str(whole)]) == 0
    finally:
        server.close()
    resumed = [json.loads(line) for shard in sorted((killed / "shards").glob("*.jsonl")) for line in open(shard)]
    assert len(resumed) == 80 and len({r["prompt_id"] for r in resumed}) == 80  # every prompt once in the shards
    assert rows(killed) == rows(whole) and len(rows(killed)) == 72
    assert read_manifest(killed)["counts"] == read_manifest(whole)["counts"] and read_manifest(killed)["counts"]["failed"] == 8


@pytest.mark.engines
@needs_ray
def test_teacher_prefs_on_ray_with_hf_policies_in_actors(micro_model, tmp_path):
    policies = json.dumps([{"name": "student", "backend": "hf", "model": micro_model, "num_samples": 1, "temperature": 0.0, "max_new_tokens": 6}, {"name": "teacher", "backend": "skills", "error_rate": 0.5, "num_samples": 2}])
    common = ["teacher-prefs", "--config", "recipes/tiny/teacher_prefs.yaml", "--prompts_per_skill", "4", "--policies", policies, "--shard_size", "4"]
    assert main([*common, "--output_dir", str(tmp_path / "local")]) == 0
    assert main([*common, *RAY, "--output_dir", str(tmp_path / "ray")]) == 0
    assert rows(tmp_path / "ray") == rows(tmp_path / "local") and len(rows(tmp_path / "local")) > 0
    assert read_manifest(tmp_path / "ray")["counts"] == read_manifest(tmp_path / "local")["counts"]


@pytest.mark.engines
@needs_ray
def test_killed_ray_worker_is_replaced_and_nothing_is_lost(tmp_path):
    server = FaultServer(slow_seconds=0.1)
    try:
        prompts = tmp_path / "p.jsonl"
        prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"slow {i}"}) + "\n" for i in range(64)))
        spec = json.dumps({"backend": "openai", "model": "m", "base_url": server.base_url, "concurrency": 1, "max_retries": 0})
        out = tmp_path / "out"
        command = [sys.executable, "-m", "alignment.cli", "teacher-sft", "--config", "recipes/tiny/teacher_sft.yaml", "--prompts", str(prompts), "--teacher", spec, "--shard_size", "8", "--output_dir", str(out), *RAY]
        driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, victim = time.time() + 120, None
        while victim is None and time.time() < deadline:  # a worker in the middle of its batches
            workers = [p for p in psutil.Process(driver.pid).children(recursive=True) if "ChunkWorker" in " ".join(p.cmdline())]
            victim = workers[0] if workers and list((out / "shards").glob("shard-*.jsonl")) else None
            time.sleep(0.05)
        assert victim is not None
        victim.kill()
        assert driver.wait(timeout=300) == 0
    finally:
        server.close()
    written = [json.loads(line) for shard in sorted((out / "shards").glob("*.jsonl")) for line in open(shard)]
    assert sorted(r["prompt_id"] for r in written) == sorted(f"p{i}" for i in range(64))
    assert read_manifest(out)["counts"]["rows"] == 64 and read_manifest(out)["counts"]["failed"] == 0
