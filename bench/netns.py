"""A private network namespace with a dead-end veth: where zero-copy really happens here.

Loopback and veth pairs between namespaces deliver locally, so the kernel copies
SEND_ZC data at delivery and zero-copy saves nothing. A veth whose peer is down drops
every packet in the device instead: a sender inside this namespace sending UDP to
DEAD_END does the whole zero-copy work (pinning, the skb over user pages, the
notification) and nothing copies it afterwards. Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

LOCAL = "10.77.0.1"
DEAD_END = "10.77.0.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def unavailable_reason() -> str | None:
    """Why the namespace cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's ip command is missing"
    if os.geteuid() != 0:
        return "making a network namespace needs root"
    return None


@contextlib.contextmanager
def dead_end_namespace() -> Iterator[str]:
    """Yield the name of a namespace where UDP to DEAD_END leaves through a dead-end veth."""
    name = f"uringloop-bench-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
        # no fragmentation: every datagram up to 64 KiB is one skb
        _ip("-n", name, "link", "set", "veth0", "mtu", "65535")
        _ip("-n", name, "addr", "add", f"{LOCAL}/24", "dev", "veth0")
        _ip("-n", name, "link", "set", "veth0", "up")  # veth1 stays down: the dead end
        _ip(
            "-n",
            name,
            "neigh",
            "add",
            DEAD_END,
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "veth0",
            "nud",
            "permanent",
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_namespace(name: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]
