"""The process tree, read from /proc: what tests need to check or stop exactly the processes they started."""

from __future__ import annotations

import os
import random
import secrets
import socket
import subprocess
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


# Ports a test's servers are started on: above Ray's default worker ports (10002-19999) and below the range
# the kernel hands out to outgoing connections (Linux: 32768-60999; macOS: 49152-65535). A port the kernel
# picked (bind to port 0) comes from that ephemeral range, where any client connection on the machine (the
# other test worker's gRPC calls among them) may take it before the server binds it. A Ray head's GCS once
# found its port (38925) taken in the suite.
SERVER_PORTS = range(20000, 32768)


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on loopback right now (a server started next binds them), drawn at random
    from `SERVER_PORTS`."""
    draw = random.SystemRandom()  # not the seeded module state: two test workers must not draw alike
    ports: list[int] = []
    while len(ports) < count:
        port = draw.choice(SERVER_PORTS)
        if port not in ports and _bindable(port):
            ports.append(port)
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def startup_failure(process: subprocess.Popen, log: Path, since: int = 0) -> str | None:
    """Why a server started as `process` has failed to start, or None: it exited, or it printed a Python traceback
    (`ray start` can stay alive after its GCS failed to start) into `log` after byte `since` (where its output
    began: a retried start appends to the log of the attempts before it)."""
    if process.poll() is not None:
        return f"it exited with status {process.returncode}"
    with log.open("rb") as output:
        output.seek(since)
        if b"Traceback (most recent call last)" in output.read():
            return "it printed a traceback"
    return None


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
