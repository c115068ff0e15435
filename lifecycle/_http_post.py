"""One HTTP POST with one deadline for all of it: the webhooks' transport (machinery of :mod:`lifecycle.webhooks`).

Written on a socket and :class:`http.client.HTTPResponse` rather than urllib,
so that nothing is followed (a redirect is a refusal), every read waits only
for what is left of the attempt's deadline (connect, TLS, request and answer
share it: a peer that trickles cannot hold an attempt longer), and at most
:data:`ANSWER_LIMIT` bytes of an answer are read (a huge one cannot fill the
sender's memory). Interim 1xx answers are skipped (a few at most, within the
same deadline and byte limit); a head cut short by the peer closing, or one
with two different ``Content-Length`` values, fails the attempt. Name lookups keep the resolver's own timeouts.
"""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import time
from contextlib import suppress
from typing import Any
from urllib.parse import SplitResult

__all__ = ["ANSWER_BYTES", "ANSWER_LIMIT", "INTERIM_LIMIT", "Refused", "post"]

ANSWER_BYTES = 4096
"""Most of an answer's body an attempt reads (to see a 2xx's body complete, or to log a refusal's)."""
ANSWER_LIMIT = 16384
"""Most bytes of an answer read in all, status line and headers included: a longer answer fails the attempt."""
INTERIM_LIMIT = 6
"""Most answers read to find the final one: interim 1xx answers (103 Early Hints) are skipped, up to 5."""


class Refused(Exception):
    """The endpoint answered, but not 2xx: the attempt failed (a redirect is never followed)."""

    def __init__(self, status: int, reason: str, location: str | None, excerpt: bytes) -> None:
        self.status, self.location = status, location
        self.excerpt = excerpt[:200].decode("utf-8", "replace")
        super().__init__(f"answered {status} {reason[:80]}")


def _left(deadline: float) -> float:
    """Return the seconds left until ``deadline``; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the attempt's deadline passed")
    return left


class _Answer(io.RawIOBase):
    """An answer off a socket: each read waits only for what is left of the deadline; ANSWER_LIMIT bytes in all."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock, self._deadline, self._budget = sock, deadline, ANSWER_LIMIT
        self._file = io.BufferedReader(self)
        self.ended = False
        """Whether the peer closed its side: seen while a head is read, the head was cut short."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._budget <= 0:
            raise http.client.HTTPException(f"the answer is longer than {ANSWER_LIMIT} bytes: read no further")
        self._sock.settimeout(_left(self._deadline))
        got = self._sock.recv_into(buffer, min(len(buffer), self._budget))
        self._budget -= got
        self.ended = self.ended or got == 0
        return got

    def makefile(self, _mode: str) -> io.BufferedReader[_Answer]:
        """Stand in for the socket's file, which is all :class:`http.client.HTTPResponse` reads.

        One reader for every answer on the connection (interim ones, then the final): what it buffered
        past one answer's head is the next one's.
        """
        return self._file


def _request(parts: SplitResult, headers: dict[str, str], body: bytes) -> bytes:
    """Return the bytes of one HTTP/1.1 POST of ``body`` to the URL's path and query."""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def _read_body(answer: http.client.HTTPResponse) -> None:
    """Read up to ANSWER_BYTES of a 2xx's body: one that ends before its length (or last chunk) fails the attempt.

    A body without a length and not chunked runs to the end of the connection: it is not waited for.
    """
    if answer.chunked:
        answer.read(ANSWER_BYTES)  # a chunk cut short raises IncompleteRead
    elif answer.length is not None:
        want = min(answer.length, ANSWER_BYTES)
        got = len(answer.read(want))  # read(n) returns what came before the end, without complaint
        if got < want:
            raise http.client.IncompleteRead(b"", want - got)


def _head(raw: _Answer) -> http.client.HTTPResponse:
    """Read one answer's status line and headers; HTTPException for a head cut short or two different lengths.

    :mod:`http.client` takes the end of the connection for the blank line that ends a head: a head the
    peer closed in the middle of must fail the attempt, not count as an answer.
    """
    answer = http.client.HTTPResponse(raw, method="POST")  # type: ignore[arg-type]
    answer.begin()
    if raw.ended:
        raise http.client.HTTPException("the answer's head was cut short: the connection closed before its blank line")
    lengths = {value.strip() for value in answer.msg.get_all("Content-Length") or ()}
    if len(lengths) > 1:
        raise http.client.HTTPException(f"the answer has {len(lengths)} different Content-Length values")
    return answer


def _final(raw: _Answer) -> http.client.HTTPResponse:
    """Return the final answer, past interim 1xx ones (103 Early Hints...; 101 is final, and refused)."""
    for _ in range(INTERIM_LIMIT):
        answer = _head(raw)
        if not (100 <= answer.status < 200 and answer.status != 101):
            return answer
        answer.fp = None  # type: ignore[assignment]  # the shared reader must outlive this answer's close
    raise http.client.HTTPException(f"more than {INTERIM_LIMIT - 1} interim 1xx answers: no final one read")


def post(
    parts: SplitResult, tls: ssl.SSLContext | None, headers: dict[str, str], body: bytes, *, deadline: float
) -> None:
    """POST ``body`` with ``headers`` to the URL ``parts`` by ``deadline``; raise unless a 2xx is read in full.

    :class:`Refused` for any other answer (a redirect is never followed); OSError (timeouts, resets, TLS)
    or :class:`http.client.HTTPException` (a malformed or too long answer) otherwise.
    """
    request = _request(parts, headers, body)
    port = parts.port or (80 if tls is None else 443)
    with socket.create_connection((parts.hostname, port), timeout=_left(deadline)) as plain:
        plain.settimeout(_left(deadline))  # a TLS handshake's timeout, as sendall's, bounds all of it
        sock = plain if tls is None else tls.wrap_socket(plain, server_hostname=parts.hostname)
        with sock:
            sock.settimeout(_left(deadline))
            sock.sendall(request)
            answer = _final(_Answer(sock, deadline))
            with answer:
                if 200 <= answer.status < 300:
                    _read_body(answer)
                    return
                excerpt = b""
                with suppress(OSError, http.client.HTTPException):  # the refusal stands, whatever its body
                    excerpt = answer.read(ANSWER_BYTES)
                raise Refused(answer.status, answer.reason, answer.getheader("Location"), excerpt)
