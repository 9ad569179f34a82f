"""The search page's server as the tests run it: the real command (`python -m pipeline.search serve`) in a
subprocess on 127.0.0.1 at a free port, and plain HTTP requests to it (http.client: the path goes out
exactly as written, no client-side clean-up of `..` or escapes)."""
from __future__ import annotations

import http.client
import os
import re
import select
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.runs import ROOT


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes


@dataclass
class Server:
    proc: subprocess.Popen
    host: str
    port: int
    log: Path  # its stderr (a file: werkzeug logs every request there, and a pipe nobody reads would fill)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return Reply(r.status, dict(r.getheaders()), r.read())
        finally:
            conn.close()

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post_image(self, name: str, data: bytes, k: int | str = 10) -> Reply:
        body, content_type = multipart({"k": str(k)}, {"image": (name, data)})
        return self.request("POST", "/api/query", body, {"Content-Type": content_type})

    def stop(self) -> str:
        """Stops the server (by its pid); returns what it wrote on stderr."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        return self.log.read_text()


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for field, (name, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def start_server(index: Path, log: Path, *extra: str, timeout: float = 180) -> Server:
    """`python -m pipeline.search serve --index INDEX --port 0 ...` (stderr into `log`), once it says where it
    listens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.search", "serve", "--index", str(index), "--port",
                                 "0", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            found = re.search(r"http://([\d.]+):(\d+)/", line)
            if found:
                return Server(proc, found.group(1), int(found.group(2)), Path(log))
            if not line:  # the process ended
                break
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the server did not start: {Path(log).read_text()[-2000:]}")
