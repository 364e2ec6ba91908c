"""A tiny OpenAI-compatible chat-completions server with scripted verdicts, for tests/test_judge.py.

Run as ``python tests/_fake_judge_server.py``: it binds 127.0.0.1 on a free port and prints the port on stdout.
The behaviour of each request is chosen by a marker ``[[behaviour:arg]]`` in the last message's content (the test
puts it in the model's answer); counters are per marker, so "fail once, then succeed" works across retries:

    [[ok:N]]          200, verdict ending "Score: N"
    [[raw:TEXT]]      200, verdict TEXT verbatim (underscores become spaces)
    [[noscore:_]]     200, a verdict without any Score line
    [[once500:N]]     500 on the first request, then "Score: N"
    [[once429:N]]     429 (Retry-After: 0) on the first request, then "Score: N"
    [[always429:_]]   429 every time;  [[always500:_]] 500 every time;  [[bad400:_]] 400 (not retryable)
    [[sleep:N]]       sleeps 2 s before answering "Score: N" (longer than the tests' timeout)
    [[notchat:_]]     200 with a JSON body that is not a chat completion

GET /_requests returns every POST received so far ({"path", "headers", "body"}); POST /_reset clears the log and
the counters.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = re.compile(r"\[\[(\w+):([^\]]*)\]\]")
LOCK = threading.Lock()
REQUESTS: list[dict] = []
COUNTS: dict[str, int] = {}


def completion(text: str) -> dict:
    return {"id": "cmpl-fake", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, payload, headers: dict | None = None):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            self.wfile.write(body)

    def do_GET(self):
        with LOCK:
            self._send(200, list(REQUESTS))

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/_reset":
            with LOCK:
                REQUESTS.clear()
                COUNTS.clear()
            return self._send(200, {"ok": True})
        body = json.loads(raw)
        match = MARKER.search(body["messages"][-1]["content"])
        behaviour, arg = match.groups() if match else ("ok", "5")
        with LOCK:
            REQUESTS.append({"path": self.path, "headers": dict(self.headers), "body": body})
            key = match.group(0) if match else ""
            COUNTS[key] = COUNTS.get(key, 0) + 1
            attempt = COUNTS[key]
        self._respond(behaviour, arg, attempt)

    def _respond(self, behaviour: str, arg: str, attempt: int):
        verdict = completion(f"The answer is acceptable.\nScore: {arg}")
        if behaviour == "ok":
            return self._send(200, verdict)
        if behaviour == "raw":
            return self._send(200, completion(arg.replace("_", " ").replace("\\n", "\n")))
        if behaviour == "noscore":
            return self._send(200, completion("The answer is quite good, close to the reference."))
        if behaviour in ("once500", "once429") and attempt == 1 or behaviour in ("always500", "always429"):
            status = 429 if "429" in behaviour else 500
            return self._send(status, {"error": {"message": "scripted failure"}}, {"Retry-After": "0"})
        if behaviour in ("once500", "once429"):
            return self._send(200, verdict)
        if behaviour == "bad400":
            return self._send(400, {"error": {"message": "bad request"}})
        if behaviour == "sleep":
            time.sleep(2.0)
            return self._send(200, verdict)
        if behaviour == "notchat":
            return self._send(200, {"unexpected": True})
        return self._send(500, {"error": {"message": f"unknown behaviour {behaviour}"}})


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
