"""uvicorn's httptools protocol with the limits it lacks: the size of a request's head (request line + headers,
so an unterminated 64 MB header is refused at the limit, never buffered whole), the number of headers, and a
deadline for the head (a slow-header or silent connection is closed). Refusals are 431 / 408 and the
connection closes. The body's deadline is admission's (admission.py); idle keep-alive is uvicorn's
timeout_keep_alive. The parser stays httptools (C): nothing here runs per streamed token."""

from __future__ import annotations

import http
import logging
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("kubellm.server")


@dataclass(frozen=True)
class HttpLimits:
    max_head_bytes: int = 64 << 10  # request line + headers
    max_headers: int = 100
    head_timeout_s: float = 30.0  # from the connection (or the previous response) to the end of the head


class _HeadTooLarge(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits = HttpLimits()

    @classmethod
    def with_limits(cls, limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
        return type("LimitedHttpToolsProtocol", (cls,), {"limits": limits})

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = None
        self._refusal: tuple[int, str] | None = None
        self._start_head()

    def _start_head(self) -> None:
        self._in_head, self._head_bytes, self._num_headers = True, 0, 0
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _end_head(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, "request head not received in time")

    def _refuse(self, status: int, message: str) -> None:
        self._end_head()
        log.info('{"event": "http_refused", "status": %d, "why": "%s"}', status, message)
        body = message.encode()
        phrase = http.HTTPStatus(status).phrase.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, phrase, len(body), body)
        )
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            room = self.limits.max_head_bytes - self._head_bytes
            if len(data) > room:  # feed up to the limit: if the head has not ended by then, it is too large
                if room > 0:
                    self._head_bytes += room
                    super().data_received(data[:room])
                if self._in_head and not self.transport.is_closing():
                    self._refuse(431, f"request head larger than {self.limits.max_head_bytes} bytes")
                    return
                data = data[room:]
            else:
                self._head_bytes += len(data)
        if not self.transport.is_closing() and data:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:  # raised from a parser callback below
            return self._refuse(*self._refusal)
        super().send_400_response(msg)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._num_headers += 1
        if self._num_headers > self.limits.max_headers:
            self._refusal = (431, f"more than {self.limits.max_headers} request headers")
            raise _HeadTooLarge  # httptools ends the parse with an error: send_400_response above
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._end_head()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._start_head()  # the next request's head on this connection (idle: timeout_keep_alive first)

    def connection_lost(self, exc) -> None:
        self._end_head()
        super().connection_lost(exc)
