"""A feedback web server in a subprocess for the browser and load tests: start, wait, kill, restart."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_candidates(path: pathlib.Path, n: int, k: int = 4, prefix: str = "") -> pathlib.Path:
    rows = [{"prompt": f"{prefix}Question {i}: how do I reset my password?",
             "responses": [f"Answer {i}.{j}: open settings and press reset ({j})." for j in range(k)]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def add_annotator(db: pathlib.Path, name: str, admin: bool = False) -> str:
    out = subprocess.run([sys.executable, "-m", "rlhf_jax.feedback.web", "add-annotator", "--db", str(db), "--name", name]
                         + (["--admin"] if admin else []), capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip().rsplit(": ", 1)[1]


class Server:
    """``python -m rlhf_jax.feedback.web serve ...`` on a free port of 127.0.0.1."""

    def __init__(self, args: list[str], log: pathlib.Path):
        self.args, self.log, self.port = args, log, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> Server:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax.feedback.web", "serve", *self.args,
                                      "--port", str(self.port)], cwd=ROOT, env=env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).read()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise TimeoutError(f"the server did not answer within {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
