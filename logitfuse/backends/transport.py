"""The HTTP transport of :class:`logitfuse.backends.openai.OpenAICompatibleLLM` and of the judge
client (:class:`logitfuse.evaluation.judge.JudgeClient`): whole-request deadlines, no redirects,
the proxy rule, retry timing, and how an error reply is classified.

The proxy rule (docs/privacy.md), for every HTTP client of logitfuse:

- a client that may carry private text (the judge: its prompts hold the user's profile) never uses
  a proxy from the environment (``http_proxy``, ``https_proxy``, ``all_proxy``):
  ``build_opener(proxies=False)``;
- a loopback URL (``localhost``, 127.0.0.0/8, ``::1``) never goes through a proxy, whatever the
  client: a local server is reached directly;
- the LLM backend, which sends only public text, honours the environment's proxies for other URLs
  (``build_opener()``), ``no_proxy`` included.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import time
import urllib.request
from typing import Any
from urllib.parse import urlsplit

__all__ = ["MAX_REPLY_BYTES", "TRANSIENT_HTTP", "DeadlineRequest", "backoff_total", "build_opener",
           "is_loopback_url", "is_validation_error"]

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


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is this machine's loopback (``localhost``, 127.0.0.0/8, ``::1``).

    >>> is_loopback_url("http://127.0.0.1:8080/v1"), is_loopback_url("http://[::1]:80"), is_loopback_url("http://a.b")
    (True, True, False)
    """
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # other names may resolve anywhere
        return False


class _ProxyUnlessLoopback(urllib.request.ProxyHandler):
    """The environment's proxies, except for a loopback URL: that one is reached directly."""

    def proxy_open(self, req: urllib.request.Request, proxy: str, type: str) -> Any:  # noqa: A002 (urllib's name)
        if is_loopback_url(req.full_url):
            return None  # the next handler (the direct connection) opens it
        return super().proxy_open(req, proxy, type)


def build_opener(*, proxies: bool = True) -> urllib.request.OpenerDirector:
    """An opener with whole-request deadlines and no redirects.

    ``proxies=True``: the environment's proxies for a URL that is not loopback (for a client that
    sends only public text); ``proxies=False``: no proxy ever, whatever the environment says (for a
    client that may carry private text). A loopback URL never goes through a proxy.
    """
    proxy_handler = _ProxyUnlessLoopback() if proxies else urllib.request.ProxyHandler({})
    return urllib.request.build_opener(proxy_handler, _DeadlineHTTPHandler, _DeadlineHTTPSHandler, _RefuseRedirects)


def backoff_total(retries: int, backoff: float) -> float:
    """The sleeps between ``retries + 1`` attempts (``min(backoff * 2**i, 2 s)`` before retry ``i + 1``)."""
    return sum(min(backoff * 2 ** i, 2.0) for i in range(retries))


def is_validation_error(status: int, detail: str) -> bool:
    """Whether an error reply refuses the request's shape (400/422, or a 500 whose body ``detail``
    reports a request validation error of the prompt, as llama-cpp-python's server answers)."""
    return status in (400, 422) or ("validation error" in detail.lower() and "prompt" in detail)
