"""A canned OpenAI-compatible chat server on 127.0.0.1 for the backend tests (no external network)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class CannedChatServer:
    """Serves POST /v1/chat/completions from a script of answers, one per request, in order.

    An answer is a str (the assistant's message content), a dict (sent as JSON content), an int (an
    HTTP error status with an OpenAI-style error body), ("status", code, message) for an error with a
    given message, or ("sleep", seconds, answer). Past the
    script, or past ``max_requests``, it answers 500 so a runaway client fails instead of hanging.
    Every request body is kept in ``requests``.
    """

    def __init__(self, script: list, max_requests: int = 20):
        self.script, self.max_requests = list(script), max_requests
        self.requests: list[dict] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.paths.append(self.path)
                    server.requests.append(body)
                    over = len(server.requests) > server.max_requests
                    answer = server.script.pop(0) if server.script and not over else 500
                if self.path != "/v1/chat/completions":
                    answer = 404
                if isinstance(answer, tuple) and answer[0] == "sleep":
                    time.sleep(answer[1])
                    answer = answer[2]
                if isinstance(answer, int):
                    answer = ("status", answer, f"canned status {answer}")
                try:
                    if isinstance(answer, tuple) and answer[0] == "status":
                        self._send(answer[1], {"error": {"message": answer[2], "type": "error", "code": answer[1]}})
                    else:
                        content = answer if isinstance(answer, str) else json.dumps(answer)
                        self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                                         "model": body.get("model", "m"),
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": content}}],
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "CannedChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
