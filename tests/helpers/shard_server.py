"""A real HTTP server on 127.0.0.1 (a free port, in a thread) that serves a dataset folder, and can be
told to misbehave for one file: answer 404, cut the connection half-way through the body, or stall."""
from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Faults:
    """What the server does wrong, per file name: `kind` from request number `after` on (1-based: after=1
    is every request), for `times` requests (None: for ever)."""

    def __init__(self):
        self.rules: dict[str, tuple[str, int, int | None]] = {}
        self.requests: Counter = Counter()
        self.given_up: Counter = Counter()  # stalls the client gave up on (it asked again while this one waited)

    def add(self, name: str, kind: str, after: int = 1, times: int | None = None) -> None:
        assert kind in ("404", "cut", "stall")
        self.rules[name] = (kind, after, times)

    def fault(self, name: str) -> str | None:
        self.requests[name] += 1
        if name not in self.rules:
            return None
        kind, after, times = self.rules[name]
        n = self.requests[name]
        return kind if n >= after and (times is None or n < after + times) else None


class _Handler(SimpleHTTPRequestHandler):
    faults: Faults

    def log_message(self, *args):  # quiet: the test output is not the server's log
        pass

    def do_GET(self):
        name = self.path.lstrip("/").split("?")[0]
        kind = self.faults.fault(name)
        if kind == "404":
            self.send_error(404, "gone")
            return
        if kind in ("cut", "stall"):
            body = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if kind == "stall":  # until the client asks again (it timed out), or 10 s at most
                asked, deadline = self.faults.requests[name], time.monotonic() + 10
                while self.faults.requests[name] == asked and time.monotonic() < deadline:
                    time.sleep(0.02)
                self.faults.given_up[name] += self.faults.requests[name] > asked
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve_folder(folder: Path, faults: Faults | None = None):
    """Yields (the folder's URL, the faults) while a server on a free port of 127.0.0.1 serves `folder`;
    stopped and closed at the end."""
    faults = faults or Faults()
    handler = type("Handler", (_Handler,), {"faults": faults})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", faults
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
