"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests, with injectable faults.

Faults are queued per prompt (the user message's text) or globally, one consumed per request:
  "429:<s>"   HTTP 429 with Retry-After: <s>
  "500"       HTTP 500
  "500echo"   HTTP 500 whose body echoes the request's Authorization header (a leaky proxy)
  "401"       HTTP 401
  "hang"      no response until `hang_s` passes (or the server stops)
  "malformed" HTTP 200, application/json, body that is not JSON
  "empty"     HTTP 200, a completion whose content is ""
  "drop"      the connection closed with no response (the client sees a connection error)
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import uuid
from typing import Callable

import pytest


def prompt_of(body: dict) -> str:
    """The text of the last user message."""
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            c = m["content"]
            if isinstance(c, str):
                return c
            return "".join(p.get("text", "") for p in c if p.get("type") == "text")
    return ""


def default_answer(prompt: str, body: dict) -> str:
    return f"answer to {prompt}"


class FakeChatServer:
    def __init__(self, answer: Callable[[str, dict], str] = default_answer, delay_s: float = 0.0, hang_s: float = 5.0):
        self.answer = answer
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.lock = threading.Lock()
        self.requests: list[dict] = []           # {"prompt", "body", "t", "headers"} per request
        self.successes: Counter = Counter()      # prompt -> completed 200 answers
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.global_faults: list[str] = []
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def total_successes(self) -> int:
        with self.lock:
            return sum(self.successes.values())

    def _next_fault(self, prompt: str) -> str | None:
        with self.lock:
            if self.faults.get(prompt):
                return self.faults[prompt].pop(0)
            if self.global_faults:
                return self.global_faults.pop(0)
        return None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls

            def handle(self) -> None:
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):  # a client killed mid-request
                    pass

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json", headers: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:  # a client killed mid-request
                    return
                prompt = prompt_of(body)
                with server.lock:
                    server.requests.append(
                        {"prompt": prompt, "body": body, "t": time.monotonic(),
                         "headers": {k.lower(): v for k, v in self.headers.items()}}
                    )
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, b'{"error": {"message": "not found"}}')
                fault = server._next_fault(prompt)
                if server.delay_s:
                    server._closing.wait(server.delay_s)
                try:
                    if fault is None or fault == "empty":
                        text = "" if fault == "empty" else server.answer(prompt, body)
                        out = {
                            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model"),
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                                      "total_tokens": len(prompt.split()) + len(text.split())},
                        }
                        self._send(200, json.dumps(out).encode())
                        if fault is None:
                            with server.lock:
                                server.successes[prompt] += 1
                    elif fault.startswith("429"):
                        wait_s = fault.split(":", 1)[1] if ":" in fault else "0"
                        self._send(429, b'{"error": {"message": "slow down"}}', headers={"Retry-After": wait_s})
                    elif fault == "500":
                        self._send(500, b'{"error": {"message": "internal error"}}')
                    elif fault == "500echo":
                        msg = {"error": {"message": f"bad gateway, you sent {self.headers.get('Authorization')}"}}
                        self._send(500, json.dumps(msg).encode())
                    elif fault == "401":
                        self._send(401, b'{"error": {"message": "invalid api key"}}')
                    elif fault == "hang":
                        server._closing.wait(server.hang_s)
                        self._send(500, b'{"error": {"message": "too late"}}')
                    elif fault == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                    elif fault == "malformed":
                        self._send(200, b'{"id": "chatcmpl-x", "choices": [ {"message": ')
                    else:
                        raise ValueError(f"unknown fault {fault}")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler


KEY_ENV = "VLRLCD_TEST_KEY"


@pytest.fixture
def server():
    """A FakeChatServer on 127.0.0.1 (import this fixture into a test module)."""
    with FakeChatServer(hang_s=3.0) as srv:
        yield srv


@pytest.fixture(autouse=True)
def api_key(monkeypatch) -> str:
    """A fresh fake API key in $VLRLCD_TEST_KEY for every test of a module that imports this fixture."""
    key = "sk-test-" + uuid.uuid4().hex
    monkeypatch.setenv(KEY_ENV, key)
    return key
