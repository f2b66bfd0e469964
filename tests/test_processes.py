"""The tests' own process helpers: the ports servers start on, and telling a failed start-up from a slow one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from processes import SERVER_PORTS, free_ports, startup_failure


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20 and all(port in SERVER_PORTS for port in ports)
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(SERVER_PORTS) < low, "a port the kernel may give an outgoing connection"


def _start(code: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)


def test_a_server_that_exits_or_prints_a_traceback_has_failed_to_start(tmp_path: Path) -> None:
    alive = _start("import time; time.sleep(60)", tmp_path / "alive.log")
    # fails as `ray start` did when its GCS could not bind: a traceback, and the process stays
    stuck = _start("import sys, time\ntry:\n    1 / 0\nexcept Exception:\n    import traceback; traceback.print_exc()\n"
                   "sys.stderr.flush(); time.sleep(60)", tmp_path / "stuck.log")  # fmt: skip
    exited = _start("raise SystemExit(3)", tmp_path / "exited.log")
    try:
        exited.wait(timeout=60)
        deadline = time.monotonic() + 60
        while startup_failure(stuck, tmp_path / "stuck.log") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert startup_failure(stuck, tmp_path / "stuck.log") == "it printed a traceback"
        size = (tmp_path / "stuck.log").stat().st_size  # a retry appending to the same log: only its own output
        assert startup_failure(stuck, tmp_path / "stuck.log", since=size) is None
        assert startup_failure(exited, tmp_path / "exited.log") == "it exited with status 3"
        assert startup_failure(alive, tmp_path / "alive.log") is None
    finally:
        for process in (alive, stuck):
            process.kill()
            process.wait()
