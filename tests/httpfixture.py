"""A real HTTP server on 127.0.0.1 for URL-source tests: images, flaky, slow, huge and missing
routes, with a log of request times per path. Started and stopped by the test that uses it."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ImageServer:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.hits: dict[str, list[float]] = defaultdict(list)
        self.failures_left: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.hits[self.path].append(time.monotonic())
                kind, _, name = self.path.lstrip("/").partition("/")
                if kind == "flaky":  # /flaky/<n>/<name>: n times 503, then the file
                    count, _, name = name.partition("/")
                    left = server.failures_left.setdefault(self.path, int(count))
                    if left > 0:
                        server.failures_left[self.path] = left - 1
                        return self._send(503, b"busy")
                    kind = "img"
                if kind == "img" and name in server.files:
                    return self._send(200, server.files[name])
                if kind == "slow":
                    time.sleep(float(name))
                    return self._send(200, b"late")
                if kind == "huge":  # a body without Content-Length that never ends soon
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(4096):
                        self.wfile.write(b"\0" * 65536)
                    return None
                return self._send(404, b"not found")

            def _send(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
