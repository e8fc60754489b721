"""Test hosts (network namespaces) and Toxiproxy, on their own: what the cluster scenarios rely on.

A host reaches another host and the rig through the switch; a cut host reaches nothing and
nothing reaches it, until it is healed; closing the network leaves no namespace and no link
behind. Toxiproxy between two hosts delays and resets their connection. Marked ``cluster``
(needs root; ``DEEPER_REQUIRE_TEST_HOSTS=1`` turns the skip into a failure, as in CI).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from devrig import hosts, toxiproxy
from pipeline.app.broker.local import free_port

pytestmark = pytest.mark.cluster

#: Runs on a host: accept connections on ADDRESS:PORT and answer each line it reads.
_ECHO = """
import socket, sys, threading
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2]))); server.listen()
def serve(conn):
    with conn:
        for line in conn.makefile("rb"):
            conn.sendall(line)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@pytest.fixture
def network():
    reason = hosts.unavailable_reason()
    if reason:
        if os.environ.get("DEEPER_REQUIRE_TEST_HOSTS") == "1":
            pytest.fail(f"DEEPER_REQUIRE_TEST_HOSTS=1 but test hosts cannot be made here: {reason}")
        pytest.skip(reason)
    with hosts.RigNetwork() as net:
        yield net
    assert not [line for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
                .splitlines() if line.startswith(f"{net.tag}-")], "a namespace was left behind"
    assert subprocess.run(["ip", "link", "show", net.rig_link], capture_output=True).returncode != 0


def _echo_server(host: hosts.RigHost, port: int) -> subprocess.Popen:
    server = subprocess.Popen([*host.launcher, sys.executable, "-c", _ECHO, host.address, str(port)])
    deadline = time.monotonic() + 20
    while not _reaches(host.address, port):
        assert time.monotonic() < deadline and server.poll() is None, "the echo server did not start"
        time.sleep(0.1)
    return server


def _reaches(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            conn.sendall(b"ping\n")
            return conn.recv(5) == b"ping\n"
    except OSError:
        return False


def _reaches_from(host: hosts.RigHost, address: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=2).close()"
    return subprocess.run([*host.launcher, sys.executable, "-c", probe], capture_output=True).returncode == 0


def test_hosts_reach_each_other_until_one_is_cut_off(network):
    a, b = network.add_host("a"), network.add_host("b")
    assert a.address != b.address and a.address.startswith("10.213.")
    server = _echo_server(b, 7000)
    try:
        assert _reaches_from(a, b.address, 7000) and _reaches(b.address, 7000)
        network.cut(b)
        assert not _reaches_from(a, b.address, 7000) and not _reaches(b.address, 7000)
        network.heal(b)
        deadline = time.monotonic() + 10
        while not _reaches(b.address, 7000):
            assert time.monotonic() < deadline, "the healed host is still unreachable"
            time.sleep(0.2)
        assert _reaches_from(a, b.address, 7000)
    finally:
        server.kill()
        server.wait(10)


def test_toxiproxy_delays_and_resets_a_link_between_hosts(network, tmp_path):
    if toxiproxy.unavailable_reason():
        pytest.skip(toxiproxy.unavailable_reason())
    b = network.add_host("b")
    server = _echo_server(b, 7000)
    proxy = toxiproxy.Toxiproxy(tmp_path / "toxiproxy.log", free_port())
    try:
        listen = f"{network.rig_address}:{free_port()}"
        proxy.proxy("echo", listen, f"{b.address}:7000")
        host, port = listen.split(":")
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            started = time.monotonic()
            conn.sendall(b"fast\n")
            assert conn.recv(5) == b"fast\n" and time.monotonic() - started < 0.2
            proxy.add_toxic("echo", "slow", "latency", "downstream", latency=300)
            started = time.monotonic()
            conn.sendall(b"slow\n")
            assert conn.recv(5) == b"slow\n" and time.monotonic() - started >= 0.3
            proxy.add_toxic("echo", "reset", "reset_peer", "upstream", timeout=0)
            conn.sendall(b"gone\n")
            with pytest.raises(OSError):
                if not conn.recv(5):  # a reset, or at least the end of the stream
                    raise ConnectionResetError("closed")
    finally:
        proxy.close()
        server.kill()
        server.wait(10)
