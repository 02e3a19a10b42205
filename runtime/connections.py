"""The service's HTTP connections: uvicorn's h11 protocol with a deadline on each request's headers.

uvicorn bounds neither how long a request's headers take nor how long a connection that has sent a
byte may stay quiet: a client that sends half a request head and then nothing would hold its
connection, and a file descriptor, for ever, and a few hundred such clients would lock every other
client out before any API key is read. Here each request's headers must arrive within the
deadline (serve.py's ``--body-timeout``) of the connection opening or of the previous answer's end
(its body then has as long again, counted by the service), else the connection is closed: with a
408 when part of a request came, silently when nothing did, as uvicorn closes an idle kept-alive
connection. A request uvicorn cannot parse is answered ``{"error": ...}`` like every other
refusal, not in plain text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import partial
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol
from uvicorn.server import ServerState


class HeadersDeadline(H11Protocol):
    """One HTTP/1.1 connection whose every request head is due within ``headers_timeout_s``."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, headers_timeout_s: float) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.headers_timeout_s = headers_timeout_s
        self.headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.headers_due is not None:
            self.headers_due.cancel()
        super().connection_lost(exc)

    def await_headers(self) -> None:
        """From now, the next request's headers are due within the deadline."""
        if self.headers_due is not None:
            self.headers_due.cancel()
        if not self.transport.is_closing():
            self.headers_due = self.loop.call_later(self.headers_timeout_s, self.headers_overdue)

    def headers_overdue(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request's headers came in time; the service times its body and answers it
        if self.conn.trailing_data[0]:  # part of a request head, waiting for the rest
            self.refuse(408, f"the request headers took longer than {self.headers_timeout_s:g} s")
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, in the service's shape."""
        self.refuse(400, "malformed HTTP request: its request line or headers cannot be read")

    def refuse(self, status: int, error: str) -> None:
        """Answer ``{"error": error}`` when no answer has begun on this connection, then close it."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = json.dumps({"error": error}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        self.transport.close()


def http_protocol(headers_timeout_s: float) -> Callable[..., HeadersDeadline]:
    """What uvicorn's ``http=`` takes, called as it calls a protocol class; it pickles, so each
    ``--workers`` process builds its connections with the same deadline."""
    return partial(HeadersDeadline, headers_timeout_s=headers_timeout_s)
