"""Test hosts: processes on hosts of their own (network namespaces) that a test can cut off.

A :class:`RigNetwork` is a private IPv4 /24 with one switch (a Linux bridge in a namespace of
its own). Each :class:`RigHost` is a network namespace with one cable (a veth pair) into the
switch and one address; this process joins the network too (``.1``, a veth in the current
namespace), so the rig can reach every host, and :mod:`devrig.toxiproxy` can stand
between hosts. Processes go onto a host through its :attr:`RigHost.launcher`
(``ip netns exec NAME``, which execs, so the pid is the process's own).

:meth:`RigNetwork.cut` unplugs a host's cable at the switch (link down: packets in both
directions vanish, TCP connections hang until their timeouts, as when a host drops off the
network) and :meth:`RigNetwork.heal` plugs it back in.

Only addresses of the network's own /24 are used, and nothing is routed anywhere else: the
hosts have no default route, and the namespaces' only link is the switch. The /24 is picked
from ``10.213.0.0/16`` among those no route of this machine uses, and held with a lock file,
so parallel test sessions get different ones; names carry the subnet's number. Everything is
removed by :meth:`RigNetwork.close` (also at interpreter exit), and a new network first
removes what a killed session left under its number.

Needs root and ``ip`` (iproute2); :func:`unavailable_reason` says why not otherwise.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import ipaddress
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

#: Subnets are 10.213.N.0/24; N picks one no route uses and no other session holds.
SUPERNET = ipaddress.ip_network("10.213.0.0/16")
_LOCKS = Path(tempfile.gettempdir()) / "deeper-test-networks"
#: The rig's own address on every network (the first host gets .10).
RIG_HOST = 1
FIRST_HOST = 10


class NetworkError(RuntimeError):
    """A test network could not be set up or changed; the message has ``ip``'s answer."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if test hosts can be made here, else why not (for skips)."""
    if os.geteuid() != 0:
        return "test hosts (network namespaces) need root"
    if shutil.which("ip") is None:
        return "test hosts need `ip` (iproute2)"
    probe = f"deeper-probe-{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        _ip("-n", probe, "link", "add", "probebr", "type", "bridge")
    except (NetworkError, OSError, subprocess.SubprocessError) as exc:
        return f"network namespaces, veth pairs or bridges are not available here: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class RigHost:
    """One host: a namespace, its address, and its cable's end at the switch."""

    name: str
    namespace: str
    address: str
    port: str  # the cable's end in the switch namespace

    @property
    def launcher(self) -> tuple[str, ...]:
        """Put before a command line to run it on this host."""
        return ("ip", "netns", "exec", self.namespace)


class RigNetwork:
    """A private /24 of test hosts on one switch; a context manager that removes it all."""

    def __init__(self) -> None:
        self.index, self._lock = _claim_subnet()
        self.subnet = ipaddress.ip_network(f"10.213.{self.index}.0/24")
        self.tag = f"dn{self.index}"
        self.switch = f"{self.tag}-switch"
        self.rig_link = f"{self.tag}rig"
        self.hosts: dict[str, RigHost] = {}
        self._closed = False
        _remove_leftovers(self.tag)
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            _ip("link", "add", self.rig_link, "type", "veth", "peer", "name", "rig", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", "rig", "master", "br0", "up")
            _ip("addr", "add", f"{self.address(RIG_HOST)}/24", "dev", self.rig_link)
            _ip("link", "set", self.rig_link, "up")
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)

    def address(self, n: int) -> str:
        return str(self.subnet.network_address + n)

    @property
    def rig_address(self) -> str:
        """This process's address on the network (where it, and a proxy it runs, are reached)."""
        return self.address(RIG_HOST)

    def add_host(self, name: str) -> RigHost:
        """A new host named ``name`` (letters, digits, ``-``), plugged in and up."""
        if name in self.hosts:
            raise NetworkError(f"host {name!r} exists already")
        host = RigHost(name, f"{self.tag}-{name}", self.address(FIRST_HOST + len(self.hosts)), f"h{len(self.hosts)}")
        _ip("netns", "add", host.namespace)
        self.hosts[name] = host
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        _ip("-n", host.namespace, "link", "add", "eth0", "type", "veth", "peer", "name", host.port,
            "netns", self.switch)
        _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.namespace, "link", "set", "eth0", "up")
        return host

    def cut(self, host: RigHost) -> None:
        """Unplug ``host`` from the switch: nothing reaches it or leaves it."""
        _ip("-n", self.switch, "link", "set", host.port, "down")

    def heal(self, host: RigHost) -> None:
        """Plug ``host`` back in."""
        _ip("-n", self.switch, "link", "set", host.port, "up")

    def close(self) -> None:
        """Remove every host, the switch and this process's link; release the subnet.

        Processes still running on a host keep its namespace alive (without a name): the rig
        stops them first.
        """
        if self._closed:
            return
        self._closed = True
        _remove_leftovers(self.tag)
        self._lock.close()

    def __enter__(self) -> "RigNetwork":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _claim_subnet() -> tuple[int, IO[str]]:
    """The lowest subnet number no route of this machine uses and no live session holds."""
    _LOCKS.mkdir(parents=True, exist_ok=True)
    routes = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr", "show").stdout
    for index in range(1, 255):
        subnet = ipaddress.ip_network(f"10.213.{index}.0/24")
        if any(_overlaps(subnet, word) for word in routes.split()):
            continue
        handle = open(_LOCKS / f"{index}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return index, handle
    raise NetworkError(f"no free /24 left in {SUPERNET} for a test network")


def _overlaps(subnet: ipaddress.IPv4Network, word: str) -> bool:
    try:
        return ipaddress.ip_network(word, strict=False).overlaps(subnet)
    except ValueError:
        return False


def _remove_leftovers(tag: str) -> None:
    """Delete the namespaces and the link of network ``tag`` (ours, or a killed session's)."""
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{tag}-"):
            _ip("netns", "del", name, check=False)
    _ip("link", "del", f"{tag}rig", check=False)  # gone with its peer already, unless the switch was not made
