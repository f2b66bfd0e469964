"""Clean interruption of a job: SIGINT (Ctrl-C) and SIGTERM (a cancelled job, a pod stopping) stop it
within seconds, with one line saying where it stopped and how to resume, and exit 130 or 143.

The signal becomes an `Interrupted` exception in the driver. It is a BaseException, so the runner's
`except Exception` (which records a failed stage) lets it through: an interrupted stage writes no row,
and its checkpoints stay where a rerun of the same command resumes from them."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum

    def resume_hint(self, where: str | None, command: str) -> str:
        stage = f"during stage {where}" if where else "between stages"
        return (
            f"interrupted ({self.args[0]}) {stage}; finished stages are kept: rerun `{command}` to resume "
            "(an interrupted stage continues from its newest checkpoint)"
        )


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted` (the previous handlers come back after)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig in SIGNALS:  # a second Ctrl-C while stopping falls back to the default: stop now
            signal.signal(sig, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
