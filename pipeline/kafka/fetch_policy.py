"""What a claim check may make the featurizer fetch: one policy, safe by default.

Anyone who can write to the images topic names the URI a claim check points at, so a claim
check is a request a stranger makes from inside the network, with the featurizer's address and
credentials. What the operator configures (the S3 endpoint and credentials, the broker) is
trusted; what a message names is not. The rules, each with the setting that opens it:

- **scheme**: ``http``/``https``/``s3``/``file`` only, and only those in ``DEEPER_FETCH_SCHEMES``.
- **hosts**: ``http(s)`` claim checks are refused until ``DEEPER_FETCH_HOSTS`` names the hosts
  they may name: exact names, ``.suffix`` for a domain and its sub-domains, ``*`` for any name
  (the address rule below still holds); an entry without ``:port`` allows only the scheme's
  default port (80/443), ``name:8080`` that port. Userinfo (``user@host``) is refused.
- **address**: whatever the name, never connect to loopback, link-local (the cloud metadata
  address 169.254.169.254, ``fe80::/10``), private (10/8, 172.16/12, 192.168/16, ``fc00::/7``),
  shared/CGNAT (100.64/10), multicast, unspecified, broadcast or reserved addresses, nor to
  IPv6 forms that carry such an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible,
  6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``, Teredo). The check is on **the address connected
  to**: the name is resolved once, the addresses are checked, and the connection goes to a
  checked address (``Host``/SNI carry the name), so DNS cannot answer differently between the
  check and the connection (rebinding). A range listed in ``DEEPER_FETCH_ALLOW_NETS`` (CIDRs;
  for photo servers on private networks) is allowed.
- **redirect**: each hop is checked again by every rule above, at most :data:`MAX_REDIRECTS`,
  and never from https down to http.
- **s3**: ``s3://bucket/key`` only where ``DEEPER_FETCH_S3`` lists ``bucket`` or ``bucket/prefix``
  (none by default): the featurizer's S3 credentials may reach buckets the producer must not.
- **file**: ``file://`` only for a regular file under ``DEEPER_FETCH_FILE_ROOT`` (off by default).
- **uri**: anything malformed (no host, control characters, a value *and* a claim check).

Every refusal is one dead-letter reason, ``fetch_refused`` (:class:`FetchRefused`), whose detail
names the rule and says nothing a server answered. A fetch that was allowed but brought no image
(an HTTP error, no answer, too large, no such object) is ``fetch_failed`` with one fixed detail,
whatever happened: a dead-letter reader must not learn which ports answer, which objects exist or
what a server said. The cause goes to the featurizer's log (:attr:`FetchFailed.cause`), which
only the operator reads. A missing ``file://`` path and a forbidden one read the same.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import DeeperError

#: Largest object fetched: bounds the memory of each in-flight image (a 40-megapixel JPEG, the
#: decoder's pixel budget, is 10-25 MB; the featurizer holds a few batches of raw photos).
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
#: Seconds allowed for one whole fetch: resolve, connect, TLS, headers, body, redirects.
DEFAULT_TIMEOUT_S = 5.0
#: Schemes a claim check may use at most; each is still off until its own setting opens it.
DEFAULT_SCHEMES = frozenset({"s3", "http", "https"})
#: Redirect hops followed (each checked again by the whole policy).
MAX_REDIRECTS = 3
#: Dead-letter reasons of claim checks.
REFUSED, FAILED = "fetch_refused", "fetch_failed"
REASONS = (REFUSED, FAILED)
#: The rules a refusal names (the first word of its detail).
RULES = ("scheme", "hosts", "address", "redirect", "s3", "file", "uri")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: name, port -> the addresses to try, in order (``socket.getaddrinfo`` unless tests swap it).
Resolver = Callable[[str, int], list[str]]


class FetchFailed(DeeperError):
    """A claim check could not be redeemed; ``reason`` is one of :data:`REASONS`.

    ``detail`` is what the dead letter says (never anything a server answered); ``cause`` is
    what happened, for the featurizer's log only.
    """

    def __init__(self, reason: str, detail: str = "", cause: str = ""):
        self.reason = reason
        self.detail = detail
        self.cause = cause
        super().__init__(f"{reason}: {detail}" if detail else reason)


class FetchRefused(FetchFailed):
    """The policy refused the claim check before (or instead of) any request; ``rule`` says which."""

    def __init__(self, rule: str, detail: str, cause: str = ""):
        self.rule = rule
        super().__init__(REFUSED, f"{rule}: {detail}", cause)


def failed(scheme: str, limits: "FetchLimits", cause: str) -> FetchFailed:
    """The one ``fetch_failed``: the same detail whatever went wrong (the cause is for the log)."""
    return FetchFailed(FAILED, f"{scheme}: no image within the fetch limits ({limits.timeout_s:g} s, "
                               f"{limits.max_bytes} bytes); the featurizer's log has the cause", cause)


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IP literals in any form inet_aton takes included)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.append(str(sockaddr[0]))
    return seen


@dataclass(frozen=True)
class FetchLimits:
    """What a claim check may fetch, how much and how fast; built from the settings."""

    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    schemes: frozenset[str] = DEFAULT_SCHEMES
    #: file:// is refused unless this is set; then only regular files under it are read.
    file_root: str | None = None
    #: ``DEEPER_FETCH_HOSTS`` entries (``name``, ``.suffix``, ``*``, each optionally ``:port``).
    hosts: tuple[str, ...] = ()
    #: ``DEEPER_FETCH_S3`` entries: ``bucket`` or ``bucket/prefix``.
    s3_allowed: tuple[str, ...] = ()
    #: ``DEEPER_FETCH_ALLOW_NETS``: ranges allowed although the address rule blocks them.
    allow_nets: tuple[Network, ...] = ()
    #: ``http://host:port`` of an S3-compatible server; empty: AWS itself (operator's: trusted).
    s3_endpoint: str = ""
    s3_region: str = ""
    resolver: Resolver = field(default=system_resolver, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Any) -> "FetchLimits":
        """From the ``DEEPER_FETCH_*`` settings; S3's endpoint and region stay the AWS SDK's
        variables, read in one place (:func:`pipeline.storage.s3_options`). A malformed entry
        is a :class:`DeeperError` at start, never a silently wider policy."""
        schemes = settings.fetch_schemes or ",".join(sorted(DEFAULT_SCHEMES))
        return cls(max_bytes=int(settings.fetch_max_bytes or DEFAULT_MAX_BYTES),
                   timeout_s=float(settings.fetch_timeout_s or DEFAULT_TIMEOUT_S),
                   schemes=frozenset(s.strip().lower() for s in schemes.split(",") if s.strip()),
                   file_root=settings.fetch_file_root or None,
                   hosts=parse_hosts(settings.fetch_hosts),
                   s3_allowed=parse_s3_allowed(settings.fetch_s3),
                   allow_nets=parse_nets(settings.fetch_allow_nets))


# --------------------------------------------------------------------------- settings


def _entries(text: str | None) -> list[str]:
    return [e.strip() for e in (text or "").replace(",", " ").split() if e.strip()]


def parse_hosts(text: str | None) -> tuple[str, ...]:
    """``DEEPER_FETCH_HOSTS``: lower-cased entries, each checked for shape."""
    out = []
    for entry in _entries(text):
        name, port = _split_host_entry(entry.lower())
        if not name or (port not in ("", "*") and not (port.isdigit() and 0 < int(port) < 65536)):
            raise DeeperError(f"DEEPER_FETCH_HOSTS: {entry!r} is not a host name, .suffix or *, "
                              "optionally with :port")
        out.append(entry.lower())
    return tuple(out)


def _split_host_entry(entry: str) -> tuple[str, str]:
    if entry.startswith("["):  # [v6]:port
        inside, _, rest = entry[1:].partition("]")
        return inside, rest.removeprefix(":")
    if entry.count(":") > 1:  # a bare IPv6 address
        return entry, ""
    name, _, port = entry.partition(":")
    return name, port


def parse_s3_allowed(text: str | None) -> tuple[str, ...]:
    out = []
    for entry in _entries(text):
        entry = entry.removeprefix("s3://")
        bucket = entry.partition("/")[0]
        if not bucket or any(part in (".", "..") for part in entry.split("/")):
            raise DeeperError(f"DEEPER_FETCH_S3: {entry!r} is not bucket or bucket/prefix")
        out.append(entry)
    return tuple(out)


def parse_nets(text: str | None) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(e, strict=False) for e in _entries(text))
    except ValueError as exc:
        raise DeeperError(f"DEEPER_FETCH_ALLOW_NETS: {exc}") from None


# --------------------------------------------------------------------------- uri and scheme


def check_scheme(uri: str, limits: FetchLimits) -> str:
    """The claim check's scheme, if it is one a claim check may use at all."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in uri):
        raise FetchRefused("uri", "the URI holds spaces or control characters")
    scheme = urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme == "file":
        if not limits.file_root:
            raise FetchRefused("scheme", "file:// claim checks are off (they read this machine's disk); "
                                         "set DEEPER_FETCH_FILE_ROOT to allow one directory")
        return scheme
    if scheme not in DEFAULT_SCHEMES:
        raise FetchRefused("scheme", "claim checks may be s3://, http(s):// or file://")
    if scheme not in limits.schemes:
        raise FetchRefused("scheme", f"{scheme}:// is not in DEEPER_FETCH_SCHEMES")
    return scheme


# --------------------------------------------------------------------------- http(s)


@dataclass(frozen=True)
class HttpTarget:
    """One checked request: where to connect (the name, to resolve once) and what to ask for."""

    scheme: str
    host: str  # lower-case name or IP literal, without brackets
    port: int
    target: str  # path and query, as sent on the request line
    host_header: str  # what Host (and SNI, the name part) carry


def http_target(url: str, limits: FetchLimits, after_redirect: bool = False) -> HttpTarget:
    """Check an http(s) URL against every rule that needs no network; refuse with the rule."""
    scheme = check_scheme(url, limits)
    if scheme not in ("http", "https"):
        raise FetchRefused("redirect" if after_redirect else "scheme", f"{scheme}:// is not http(s)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise FetchRefused("uri", "the port is not a number from 1 to 65535") from None
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise FetchRefused("uri", "the URI names no host")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused("uri", "user names and passwords in the URI are refused")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise FetchRefused("uri", "the host name is not a valid domain name") from None
    check_host(scheme, host, port, limits)
    target = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    literal = ":" in host
    shown = f"[{host}]" if literal else host
    default = port == (443 if scheme == "https" else 80)
    return HttpTarget(scheme, host, port, target, shown if default else f"{shown}:{port}")


def check_host(scheme: str, host: str, port: int, limits: FetchLimits) -> None:
    if not limits.hosts:
        raise FetchRefused("hosts", "http(s) claim checks are off until DEEPER_FETCH_HOSTS names the "
                                    "hosts they may fetch from")
    default = 443 if scheme == "https" else 80
    for entry in limits.hosts:
        name, allowed_port = _split_host_entry(entry)
        if allowed_port == "*" or (int(allowed_port) if allowed_port else default) == port:
            if name in ("*", host) or (name.startswith(".") and (host.endswith(name) or host == name[1:])):
                return
    raise FetchRefused("hosts", f"{host}:{port} is not allowed by DEEPER_FETCH_HOSTS")


def blocked_range(address: Address) -> str | None:
    """Why ``address`` may not be connected to (a range's name), or None for a public address.

    IPv6 forms that carry an IPv4 address are judged by that address too: a connection to
    ``::ffff:127.0.0.1`` reaches 127.0.0.1.
    """
    for embedded in _embedded_ipv4(address):
        why = blocked_range(embedded)
        if why:
            return why
    checks = (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
              ("link-local", address.is_link_local), ("multicast", address.is_multicast))
    for name, hit in checks:
        if hit:
            return name
    if isinstance(address, ipaddress.IPv4Address):
        if address in _SHARED:
            return "shared (CGNAT)"
        if address == ipaddress.IPv4Address("255.255.255.255"):
            return "broadcast"
    elif address in _SITE_LOCAL:
        return "site-local"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "special-purpose"
    return None


_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _embedded_ipv4(address: Address) -> list[ipaddress.IPv4Address]:
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo:
        found += list(address.teredo)
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in net for net in _NAT64) or (address in _COMPATIBLE and int(address) > 1):
        found.append(low32)
    return found


def _allowed_by_nets(address: Address, limits: FetchLimits) -> bool:
    candidates = [address, *_embedded_ipv4(address)]
    return any(a in net for a in candidates for net in limits.allow_nets if a.version == net.version)


def connectable(target: HttpTarget, limits: FetchLimits) -> list[str]:
    """Resolve ``target.host`` once; the addresses the address rule allows, in order.

    The caller connects to exactly these (never resolving again). A name that does not
    resolve is a failed fetch; one that resolves only to blocked addresses is refused.
    """
    try:
        resolved = limits.resolver(target.host, target.port)
    except (OSError, UnicodeError) as exc:
        raise failed(target.scheme, limits, f"{target.host} does not resolve: {exc}") from None
    allowed, blocked = [], []
    for text in resolved:
        try:
            address = ipaddress.ip_address(text.partition("%")[0])
        except ValueError:
            blocked.append("not an address")
            continue
        why = blocked_range(address)
        if why is None or _allowed_by_nets(address, limits):
            allowed.append(str(address))
        else:
            blocked.append(why)
    if allowed:
        return allowed
    if not blocked:
        raise failed(target.scheme, limits, f"{target.host} resolves to no address")
    if _is_literal(target.host):  # the message named the address itself: naming its range tells nothing new
        raise FetchRefused("address", f"{blocked[0]} addresses are never fetched from (unless "
                                      "DEEPER_FETCH_ALLOW_NETS allows the range)")
    # a name: which range it resolved to is the featurizer's DNS talking, so only the rule is said
    raise FetchRefused("address", "the name resolves only to addresses that are never fetched from (loopback, "
                                  "private, link-local, ...; DEEPER_FETCH_ALLOW_NETS allows a range)",
                       cause=f"{target.host} -> {', '.join(resolved)} ({', '.join(blocked)})")


def _is_literal(host: str) -> bool:
    """An IP address written in the URI, in any form the resolver takes (``127.1``, ``0x7f.1``)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        return False


def check_connected(peer: str, limits: FetchLimits) -> None:
    """The address a socket is actually connected to, checked once more (belt and braces)."""
    address = ipaddress.ip_address(peer.partition("%")[0])
    if blocked_range(address) is not None and not _allowed_by_nets(address, limits):
        raise FetchRefused("address", "the connection reached an address that is never fetched from")


def check_redirect(previous: HttpTarget, location: str, hops: int) -> None:
    if hops > MAX_REDIRECTS:
        raise FetchRefused("redirect", f"more than {MAX_REDIRECTS} redirects")
    if previous.scheme == "https" and location.lower().startswith("http:"):
        raise FetchRefused("redirect", "a redirect from https to http")


# --------------------------------------------------------------------------- s3


def s3_path(uri: str, limits: FetchLimits) -> str:
    """``bucket/key`` of an allowed ``s3://`` claim check."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise FetchRefused("uri", "expected s3://bucket/key")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise FetchRefused("uri", "empty, . or .. segments in an S3 key are refused")
    path = f"{bucket}/{key}"
    if not limits.s3_allowed:
        raise FetchRefused("s3", "s3:// claim checks are off until DEEPER_FETCH_S3 lists the buckets "
                                 "(or bucket/prefix) they may read")
    for entry in limits.s3_allowed:
        if path == entry or path.startswith(entry if entry.endswith("/") else entry + "/"):
            return path
    raise FetchRefused("s3", f"s3://{bucket}/... outside the buckets and prefixes of DEEPER_FETCH_S3")


# --------------------------------------------------------------------------- file


def file_refused(cause: str = "") -> FetchRefused:
    """The one answer for every file:// path that is not read: missing, outside the root, a
    symlink out of it, not a regular file, unreadable, too large, the root itself. A stranger
    learns nothing about the disk from which (``cause``, for the log, does say)."""
    return FetchRefused("file", "not a readable regular file of at most DEEPER_FETCH_MAX_BYTES under "
                                "DEEPER_FETCH_FILE_ROOT", cause)


def file_path(uri: str, limits: FetchLimits) -> Path:
    """The real path of an allowed ``file://`` claim check (symlinks resolved, inside the root).

    Paths outside the root by their text are refused before the disk is looked at; what is left
    is resolved and checked again (a symlink may lead out).
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost") or not parts.path:
        raise FetchRefused("uri", "expected file:///absolute/path on this machine")
    path = os.fsdecode(urllib.parse.unquote_to_bytes(parts.path))  # any bytes a file name may hold
    root = Path(limits.file_root or "").resolve()
    given = Path(os.path.abspath(limits.file_root or ""))  # the root may be reached through a symlink
    lexical = Path(os.path.normpath(path))
    if not lexical.is_absolute() or not any(lexical.is_relative_to(r) and lexical != r for r in (root, given)):
        raise file_refused("outside the root (by its text)")
    try:
        target = lexical.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # missing, permission on a parent, symlink loop
        raise file_refused(str(exc)) from None
    if not target.is_relative_to(root) or target == root:
        raise file_refused(f"resolves outside the root, or to the root itself: {target}")
    return target
