"""The sweep driver's view of its trials (a Ray Tune callback): a line per event a person can follow,
and the pipeline row of a trial ASHA stopped early (the trial itself is gone by then).

Tune pickles its callbacks into the sweep's state (for `--resume`), so this holds no credentials: S3
access is resolved again from the config's options and the driver's environment when first needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.pipelines.accounting import Cost
from rmoe_platform.results import ResultsStore
from rmoe_platform.results.rows import RowContext, git_commit, stopped_trial_row
from rmoe_platform.storage.s3 import S3Access
from rmoe_platform.sweep.plan import split_seed, trial_key
from rmoe_platform.sweep.reporting import DONE, METRIC, PRIOR_COST_PREFIX, TIME_ATTR

STATUS_LABELS = {"TERMINATED": "ended", "ERROR": "failed", "RUNNING": "running", "PENDING": "pending"}


class SweepProgress(Callback):
    def __init__(self, sweep_id: str, experiment: ExperimentConfig, expected_trials: int | None) -> None:
        self.sweep_id = sweep_id
        self.experiment = experiment
        self.expected_trials = expected_trials
        self.log: Callable[[str], None] = print
        self._store: ResultsStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "log": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.log = print

    def _key(self, trial: Any) -> str:
        return trial_key(dict(trial.config), self.experiment.replicate_seeds)

    # ---- Tune hooks ----------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        counts = self._counts(trials, current=trial)
        self.log(f"[sweep {self.sweep_id}] trial {self._key(trial)} started: {_setting(trial)}  ({counts})")

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if TIME_ATTR in result and DONE not in result:
            self.log(
                f"[sweep {self.sweep_id}] trial {self._key(trial)}: {self._metric_name} {result[METRIC]:.3f} "
                f"at evaluation {result[TIME_ATTR]} of {result.get('stage')}"
            )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if DONE in result:
            metric, dollars = _fmt(result.get(METRIC)), _fmt(result.get("dollars"), 4)
            what = f"finished ({result[DONE]}): {self._metric_name} {metric}, ${dollars}"
        elif TIME_ATTR in result:
            self._write_stopped_row(trial, result)
            metric = _fmt(result.get(METRIC))
            what = f"stopped early by ASHA at evaluation {result[TIME_ATTR]}: {self._metric_name} {metric}"
        else:
            what = "ended without a result"
        counts = self._counts(trials, current=trial, current_status="TERMINATED")
        self.log(f"[sweep {self.sweep_id}] trial {self._key(trial)} {what}  ({counts}){self._best(trials)}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = str(getattr(trial, "error_file", "") or "")
        counts = self._counts(trials, current=trial, current_status="ERROR")
        self.log(f"[sweep {self.sweep_id}] trial {self._key(trial)} FAILED {error}  ({counts})")

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def _metric_name(self) -> str:
        return self.experiment.metric_name

    def store(self) -> ResultsStore:
        if self._store is None:
            self._store = ResultsStore(self.experiment.results, s3=S3Access.resolve(self.experiment.s3))
        return self._store

    def _counts(self, trials: list[Any], current: Any = None, current_status: str = "RUNNING") -> str:
        """Trials by state; `current` (the trial of the event) is counted as `current_status`, since Tune
        updates its status only after the callbacks ran."""
        counts: dict[str, int] = {}
        for trial in trials:
            status = current_status if current is not None and trial.trial_id == current.trial_id else trial.status
            if status == "TERMINATED":
                status = "finished" if DONE in (trial.last_result or {}) else "stopped"
            counts[STATUS_LABELS.get(status, status.lower())] = (
                counts.get(STATUS_LABELS.get(status, status.lower()), 0) + 1
            )
        of = f" of {self.expected_trials}" if self.expected_trials else ""
        parts = [f"{counts.get(k, 0)} {k}" for k in ("running", "finished", "stopped", "failed")]
        return ", ".join(parts) + of

    def _best(self, trials: list[Any]) -> str:
        done = [t for t in trials if DONE in (t.last_result or {}) and _finite(t.last_result.get(METRIC))]
        if not done:
            return ""
        best = max(done, key=lambda t: t.last_result[METRIC])
        return f"; best so far {self._metric_name} {best.last_result[METRIC]:.3f} ({_setting(best)})"

    def _write_stopped_row(self, trial: Any, result: dict[str, Any]) -> None:
        """A pipeline row for a trial ASHA stopped: its metric at the stop, the cost of its finished
        stages plus the device time of the stage it was in (that stage's FLOPs are not counted)."""
        store = self.store()
        run_id = f"{self.sweep_id}-{self._key(trial)}"
        if any(r["status"] != "failed" for r in store.rows(row_type="pipeline", run_id=run_id)):
            return  # written before an interruption
        # a 'failed' row may come from the trial itself, its stage torn down by this very stop: the
        # 'stopped' row written after it supersedes it (readers keep a run's newest row)
        exp = self.experiment
        prior = Cost.from_fields(result, PRIOR_COST_PREFIX)
        params, seed = split_seed(dict(trial.config), exp.replicate_seeds)
        context = RowContext(exp.name, exp.arch, git_commit(), seed, sweep_id=self.sweep_id, params=params)
        row = stopped_trial_row(
            context,
            exp,
            run_id=run_id,
            stage=str(result.get("stage")),
            evaluations=int(result[TIME_ATTR]),
            metric=result.get(METRIC),
            prior=prior,
            stage_device_seconds=float(result.get("stage_device_seconds", 0.0)),
        )
        store.append([row])


def _setting(trial: Any) -> str:
    return ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in dict(trial.config).items())


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "-"
