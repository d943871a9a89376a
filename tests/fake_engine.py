#!/usr/bin/env python3
"""A small scripted llama-server stand-in for fault shapes the real engines can't be made to show
on demand (never ready, crash mid-load, ignoring SIGTERM, slow load, a stubborn child).

It accepts the llama-server argv orchestrate renders (reads --host, --port, -a; ignores the rest)
and takes its behaviour from environment variables:
  FAKE_READY_AFTER=S     /health answers 503 "Loading model" for S seconds, then 200 (default 0)
  FAKE_NEVER_READY=1     /health stays 503 forever
  FAKE_CRASH_AFTER=S     print a load error and exit 1 after S seconds
  FAKE_IGNORE_SIGTERM=1  ignore SIGTERM (the runtime must SIGKILL after its grace period)
  FAKE_SPAWN_CHILD=1     start a child in the same process group that also ignores SIGTERM
  FAKE_SPAWN_DETACHED=1  start a child in a session (and process group) of its own
  FAKE_TOKENS=N          a streamed answer ("stream": true) has N chunks (default 5), FAKE_TOKEN_DELAY=S apart
                         (default 0.01)
  FAKE_DIE_MID_STREAM=1  exit (as if killed) after the second chunk of a streamed answer
With LLAMA_API_KEY set or --api-key-file given, requests other than /health need that key (401), as
llama-server's do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if sys.argv[1:2] in (["--version"], ["--help"]):
    sys.exit(0)  # no version to tell: plans fall back to the catalog's version and ranges


def arg(name: str, default: str) -> str:
    argv = sys.argv[1:]
    return argv[argv.index(name) + 1] if name in argv else default


HOST, PORT, ALIAS = arg("--host", "127.0.0.1"), int(arg("--port", "8080")), arg("-a", "fake")
START = time.monotonic()
KEY = os.environ.get("LLAMA_API_KEY") or (open(arg("--api-key-file", "")).read().strip()
                                          if "--api-key-file" in sys.argv else "")
READY_AFTER = float(os.environ.get("FAKE_READY_AFTER", "0"))


def ready() -> bool:
    return not os.environ.get("FAKE_NEVER_READY") and time.monotonic() - START >= READY_AFTER


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, a kept-alive client connection waits
    # ~40 ms per response for its delayed ACK (llama-server, vLLM and SGLang do not stall like that).
    disable_nagle_algorithm = True
    def log_message(self, fmt: str, *args: object) -> None:
        print("request:", fmt % args, flush=True)

    def send(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def refused(self) -> bool:
        if KEY and self.path != "/health" and self.headers.get("Authorization") != f"Bearer {KEY}":
            self.send(401, {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}})
            return True
        return False

    def do_GET(self) -> None:  # noqa: N802
        if self.refused():
            return
        if not ready():
            self.send(503, {"error": {"code": 503, "message": "Loading model"}})
        elif self.path == "/health":
            self.send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self.send(200, {"object": "list", "data": [{"id": ALIAS, "object": "model"}]})
        else:
            self.send(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = {}
        if self.refused():
            return
        if not ready():
            self.send(503, {"error": {"code": 503, "message": "Loading model"}})
        elif body.get("stream"):
            self.stream(self.path.endswith("/chat/completions"))
        elif self.path.endswith("/chat/completions"):
            self.send(200, {"object": "chat.completion", "model": ALIAS, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": f"fake answer from {ALIAS}"},
                 "finish_reason": "stop"}]})
        else:
            self.send(200, {"object": "text_completion", "model": ALIAS, "choices": [{"text": "!", "index": 0}]})

    def chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def stream(self, chat: bool) -> None:
        """Chunked, as llama-server streams: a death mid-stream leaves the body visibly incomplete."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(int(os.environ.get("FAKE_TOKENS", "5"))):
            if i == 2 and os.environ.get("FAKE_DIE_MID_STREAM"):
                os._exit(137)
            choice = ({"index": 0, "delta": {"content": f"t{i} "}} if chat else {"index": 0, "text": f"t{i} "})
            event = {"object": "chat.completion.chunk" if chat else "text_completion", "model": ALIAS,
                     "choices": [choice]}
            self.chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            time.sleep(float(os.environ.get("FAKE_TOKEN_DELAY", "0.01")))
        self.chunk(b"data: [DONE]\n\n")
        self.chunk(b"")


def main() -> None:
    if os.environ.get("FAKE_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("FAKE_SPAWN_CHILD"):
        subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                          "signal.SIG_IGN); time.sleep(3600)"])
    if os.environ.get("FAKE_SPAWN_DETACHED"):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
    print(f"fake engine: loading model {arg('-m', '?')}", flush=True)
    crash = os.environ.get("FAKE_CRASH_AFTER")
    server = ThreadingHTTPServer((HOST, PORT), Handler)
    server.timeout = 0.1
    while True:
        if crash and time.monotonic() - START >= float(crash):
            print("llama_model_load: error loading model: tensor 'blk.3.ffn_up.weight' data is not within the "
                  "file bounds, model is corrupted or incomplete", flush=True)
            sys.exit(1)
        server.handle_request()


if __name__ == "__main__":
    main()
