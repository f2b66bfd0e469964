"""Cost accounting: a stage's measured device time and analytic FLOPs, in GPU-days and dollars, and a
pipeline's total over all its stages (shared stages charged in full to every pipeline using them)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SECONDS_PER_DAY = 86_400.0
_FIELDS = ("flops", "device_seconds", "gpu_seconds", "dollars", "overhead_device_seconds")


@dataclass(frozen=True)
class Cost:
    """The compared cost (FLOPs, compute device-seconds, GPU-seconds and dollars of compute) and, beside it,
    never in it, the device-seconds of overhead (start-up, checkpoints, teardown)."""

    flops: float = 0.0
    device_seconds: float = 0.0
    gpu_seconds: float = 0.0
    dollars: float = 0.0
    overhead_device_seconds: float = 0.0

    @property
    def gpu_days(self) -> float:
        return self.gpu_seconds / SECONDS_PER_DAY

    @property
    def device_hours(self) -> float:
        return self.device_seconds / 3600.0

    def as_fields(self, prefix: str) -> dict[str, float]:
        """Flat `{prefix}flops`, … entries (a Ray Tune result carries costs this way); see `from_fields`."""
        return {f"{prefix}{name}": float(getattr(self, name)) for name in _FIELDS}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], prefix: str) -> Cost:
        return cls(**{name: float(fields.get(f"{prefix}{name}", 0.0)) for name in _FIELDS})

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, name) + getattr(other, name) for name in _FIELDS))

    def __sub__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, name) - getattr(other, name) for name in _FIELDS))


def stage_cost(
    flops: float,
    device_seconds: float,
    device_kind: str,
    prices: Mapping[str, float],
    overhead_device_seconds: float = 0.0,
) -> Cost:
    """Price `device_seconds` of compute on `device_kind` at `prices[device_kind]` dollars per device-hour;
    the overhead is carried beside it, unpriced."""
    if device_kind not in prices:
        raise ValueError(f"prices: no price for device kind {device_kind!r}")
    gpu_seconds = device_seconds if device_kind == "gpu" else 0.0
    dollars = device_seconds / 3600.0 * prices[device_kind]
    return Cost(flops, device_seconds, gpu_seconds, dollars, overhead_device_seconds)


def declared_cost(gpu_days: float, dollars: float | None, flops: float, prices: Mapping[str, float]) -> Cost:
    """A cost the user declares rather than one measured (an imported core's): `gpu_days` of GPU time,
    priced at `prices["gpu"]` per GPU-hour unless `dollars` is given."""
    seconds = gpu_days * SECONDS_PER_DAY
    if dollars is None:
        dollars = seconds / 3600.0 * prices["gpu"] if seconds else 0.0
    return Cost(flops, seconds, seconds, dollars)


def same_cost(a: Cost, b: Cost) -> bool:
    """Equal up to float round-off (a cost read back from a row went through GPU-days)."""
    pairs = zip(a.as_fields("").values(), b.as_fields("").values(), strict=True)
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in pairs)


def total(costs: Iterable[Cost]) -> Cost:
    out = Cost()
    for cost in costs:
        out = out + cost
    return out
