"""Separate network addresses for a head and its engines, made by the test.

`network(n)` creates one Linux network namespace per engine, each joined by a veth pair to a
bridge in the test's own namespace: the head binds the bridge's address (`HEAD_IP`) and every
engine gets its own address and runs inside its namespace (`ip netns exec`), so nothing they
exchange can go over loopback. Where namespaces cannot be made (no root, no `ip`, a sandbox
without CAP_NET_ADMIN), it falls back to distinct loopback addresses 127.0.0.x and says so in
`Network.why`; KUBELLM_TEST_NO_NETNS=1 forces that fallback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

HEAD_IP = "10.213.0.1"
SUBNET_BITS = 24
_TAG = "klt"
"""Prefix of every link and namespace made here (stale ones of a crashed run are removed)."""


@dataclass(frozen=True)
class Host:
    ip: str
    prefix: list[str] = field(default_factory=list)
    """Command prefix that runs a program on this host."""


@dataclass(frozen=True)
class Network:
    head: Host
    engines: list[Host]
    isolated: bool
    """True: network namespaces; False: distinct 127.0.0.x addresses on one loopback."""
    why: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def _remove_stale() -> None:
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(_TAG):
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if name.startswith(_TAG):
            _ip("link", "del", name, check=False)


def _create(n: int) -> list[Host]:
    bridge = f"{_TAG}br"
    _ip("link", "add", bridge, "type", "bridge")
    _ip("addr", "add", f"{HEAD_IP}/{SUBNET_BITS}", "dev", bridge)
    _ip("link", "set", bridge, "up")
    hosts = []
    for k in range(n):
        ns, outer, inner = f"{_TAG}e{k}", f"{_TAG}v{k}", f"{_TAG}p{k}"
        address = f"10.213.0.{10 + k}"
        _ip("netns", "add", ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "master", bridge, "up")
        _ip("-n", ns, "addr", "add", f"{address}/{SUBNET_BITS}", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        hosts.append(Host(address, ["ip", "netns", "exec", ns]))
    return hosts


def _reachable(host: Host) -> bool:
    """Whether a program in `host` can open a TCP connection to HEAD_IP."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((HEAD_IP, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        probe = f"import socket; socket.create_connection(('{HEAD_IP}', {port}), timeout=3).close()"
        result = subprocess.run(
            [*host.prefix, "python3", "-c", probe], capture_output=True, timeout=15, check=False
        )
        return result.returncode == 0


@contextlib.contextmanager
def network(n: int) -> Iterator[Network]:
    """A head address and `n` engine hosts; namespaces are removed on exit."""
    why = ""
    hosts: list[Host] = []
    if os.environ.get("KUBELLM_TEST_NO_NETNS") == "1":
        why = "KUBELLM_TEST_NO_NETNS=1"
    elif os.geteuid() != 0 or shutil.which("ip") is None:
        why = "network namespaces need root and iproute2"
    else:
        try:
            _remove_stale()
            hosts = _create(n)
            if not all(_reachable(h) for h in hosts):
                why = "the namespaces cannot reach the head's bridge address"
        except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as e:
            detail = e.stderr if isinstance(e, subprocess.CalledProcessError) else e
            why = f"cannot create network namespaces: {str(detail).strip()}"
        if why:
            _remove_stale()
    try:
        if not why:
            yield Network(Host(HEAD_IP), hosts, True, "network namespaces joined by a bridge")
        else:
            engines = [Host(f"127.0.0.{2 + k}") for k in range(n)]
            yield Network(Host("127.0.0.1"), engines, False, why)
    finally:
        if not why:
            _remove_stale()
