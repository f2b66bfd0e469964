"""Ray Tune sweeps over an RMoE pipeline's settings (experts, residual budget, top-k, capacity, …)."""

from rmoe_platform.sweep.config import SchedulerSpec, SearchSpec, SweepConfig
from rmoe_platform.sweep.driver import SweepDriver, SweepReport

__all__ = ["SchedulerSpec", "SearchSpec", "SweepConfig", "SweepDriver", "SweepReport"]
