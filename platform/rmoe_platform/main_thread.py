"""Run Ray's long blocking calls (a Train stage's `fit`, a Tune sweep's `fit`) off the main thread.

On the main thread, Ray Train and Ray Tune replace the process's SIGINT handler with their own, which
ends the run and *returns*, as if it had finished or failed: the job would go on to its next stage or print
a sweep's table. Off the main thread they leave signals to the job: the job's handler
(`cli.interrupts`) interrupts the wait, and the job stops as a whole, saying how to resume.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def off_the_main_thread(call: Callable[[], T], name: str) -> T:
    """`call()` in a daemon thread of its own (an interrupted job exits without waiting for it), the
    calling thread waiting for it; its exception, if any, is raised here."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as err:  # handed to the waiting thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
