"""An emulated slow link for benchmarks: a fresh network namespace whose loopback is rate-limited with ``tc tbf``.

All ranks run inside one namespace and talk over its own 127.0.0.1, so no traffic touches the host's interfaces.
Needs root, ``ip`` and ``tc`` (``netem`` is not available in this kernel; ``tbf`` is). ``burst`` must be ≥ 256kb, or
the loopback's large segments slip through unthrottled. The limit is shared by every rank's traffic on ``lo``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["rate_limited_loopback", "lo_tx_bytes"]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@contextmanager
def rate_limited_loopback(rate_mbit: float = 100.0, name: str = "lcbench_localsgd") -> Iterator[list[str]]:
    """Yield the command prefix that runs a program inside the rate-limited namespace.

    Yields ``[]`` (no limit) and says so on stderr when the machine cannot do it (not root, no ``ip``/``tc``).
    The namespace is deleted on exit.
    """
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        print("_localnet: not root or no ip/tc: running WITHOUT a rate limit", file=sys.stderr)
        yield []
        return
    subprocess.run(["ip", "netns", "del", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # our stale one
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
             f"{rate_mbit:g}mbit", "burst", "256kb", "latency", "100ms")
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lo_tx_bytes() -> int:
    """Bytes sent on ``lo`` in the current network namespace (``/proc/net/dev`` is per namespace)."""
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    return 0
