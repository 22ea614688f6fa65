"""A loopback OpenAI-compatible server that misbehaves on cue, for the retry and failure tests.

The last user message decides the behaviour: `ok ...` answers at once; `flaky-429 ...` and
`flaky-500 ...` fail twice and then answer; `garbage ...` answers 200 with a body that is not JSON;
`hang ...` sleeps past any sane timeout; `refuse ...` answers 400 (not retried); `slow ...` echoes
after `slow_seconds`. Anything else echoes at once.
"""

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    def __init__(self, hang_seconds: float = 5.0, slow_seconds: float = 0.05, reply=None):
        """`reply(model, messages) -> str`, when given, writes the answers instead of the echo."""
        self.attempts = Counter()
        self.hang_seconds, self.slow_seconds = hang_seconds, slow_seconds
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = request["messages"][-1]["content"]
                kind = text.split()[0]
                server.attempts[text] += 1
                attempt = server.attempts[text]
                if kind in ("flaky-429", "flaky-500") and attempt <= 2:
                    return self._send(int(kind[-3:]), b'{"error": {"message": "try later"}}')
                if kind == "garbage":
                    return self._send(200, b"<html>not json")
                if kind == "hang":
                    time.sleep(server.hang_seconds)
                    return self._send(200, b"{}")
                if kind == "slow":
                    time.sleep(server.slow_seconds)
                if kind == "refuse":
                    return self._send(400, b'{"error": {"message": "bad request"}}')
                answer = {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": request["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply(request["model"], request["messages"]) if reply else f"echo: {text}"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(text), "completion_tokens": len(text) + 6, "total_tokens": 2 * len(text) + 6},
                }
                self._send(200, json.dumps(answer).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # a hung request's client has long gone when it wakes: its broken pipe is expected, not news (and
        # the default handler would print a traceback into whichever test is running then)
        self.httpd.handle_error = lambda request, client_address: None
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
