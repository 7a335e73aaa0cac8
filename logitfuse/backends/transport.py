"""The HTTP transport of :class:`logitfuse.backends.openai.OpenAICompatibleLLM`: whole-request
deadlines, no redirects, retry timing, and how an error reply is classified."""

from __future__ import annotations

import functools
import http.client
import io
import socket
import time
import urllib.request
from typing import Any

__all__ = ["MAX_REPLY_BYTES", "TRANSIENT_HTTP", "DeadlineRequest", "backoff_total", "build_opener",
           "is_validation_error"]

#: statuses worth retrying: the same request may be answered later
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
#: a top-k reply is a few kB; anything past this is not one
MAX_REPLY_BYTES = 16 * 1024 * 1024


class _DeadlineSocket:
    """A connected socket (plain or TLS) whose every blocking send and receive ends by ``deadline``
    (a :func:`time.monotonic` time): each call first shrinks the socket timeout to the time left,
    so a server that trickles its reply cannot hold a request past the deadline (a plain socket
    timeout bounds each read, not the reply). ``http.client`` reads the status line, the headers
    and the body through :meth:`makefile`, so all of them are covered."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline
        self._io_refs, self._closed = 0, False

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline reached")
        self._sock.settimeout(left)

    def recv_into(self, buffer: Any, *args: Any) -> int:
        self._arm()
        return self._sock.recv_into(buffer, *args)

    def sendall(self, data: Any, *args: Any) -> None:
        self._arm()
        self._sock.sendall(data, *args)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"_DeadlineSocket.makefile supports mode 'rb' only, not {mode!r}")
        self._io_refs += 1
        return io.BufferedReader(socket.SocketIO(self, "rb"))  # type: ignore[arg-type]

    def _decref_socketios(self) -> None:  # called by socket.SocketIO.close
        self._io_refs -= 1
        if self._closed and self._io_refs <= 0:
            self._sock.close()

    def close(self) -> None:  # the fd stays open while the response still reads from it
        self._closed = True
        if self._io_refs <= 0:
            self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _DeadlineConnection:
    """Mixin for ``http.client`` connections: connect within the time left to ``deadline``, then
    do all I/O through a :class:`_DeadlineSocket`."""

    def __init__(self, *args: Any, deadline: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline reached before connecting")
        self.timeout = left
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline)


class _DeadlineHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class DeadlineRequest(urllib.request.Request):
    """A request that must be answered in full by ``deadline`` (a :func:`time.monotonic` time)."""

    def __init__(self, *args: Any, deadline: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.deadline = deadline


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: DeadlineRequest) -> Any:
        return self.do_open(functools.partial(_DeadlineHTTPConnection, deadline=req.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: DeadlineRequest) -> Any:
        return self.do_open(functools.partial(_DeadlineHTTPSConnection, deadline=req.deadline), req,
                            context=self._context)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: the request carries the API key, which must not travel to another
    address (urllib would resend the headers there, as a GET). The 3xx reaches the caller as an
    ``HTTPError``."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def build_opener() -> urllib.request.OpenerDirector:
    """urllib's usual opener (proxies from the environment included) with whole-request deadlines
    and no redirects."""
    return urllib.request.build_opener(_DeadlineHTTPHandler, _DeadlineHTTPSHandler, _RefuseRedirects)


def backoff_total(retries: int, backoff: float) -> float:
    """The sleeps between ``retries + 1`` attempts (``min(backoff * 2**i, 2 s)`` before retry ``i + 1``)."""
    return sum(min(backoff * 2 ** i, 2.0) for i in range(retries))


def is_validation_error(status: int, detail: str) -> bool:
    """Whether an error reply refuses the request's shape (400/422, or a 500 whose body ``detail``
    reports a request validation error of the prompt, as llama-cpp-python's server answers)."""
    return status in (400, 422) or ("validation error" in detail.lower() and "prompt" in detail)
