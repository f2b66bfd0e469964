"""A stage's cost ledger: where its wall time went, measured, and which part of it is compared.

Inside each worker a `LapClock` attributes every second between entering the training function and the
final report to one part: `setup` (build or restore the model), `ingest_start` (the wait for an epoch's
first batch: Ray Data starting its pipeline), `train` (training steps, the wait for their data and the
periodic metric reports), `eval` (validation) and `checkpoint` (writing and reporting checkpoints). Outside,
the driver adds `start` (fit called → the worker entered its function: controller, worker group, process
group, dataset split) and `teardown` (the final report → fit returned: persisting the final checkpoint,
stopping the workers). By construction the parts add up to the stage's wall time.

The compared cost is compute (train + eval) × devices; the rest is overhead, reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

WORKER_PARTS = ("setup", "ingest_start", "train", "eval", "checkpoint")
DRIVER_PARTS = ("start", "teardown")
COMPUTE_PARTS = ("train", "eval")
LEDGER_PREFIX = "ledger/"  # the worker's report keys holding its `LapClock` figures


@dataclass
class LapClock:
    """Seconds per part since `entered_at`; each `lap(part)` gives the time since the previous lap to `part`,
    so no second is left out or counted twice."""

    entered_at: float = field(default_factory=time.time)  # wall clock: the driver compares it with its own
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WORKER_PARTS, 0.0))
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] += now - self._last
        self._last = now

    def carry(self, spent: Mapping[str, float]) -> None:
        """Add the seconds of earlier attempts of the stage (restored from its checkpoint) to each part."""
        for part, seconds in spent.items():
            if part in self.seconds:
                self.seconds[part] += float(seconds)

    def report(self) -> dict[str, float]:
        """The figures so far, with the wall-clock time of this report (the final one ends the workers' part),
        as flat `ledger/…` report keys."""
        figures = {**self.seconds, "entered_at": self.entered_at, "reported_at": time.time()}
        return {f"{LEDGER_PREFIX}{name}": value for name, value in figures.items()}


def pop_ledger(metrics: dict[str, Any]) -> dict[str, float]:
    """Take a worker's `LapClock.report()` keys out of its reported metrics (unprefixed)."""
    keys = [k for k in metrics if k.startswith(LEDGER_PREFIX)]
    return {k[len(LEDGER_PREFIX) :]: float(metrics.pop(k)) for k in keys}


@dataclass(frozen=True)
class StageLedger:
    """Wall seconds per part of one stage (as seen by worker 0; workers meet at every report) and how
    many devices it held."""

    start: float
    setup: float
    ingest_start: float
    train: float
    eval: float
    checkpoint: float
    teardown: float
    num_devices: int

    @classmethod
    def measure(
        cls, worker: Mapping[str, Any], fit_started_at: float, fit_ended_at: float, num_devices: int
    ) -> StageLedger:
        """From worker 0's last `LapClock.report()` and the driver's wall-clock bounds of `fit`."""
        parts = {name: float(worker.get(name, 0.0)) for name in WORKER_PARTS}
        start = max(float(worker["entered_at"]) - fit_started_at, 0.0)
        teardown = max(fit_ended_at - float(worker["reported_at"]), 0.0)
        return cls(start=start, teardown=teardown, num_devices=num_devices, **parts)

    @property
    def wall_seconds(self) -> float:
        return sum(self.parts().values())

    @property
    def compute_seconds(self) -> float:
        """Training + evaluation: the time the comparison charges."""
        return self.train + self.eval

    @property
    def overhead_seconds(self) -> float:
        return self.wall_seconds - self.compute_seconds

    @property
    def compute_device_seconds(self) -> float:
        return self.compute_seconds * self.num_devices

    @property
    def overhead_device_seconds(self) -> float:
        return self.overhead_seconds * self.num_devices

    def parts(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "num_devices"}

    def achieved_flops_per_second(self, train_flops: float) -> float | None:
        """Training FLOPs ÷ training time, over all devices (None without training time)."""
        return train_flops / self.train if self.train > 0 else None

    def as_row(self) -> dict[str, float]:
        """The `ledger` JSON of a results row: every part's wall seconds."""
        return {f"{name}_seconds": round(value, 4) for name, value in self.parts().items()}
