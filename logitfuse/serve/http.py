"""The HTTP side of ``logitfuse serve``: reading each request under one deadline, the bearer-token
check, the routes, and every answer as JSON (errors included, never quoting the request).

:class:`CompletionsHandler` serves a :class:`logitfuse.serve.server.CompletionServer`: it reads the
server's ``read_timeout``, ``api_key``, ``max_body_bytes``, ``model_name``, ``top_k_max``,
``log_requests`` and ``received``, asks ``server.complete(body, cancelled)`` for each completion and
calls ``server.count_request()`` after each answer. A request that cannot be served raises
:class:`BadRequest`, which becomes the JSON error reply; ``cancelled()`` tells whether the client has
gone (it closed the connection, or its sending side), and the completion then raises
:class:`RequestCancelled`: the connection closes without an answer.

>>> import json
>>> json.loads(error_body(400, "max_tokens must be an int in [1, 4096]"))["error"]["type"]
'invalid_request_error'
"""

from __future__ import annotations

import hmac
import io
import json
import re
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from logitfuse.serve.server import CompletionServer

__all__ = ["BUSY_REPLY", "BadRequest", "CompletionsHandler", "RequestCancelled", "error_body"]

_ROUTES = "this server serves POST /v1/completions, GET /v1/models and GET /health"


class BadRequest(Exception):
    """A request that cannot be served: answered with ``status`` and the message as a JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RequestCancelled(Exception):
    """The client has gone while its request was computed: the work stopped, nobody to answer."""


def error_body(status: int, message: str) -> bytes:
    """The JSON error reply ``{"error": {"message", "type", "code"}}`` for ``status``."""
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode("utf-8")


_BUSY_BODY = error_body(503, "too many connections; retry shortly")
#: the whole 503 reply the server writes, without a handler, to a connection beyond ``max_connections``
BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _DeadlineReader(io.RawIOBase):
    """Reads a socket under one deadline per request, so a client sending slowly is cut off too."""

    def __init__(self, sock: socket.socket, seconds: float):
        self._sock, self._seconds = sock, seconds
        self.restart()

    def restart(self) -> None:
        self.deadline = time.monotonic() + self._seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._seconds)  # writes get the whole timeout


class CompletionsHandler(BaseHTTPRequestHandler):
    server: CompletionServer
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a malformed request line still gets a status line and headers

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.read_timeout)
        self.rfile.close()  # the plain socket file, replaced by one under a deadline
        self._reader = _DeadlineReader(self.connection, self.server.read_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.restart()
        self._body_pending = False
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: no request lines on stderr
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's errors (bad request line, headers too long, unknown method) as JSON, and
        without its message, which quotes the request line."""
        self.close_connection = True
        try:
            self._send(code, error_body(code, HTTPStatus(code).description or HTTPStatus(code).phrase))
        except OSError:
            pass

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="logitfuse"')
        if self.close_connection or self._body_pending:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _answer(self, route: Any) -> None:
        """Run ``route(path)`` and send its reply, or the error as JSON; never raises."""
        with self.server.answering():  # finish_work waits for the reply's last byte
            self._body_pending = "Content-Length" in self.headers or "Transfer-Encoding" in self.headers
            try:
                self._check_auth()
                status, data = 200, json.dumps(route(self.path.split("?")[0].rstrip("/"))).encode("utf-8")
            except RequestCancelled:
                self.close_connection = True
                self.server.count_request()
                return
            except BadRequest as err:
                status, data = err.status, error_body(err.status, str(err))
                if status == 503:  # shutting down
                    self.close_connection = True
            except Exception as err:  # noqa: BLE001 - a server must answer, not die; never quote the request
                self.close_connection = True
                status, data = 500, error_body(500, f"internal error: {type(err).__name__}")
            try:
                self._send(status, data)
            except OSError:  # the client left
                self.close_connection = True
            finally:
                self.server.count_request()

    def _check_auth(self) -> None:
        if self.server.api_key is None:
            return
        given = (self.headers.get("Authorization") or "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, b"Bearer " + self.server.api_key.encode("ascii")):
            raise BadRequest(401, "this server needs an API key: send the header Authorization: Bearer <key>")

    def _get(self, path: str) -> dict:
        if path == "/health":
            return {"status": "ok"}
        if path == "/v1/models":
            return {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                "owned_by": "logitfuse", "max_logprobs": self.server.top_k_max}]}
        raise BadRequest(404, f"no such route; {_ROUTES}")

    def _post(self, path: str) -> dict:
        raw = self._read_body()
        if self.server.log_requests:
            self.server.received.append(raw)
        if path != "/v1/completions":
            raise BadRequest(404, f"no such route; {_ROUTES}")
        try:
            body = json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise BadRequest(400, "the request body is nested too deeply") from None
        except ValueError:  # not UTF-8, not JSON, or an integer with too many digits
            raise BadRequest(400, "the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        return self.server.complete(body, self._client_gone)

    def _client_gone(self) -> bool:
        """Whether the client has closed the connection (or its sending side) or reset it; a request it
        already sent after this one (pipelined) is not read, only seen."""
        try:
            self.connection.settimeout(0)
            try:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            finally:
                self.connection.settimeout(self.server.read_timeout)
        except BlockingIOError:  # nothing to read: still there, waiting
            return False
        except OSError:  # reset
            return True

    def _read_body(self) -> bytes:
        """The body, exactly ``Content-Length`` bytes of it, read before ``read_timeout`` runs out."""
        if "Transfer-Encoding" in self.headers:
            raise BadRequest(411, "Transfer-Encoding is not supported; send the body with a Content-Length header")
        values = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if not values:
            raise BadRequest(411, "a POST needs a Content-Length header")
        digits = values.pop()
        if values or not re.fullmatch(r"[0-9]+", digits):
            raise BadRequest(400, "Content-Length must be one non-negative integer")
        digits = digits.lstrip("0") or "0"
        limit = self.server.max_body_bytes
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise BadRequest(413, f"the request body is over the limit of {limit} bytes")
        length = int(digits)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise BadRequest(408, f"the request body did not arrive within {self.server.read_timeout:g} s") from None
        if len(raw) < length:
            raise BadRequest(400, "the request body ended before Content-Length bytes")
        self._body_pending = False
        return raw
