"""CPU seconds per process role while a block of code runs, read from /proc (Linux), and the machine's busy and
idle CPU over the same time: where a run's CPU goes when Ray starts processes of its own.

A process's role is what it runs: a Ray worker's title (`ray::TrainController.run` → `TrainController`; an
actor's class wins over the tasks it runs and over `IDLE`), else its program (`raylet`, `gcs_server`), for
Python the script or module it runs (`ray/_private/log_monitor.py`, `jobs/pipeline.py`, `-m pytest`).
Sampled every `interval` s on a thread: a process that ends between two samples loses up to one interval, and
one shorter than an interval is missed. Shared by `stage_overhead.py` and `suite_cpu.py`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

RAY_TITLE = "ray::"
ROOT = Path(__file__).resolve().parents[1]


def available() -> bool:
    return Path("/proc/self/stat").exists()


def ray_role(title: str) -> str:
    """`ray::TrainController.run` → `TrainController`; `ray::IDLE` → `IDLE`."""
    return title.removeprefix(RAY_TITLE).split(".", 1)[0].split(" ", 1)[0]


def is_class(role: str) -> bool:
    name = role.lstrip("_")
    return name[:1].isupper() and not name.isupper()


def process_role(argv: list[str]) -> str:
    """What a process runs, from its command line (see the module's docstring)."""
    first = argv[0] if argv else ""
    if first.startswith(RAY_TITLE):
        return ray_role(first)
    program = first.split(" ", 1)[0].rsplit("/", 1)[-1]
    if not program.startswith("python"):
        return program  # raylet, gcs_server, a titled process (ray-dashboard-NodeHead-0 ...), moto_server
    args = [a for a in argv[1:] if a not in ("-u", "-B", "-E", "-s", "-I", "-O")]
    if not args:
        return "python"
    if args[0] == "-m" and len(args) > 1:
        return f"-m {args[1]}"
    if args[0] == "-c" and len(args) > 1:
        return f"-c {' '.join(args[1].split())[:40]}"  # the code's start, on one line
    script = args[0]
    if "/site-packages/" in script:  # a package's file: from its package on
        return script.split("/site-packages/", 1)[1]
    return script.removeprefix(f"{ROOT}/")  # this checkout's scripts from its root


def _rank(argv: list[str], role: str) -> int:
    """Which of a process's successive roles names it best: an actor's class, then any Ray title, then the
    program (a Ray worker starts as `python .../default_worker.py`, becomes `ray::IDLE`, then runs tasks)."""
    if argv and argv[0].startswith(RAY_TITLE):
        return 3 if is_class(role) else 2
    return 1


def _busy_idle_ticks() -> tuple[int, int]:
    """The machine's busy and idle (idle + iowait) CPU ticks since boot, all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, idle


class ProcessCpu:
    """CPU seconds per role of the processes `select`ed by their command line, while the block runs. With
    `new_only`, processes already running when the block starts are left out; otherwise they count from
    then on."""

    def __init__(
        self, interval: float = 0.2, select: Callable[[list[str]], bool] | None = None, new_only: bool = True
    ) -> None:
        self.interval = interval
        self.select = select or (lambda argv: True)
        self.new_only = new_only
        self.tick = os.sysconf("SC_CLK_TCK")
        self._seen: dict[int, tuple[str, int, float]] = {}  # pid → (role, its rank, CPU at the latest sample)
        self._before: dict[int, float] = {}  # pid → CPU when the block started
        self._machine: tuple[int, int] = (0, 0)
        self.busy_seconds = self.idle_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-cpu", daemon=True)

    def __enter__(self) -> ProcessCpu:
        self._machine = _busy_idle_ticks()
        self._sample()
        self._before = {pid: cpu for pid, (_, _, cpu) in self._seen.items()}
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        busy, idle = _busy_idle_ticks()
        self.busy_seconds = (busy - self._machine[0]) / self.tick
        self.idle_seconds = (idle - self._machine[1]) / self.tick

    def by_role(self) -> dict[str, tuple[int, float]]:
        """role → (processes, CPU seconds spent within the block)."""
        roles: dict[str, tuple[int, float]] = {}
        for pid, (role, _, cpu) in self._seen.items():
            if pid in self._before and self.new_only:
                continue
            count, total = roles.get(role, (0, 0.0))
            roles[role] = (count + 1, total + cpu - self._before.get(pid, 0.0))
        return roles

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        own = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == own:
                continue
            try:
                argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            if not argv or not self.select(argv):
                continue
            pid, cpu = int(entry.name), (int(fields[11]) + int(fields[12])) / self.tick
            role = process_role(argv)
            rank = _rank(argv, role)
            known = self._seen.get(pid)
            if known is not None and known[1] >= rank:
                role, rank = known[0], known[1]
            self._seen[pid] = (role, rank, cpu)
