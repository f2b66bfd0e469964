"""The process tree, read from /proc: what tests need to check or stop exactly the processes they started."""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def cmdline(pid: int) -> list[str]:
    """The process's command line ([] once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def ray_cluster_env(**extra: str) -> dict[str, str]:
    """The environment of a `ray start` cluster a test starts: this venv's tools first on PATH (a job's
    `python` is this venv's), token auth, no usage stats, and no drain on SIGTERM. A node's SIGTERM handler
    otherwise drains for up to 30 s before it stops (a head never finishes draining), which every test paid
    at teardown for a cluster it was done with."""
    bin_dir = Path(sys.executable).parent
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        **extra,
    }


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on loopback right now (a server started next binds them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class StartupFailedError(RuntimeError):
    """A server died while starting (its log's tail in the message): perhaps a port picked free was taken."""


def start_retrying(start: Callable[[], T], attempts: int = 3) -> T:
    """`start()` picks free ports and starts a server on them, raising `StartupFailedError` if the server
    dies before it is ready (and stopping what it started). A port picked free can be bound by another
    process before the server binds it, so a failed start is tried again on fresh ports; the last failure
    is raised with its log's tail."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except StartupFailedError as failure:
            if attempt == attempts:
                raise StartupFailedError(f"{failure} (start-up tried {attempts} times on fresh ports)") from None
    raise AssertionError("unreachable")
