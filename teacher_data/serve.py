"""Host a local model on a loopback port with `transformers serve` (a real OpenAI-compatible server)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from teacher_data.teachers import OpenAITeacher, Sampling


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_transformers_serve(model_dir: str, wait_seconds: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start the server and wait until it answers; returns (process, base_url). Terminate it when done."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "transformers"), "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}/v1"
    probe = OpenAITeacher(model_dir, base_url=url, max_retries=0, timeout=5)
    deadline = time.time() + wait_seconds
    while time.time() < deadline:
        if probe.complete([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=2))[0][0].text is not None:
            return server, url
        time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"transformers serve did not answer within {wait_seconds} s")
