"""A stand-in embedding server for testing toolkit.utils without torch or a model.

Standard library only. It speaks just enough of the OpenAI API for wait_for_server
(``GET /v1/models``, ``POST /v1/embeddings``) and has switches for the failure modes the helpers
must handle. Every log line goes to stdout, flushed, one per request too.

Like ``toolkit.launch_server`` it serves on the listening socket whose descriptor is in
``TOOLKIT_LISTEN_FD`` when that is set, and binds ``--host``/``--port`` itself otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

LISTEN_FD_ENV = "TOOLKIT_LISTEN_FD"
# Request threads log concurrently; one lock keeps lines whole and lets die() log last.
_log_lock = threading.Lock()


def log(message: str) -> None:
    with _log_lock:
        sys.stdout.write(f"fake server: {message}\n")
        sys.stdout.flush()


class FakeServer(ThreadingHTTPServer):
    model = "fake-model"
    api_key: str | None = None
    ready_at = 0.0


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/v1/models":
            self._reply(200, {"object": "list", "data": [{"id": self.server.model}]})
        else:
            self._error(404, "not found")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._authorized():
            return
        if self.path != "/v1/embeddings":
            self._error(404, "not found")
        elif time.monotonic() < self.server.ready_at:
            self._error(503, "still warming up")
        else:
            inputs = json.loads(body)["input"]
            texts = [inputs] if isinstance(inputs, str) else inputs
            data = [
                {"object": "embedding", "index": i, "embedding": [float(len(text)), 1.0]}
                for i, text in enumerate(texts)
            ]
            self._reply(200, {"object": "list", "data": data, "model": self.server.model})

    def log_message(self, format: str, *args: Any) -> None:
        log(format % args)

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._error(401, "invalid api key")
        return False

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {"error": {"message": message, "type": "error", "code": status}})

    def _reply(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def make_server(host: str, port: int) -> FakeServer:
    fd = os.environ.pop(LISTEN_FD_ENV, None)
    if fd is None:
        server = FakeServer((host, port), Handler)
        log(f"bound {host}:{port} itself")
        return server
    sock = socket.socket(fileno=int(fd))
    sock.set_inheritable(False)
    server = FakeServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    log(f"serving on inherited socket fd {fd}, port {sock.getsockname()[1]}")
    return server


def die(code: int) -> None:
    with _log_lock:
        sys.stdout.write(f"fake server: exiting with code {code}\n")
        sys.stdout.flush()
        os._exit(code)


def ignore_sigterm(signum: int, frame: FrameType | None) -> None:
    log("ignoring SIGTERM")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--api-key")
    parser.add_argument("--startup-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--die-after", type=float, metavar="SECONDS")
    parser.add_argument("--spawn-child", action="store_true", help="start a `sleep 600`")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--echo-env", action="append", default=[], metavar="NAME")
    args = parser.parse_args()

    log(f"python {sys.executable}")
    log(f"args {json.dumps(sys.argv[1:])}")
    for name in args.echo_env:
        log(f"env {name}={os.environ.get(name)}")
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, ignore_sigterm)
    server = make_server(args.host, args.port)
    server.model = args.model
    server.api_key = args.api_key
    server.ready_at = time.monotonic() + args.startup_delay
    if args.spawn_child:
        child = subprocess.Popen(["sleep", "600"])
        log(f"spawned child {child.pid}")
    if args.die_after is not None:
        threading.Timer(args.die_after, die, args=(3,)).start()
    log("serving")
    server.serve_forever()


if __name__ == "__main__":
    main()
