"""Starts the real `plaza` binary for the Python end-to-end tests.

The binary is taken from $PLAZA_BIN (scripts/test.sh sets it) or target/debug/plaza.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEY = "python-test-key-0123456789"
CONFIG = """
ping_interval_secs = 0
[namespaces.chat]
client_publish = true
[namespaces.feed]
client_publish = false
[live]
[[live.dealers]]
name = "players"
model = "Player"
kind = "filter"
"""


class Plaza:
    def __init__(self, config: str):
        self.dir = Path(tempfile.mkdtemp(prefix="plaza-py-"))
        (self.dir / "plaza.toml").write_text(config)
        binary = os.environ.get("PLAZA_BIN", str(ROOT / "target" / "debug" / "plaza"))
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", str(self.dir / "plaza.toml"),
             "--listen", "127.0.0.1:0", "--backend-listen", "127.0.0.1:0",
             "--data-dir", str(self.dir / "data"), "--backend-key", KEY],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "RUST_LOG": "info"}, text=True,
        )
        self.public = self.backend = None
        deadline = time.monotonic() + 20
        while self.public is None or self.backend is None:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("plaza did not start within 20 s")
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("plaza exited before listening")
            m = re.search(r"addr=(\S+)", line)
            if m and "public listener bound" in line:
                self.public = m.group(1)
            elif m and "backend listener bound" in line:
                self.backend = m.group(1)
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        self.ws_url = f"ws://{self.public}/plaza/ws"

    def api(self, method: str, path: str, body=None, key=KEY):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(f"http://{self.backend}{path}", data=data, method=method)
        if key is not None:
            req.add_header("X-Plaza-Key", key)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> int:
        _, text = self.api("GET", "/metrics", key=None)
        for line in text.splitlines():
            if line.startswith(name + " "):
                return int(line.split()[-1])
        raise KeyError(name)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def plaza():
    server = Plaza(CONFIG)
    yield server
    server.stop()
