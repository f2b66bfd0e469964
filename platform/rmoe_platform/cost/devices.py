"""The device table: peak dense FLOP/s per device and precision, the model FLOP utilisation assumed when
projecting a cost, and the price. One table serves the projection (`cost.estimate`) and the measured
utilisation of a finished stage (`cost.ledger`).

Peaks are the vendors' dense (no structured sparsity) figures per device: bf16/fp16 on tensor cores, fp32
on the vector units (not TF32). `cpu` is one Ray Train worker on CPU: a nominal figure (a few AVX2/AVX-512
cores), so its utilisation compares CPU runs with each other, not with GPUs. Assumed utilisations are
typical of vision transformers trained with bf16 autocast; a measured one can replace them
(`--calibrate-from`). Everything here is overridable per experiment (`devices:` in the config).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rmoe_platform.config.fields import ConfigError, from_dict


@dataclass(frozen=True)
class DeviceSpec:
    """One device: `peak_bf16` / `peak_fp32` in FLOP/s, the assumed model FLOP utilisation `mfu`, the kind
    it is priced as (`gpu` or `cpu`, the experiment's `prices` keys) unless `dollars_per_hour` is given."""

    peak_bf16: float
    peak_fp32: float
    mfu: float
    kind: str = "gpu"
    dollars_per_hour: float | None = None

    def __post_init__(self) -> None:
        for name in ("peak_bf16", "peak_fp32"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a FLOP/s figure > 0, got {value!r}")
        if not (isinstance(self.mfu, int | float) and 0 < self.mfu <= 1):
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu!r}")
        if self.kind not in ("gpu", "cpu"):
            raise ValueError(f"kind must be gpu or cpu, got {self.kind!r}")
        price = self.dollars_per_hour
        if price is not None and not (isinstance(price, int | float) and math.isfinite(price) and price >= 0):
            raise ValueError(f"dollars_per_hour must be a number >= 0, got {price!r}")

    def peak(self, precision: str) -> float:
        """Peak FLOP/s in `precision` (bf16 and fp16 run on the same tensor cores)."""
        return self.peak_bf16 if precision in ("bf16", "fp16") else self.peak_fp32

    def price(self, prices: Mapping[str, float]) -> float:
        """Dollars per device-hour: this device's own price, else the experiment's price for its kind."""
        if self.dollars_per_hour is not None:
            return float(self.dollars_per_hour)
        if self.kind not in prices:
            raise ConfigError(f"prices: no price for device kind {self.kind!r}")
        return float(prices[self.kind])


# NVIDIA data sheets (SXM parts where there are several): H100 989 TFLOP/s bf16 dense, 67 fp32; A100 312 / 19.5;
# L4 121 / 30.3. CPU: nominal, see the module docstring.
DEVICES: Mapping[str, DeviceSpec] = {
    "h100": DeviceSpec(peak_bf16=989e12, peak_fp32=67e12, mfu=0.35),
    "a100": DeviceSpec(peak_bf16=312e12, peak_fp32=19.5e12, mfu=0.40),
    "l4": DeviceSpec(peak_bf16=121e12, peak_fp32=30.3e12, mfu=0.35),
    "cpu": DeviceSpec(peak_bf16=1e11, peak_fp32=1e11, mfu=0.30, kind="cpu"),
}


def device_table(overrides: Mapping[str, Any] | None, path: str = "experiment.devices") -> dict[str, DeviceSpec]:
    """`DEVICES` with `overrides` applied: a known device's fields are replaced one by one (`{h100: {mfu:
    0.5}}`); a new name needs every field but `kind` and `dollars_per_hour`."""
    table = dict(DEVICES)
    for name, fields in (overrides or {}).items():
        if not isinstance(fields, Mapping):
            raise ConfigError(f"{path}.{name}: expected a mapping of device fields, got {fields!r}")
        if name in table:
            known = {f: getattr(table[name], f) for f in DeviceSpec.__dataclass_fields__}
            table[name] = from_dict(DeviceSpec, {**known, **fields}, f"{path}.{name}")
        else:
            table[name] = from_dict(DeviceSpec, dict(fields), f"{path}.{name}")
    return table


def device_named(table: Mapping[str, DeviceSpec], name: str, where: str) -> DeviceSpec:
    if name not in table:
        raise ConfigError(f"{where}: unknown device {name!r} (known: {', '.join(sorted(table))})")
    return table[name]


def identify(device_name: str) -> str | None:
    """The table key of a device torch names (`torch.cuda.get_device_name`, or "cpu"); None if unknown."""
    lowered = device_name.lower()
    if lowered == "cpu":
        return "cpu"
    for key in ("h100", "a100", "l4"):
        if key in lowered.replace(" ", "").replace("-", ""):
            return key
    return None
