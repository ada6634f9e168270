"""An HTTP pass-through to a real server that lets a fixed number of requests to one route through
and holds the next: a client behind it stops at a known point, however fast the machine is."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

FORWARDED = ("content-type", "accept", "authorization", "x-request-id")
RETURNED = ("content-type", "x-request-id", "retry-after")


class GatedProxy:
    """`url` forwards to `upstream`; of the requests whose path ends with `route`, the first
    `allow` pass and the others wait (until the proxy closes, then get a 503). `held` is set once
    one waits."""

    def __init__(self, upstream: str, route: str, allow: int):
        self.upstream, self.route, self.allow = upstream.rstrip("/"), route, allow
        self.passed = 0
        self.held = threading.Event()
        self._open = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def admit(self, path: str) -> bool:
        if not path.endswith(self.route):
            return True
        with self._lock:
            self.passed += 1
            return self.passed <= self.allow

    def __enter__(self) -> GatedProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._open.set()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self._forward()

    def do_POST(self):  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        proxy: GatedProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if not proxy.admit(self.path):
                proxy.held.set()
                proxy._open.wait(timeout=300)
                self.send_error(503)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() in FORWARDED}
            r = httpx.request(self.command, proxy.upstream + self.path, content=body,
                              headers=headers, timeout=120)
            self.send_response(r.status_code)
            for name in RETURNED:
                if name in r.headers:
                    self.send_header(name, r.headers[name])
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed meanwhile

    def log_message(self, *args) -> None:
        pass
