"""What running an experiment's stages gives: each stage's outcome, each pipeline's summary (its stages and
their total cost), the report of the whole run, and the sweep trial a run may belong to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rmoe_platform.pipelines.accounting import Cost, total
from rmoe_platform.pipelines.graph import StageNode

if TYPE_CHECKING:
    from rmoe_platform.pipelines.imported import ImportedCore


@dataclass
class StageOutcome:
    node: StageNode
    status: str  # succeeded | cached | imported | failed | skipped
    run_id: str
    cost: Cost = field(default_factory=Cost)
    metric: float | None = None
    checkpoint_uri: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("succeeded", "cached", "imported")


@dataclass
class PipelineSummary:
    pipeline: str
    stages: list[StageOutcome]
    shared: set[str]

    @property
    def ok(self) -> bool:
        return all(stage.ok for stage in self.stages)

    @property
    def metric(self) -> float | None:
        return self.stages[-1].metric if self.ok else None

    @property
    def cost(self) -> Cost:
        return total(stage.cost for stage in self.stages)

    @property
    def imported(self) -> ImportedCore | None:
        """The imported core this pipeline starts from (None: it trained its own upstream)."""
        return next((s.node.imported for s in self.stages if s.node.imported is not None), None)


@dataclass(frozen=True)
class SweepTrial:
    """Set when the runner runs one trial of a sweep: its rows carry the sweep id and the sampled setting,
    the stages every trial shares are marked shared, and the pipeline row's run id is the trial's own
    (stable across a resumed sweep, so a finished trial is recognised and never written twice)."""

    sweep_id: str
    trial_key: str
    params: dict[str, Any]
    shared_stages: frozenset[str] = frozenset()

    @property
    def run_id(self) -> str:
        return f"{self.sweep_id}-{self.trial_key}"


@dataclass
class ExperimentReport:
    experiment: str
    outcomes: dict[str, StageOutcome]
    summaries: dict[str, PipelineSummary]

    @property
    def ok(self) -> bool:
        return all(summary.ok for summary in self.summaries.values())
