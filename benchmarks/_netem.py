"""A bandwidth-limited private network for benchmarks: a fresh network namespace with a ``tc tbf`` cap on its loopback.

All ranks run inside the namespace and talk over its own ``127.0.0.1``, so benchmark traffic never reaches the host's
interfaces (loopback/namespace addresses only). The namespace is created on entry and deleted on exit (also after an
error). Needs root (``ip netns``) and ``tc``; ``netem`` delay is not available in this kernel, so latency is not
emulated (``tbf``'s ``latency`` is only its queue limit).

Bytes that really crossed the link are read from ``/proc/net/dev`` *inside* the namespace (``/sys/class/net`` would
show the host's counters): see :func:`lo_tx_bytes`, which a process running in the namespace can call on itself.

Measured here (shared/NOTES.md): ``burst`` must be ≥ 256kb, otherwise loopback's 64 KiB segments slip through
unthrottled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

__all__ = ["RateLimitedNamespace", "lo_tx_bytes", "netem_available"]


def netem_available() -> str | None:
    """``None`` when namespaces and tc can be used here, else the reason why not."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found"
    return None


def lo_tx_bytes() -> int:
    """Bytes transmitted on ``lo`` of the caller's own network namespace (from ``/proc/net/dev``)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                fields = rest.split()
                return int(fields[8])  # rx: bytes packets errs drop fifo frame compressed multicast; then tx bytes
    raise RuntimeError("lo_tx_bytes: no `lo` line in /proc/net/dev.")


class RateLimitedNamespace:
    """``with RateLimitedNamespace("100mbit") as ns: ns.run([...])`` runs commands in a rate-limited namespace.

    Args:
        rate: ``tc`` rate of the loopback, e.g. ``"100mbit"``, ``"1gbit"``; ``None`` leaves it unlimited.
        burst: ``tbf`` bucket size; keep ≥ ``"256kb"`` (see the module docstring).
        name: namespace name; default ``lcbench<pid>`` (unique per benchmark process).
    """

    def __init__(self, rate: str | None = "100mbit", burst: str = "256kb", name: str | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.name = name or f"lcbench{os.getpid()}"
        self.active = False

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def __enter__(self) -> RateLimitedNamespace:
        reason = netem_available()
        if reason:
            raise RuntimeError(f"RateLimitedNamespace: cannot create a namespace ({reason}).")
        self._ip("netns", "add", self.name)
        self.active = True
        try:
            self._ip("-n", self.name, "link", "set", "lo", "up")
            if self.rate:
                subprocess.run(
                    ["ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
                     self.rate, "burst", self.burst, "latency", "100ms"],
                    check=True, capture_output=True, text=True,
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
            self.active = False

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kwargs)  # type: ignore[call-overload]
