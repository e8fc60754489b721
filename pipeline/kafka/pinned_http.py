"""One HTTP(S) GET to an address already checked, within one deadline for all of it.

Why not urllib: its opener resolves the name again when it connects (so the address checked
by :mod:`pipeline.kafka.fetch_policy` need not be the one connected to: DNS rebinding), follows
redirects itself, and its timeout is per socket operation, so a server that drips a byte now
and then (headers included) holds it for as long as it likes. Here:

- the socket connects to the checked address itself; the name only travels in ``Host`` and in
  TLS's SNI (and certificate check), so what was checked is what is reached;
- every wait (connect, each TLS handshake step, sending, every read of the status line,
  headers and body) gets the time left until one absolute deadline, never a fresh timeout;
- the response is parsed by ``http.client`` (status line, header and chunk limits) reading
  through :class:`_DeadlineReader`, which also caps the bytes read in all;
- no redirect is followed here: the caller checks each hop with the whole policy.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import selectors
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.kafka.fetch_policy import HttpTarget

#: Status line and headers together (http.client also caps each line at 64 KiB and headers at 100).
HEADER_BUDGET = 64 * 1024 + 8192
USER_AGENT = "go-deeper-claim-check/2"
REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


class Expired(Exception):
    """The deadline passed (the wait that was cut short is in the message)."""


class Oversize(Exception):
    """More bytes than allowed (said by ``Content-Length`` or counted while reading)."""


@dataclass
class Response:
    status: int
    location: str | None = None  # a redirect's Location
    body: bytes | None = None  # only for 200


def remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Expired(what)
    return left


def get(target: HttpTarget, addresses: list[str], deadline: float, max_bytes: int,
        check_peer: Callable[[str], None], tls_context: ssl.SSLContext | None = None) -> Response:
    """GET ``target`` from the first of ``addresses`` that accepts a connection before ``deadline``.

    Raises :class:`Expired`, :class:`Oversize`, ``OSError`` (refused, reset, TLS) or
    ``http.client.HTTPException`` (a malformed answer); whatever ``check_peer`` raises.
    """
    sock = _connect(addresses, target.port, deadline)
    try:
        check_peer(sock.getpeername()[0])
        if target.scheme == "https":
            sock = _tls(sock, target.host, deadline, tls_context or ssl.create_default_context())
        request = (f"GET {target.target} HTTP/1.1\r\nHost: {target.host_header}\r\nUser-Agent: {USER_AGENT}\r\n"
                   "Accept: image/*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n")
        sock.settimeout(remaining(deadline, "sending the request"))
        sock.sendall(request.encode("ascii"))
        reader = _DeadlineReader(sock, deadline, HEADER_BUDGET)
        response = http.client.HTTPResponse(_Source(io.BufferedReader(reader)), method="GET")
        response.begin()
        if response.status in REDIRECTS:
            return Response(response.status, location=response.getheader("Location") or "")
        if response.status != 200:
            return Response(response.status)
        length = (response.getheader("Content-Length") or "").strip()
        if length.isdigit() and int(length) > max_bytes:
            raise Oversize(f"Content-Length says {length} bytes, over {max_bytes}")
        reader.budget = reader.total + 2 * max_bytes + HEADER_BUDGET  # chunk framing and trailers included
        return Response(200, body=_read_body(response, max_bytes))
    finally:
        sock.close()


def _connect(addresses: list[str], port: int, deadline: float) -> socket.socket:
    """A socket connected to the first address that answers; each try gets only the time left."""
    last: OSError | None = None
    for address in addresses:
        ip = ipaddress.ip_address(address)
        sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining(deadline, "connecting"))
            sock.connect((address, port))
            return sock
        except TimeoutError:
            sock.close()
            raise Expired("connecting") from None
        except OSError as exc:  # refused, unreachable: the next address may answer
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError("no address to connect to")


def _tls(sock: socket.socket, host: str, deadline: float, context: ssl.SSLContext) -> ssl.SSLSocket:
    """The TLS handshake step by step, each wait bounded by the deadline (SNI and the
    certificate check use the name; the socket is already on the checked address)."""
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    tls.setblocking(False)
    with selectors.DefaultSelector() as selector:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                events = selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                events = selectors.EVENT_WRITE
            selector.register(tls, events)
            ready = selector.select(remaining(deadline, "the TLS handshake"))
            selector.unregister(tls)
            if not ready:
                raise Expired("the TLS handshake")
    tls.setblocking(True)
    return tls


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    parts, total = [], 0
    while True:
        chunk = response.read(_CHUNK)
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > max_bytes:
            raise Oversize(f"more than {max_bytes} bytes (stopped reading)")
        parts.append(chunk)


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream: each read waits only for the time left, and the bytes read
    in all stay under ``budget`` (headers first, then the body's share)."""

    def __init__(self, sock: socket.socket, deadline: float, budget: int):
        self.sock = sock
        self.deadline = deadline
        self.budget = budget
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.sock.settimeout(remaining(self.deadline, f"reading the answer ({self.total} bytes so far)"))
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            raise Expired(f"reading the answer ({self.total} bytes so far)") from None
        self.total += n
        if self.total > self.budget:
            raise Oversize(f"more than {self.budget} bytes of answer")
        return n


class _Source:
    """What ``http.client.HTTPResponse`` wants of a socket: ``makefile``."""

    def __init__(self, stream: io.BufferedReader):
        self.stream = stream

    def makefile(self, mode: str) -> io.BufferedReader:
        return self.stream
