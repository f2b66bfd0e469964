"""Results stores the dashboard tests write: a full one (every pipeline, a failed stage, a sweep, a
segmentation experiment, histories, checkpoints), an empty one, and a malformed one."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import save_file

from rmoe_platform.results import ResultsStore

D, H, O, E, R = 8, 16, 8, 4, 2  # MLP widths, experts, low rank
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
FAILED_ERROR = 'RuntimeError: boom\nTraceback (most recent call last):\n  File "stage.py", line 1\nRuntimeError: boom'


def _cost(flops: float, hours: float, dollars: float) -> dict[str, float]:
    return {"flops": flops, "device_seconds": hours * 3600, "gpu_days": hours / 24, "dollars": dollars}


def history(steps: int = 20, *, moe: bool = True) -> list[dict[str, Any]]:
    out = []
    for step in range(2, steps + 1, 2):
        record: dict[str, Any] = {"step": step, "epoch": step // 10, "samples": step * 16, "loss": 2.0 / step}
        record.update(task_loss=1.9 / step, aux_loss=0.1 / step, lr=1e-3 * (1 - step / (steps + 1)))
        if step % 10 == 0:
            record.update(val_accuracy=0.5 + step / 100, val_loss=1.0 / step)
        if moe:
            loads = np.array([1.0 + step / 10, 1.0, 1.0, 1.0 - step / 40])
            loads = loads / loads.sum()
            record.update({f"moe/blocks.1.mlp/load_{i}": float(f) for i, f in enumerate(loads)})
            record.update({"moe/blocks.1.mlp/dropped_fraction": 0.1 / step, "moe/blocks.1.mlp/router_entropy": 1.3})
            record["moe/blocks.1.mlp/max_load"] = float(loads.max() * E)
        out.append(record)
    return out


def write_checkpoints(root: Path) -> dict[str, str]:
    """Tiny checkpoints: a dense parent, residual experts (full and low rank), plain upcycled experts."""
    rng = np.random.default_rng(0)
    fc1, fc2 = rng.normal(size=(H, D)).astype(np.float32), rng.normal(size=(O, H)).astype(np.float32)
    dense = {
        "blocks.1.mlp.fc1.weight": fc1,
        "blocks.1.mlp.fc2.weight": fc2,
        "blocks.3.mlp.fc1.weight": fc1,
        "blocks.3.mlp.fc2.weight": fc2,
    }
    residual = {
        "blocks.1.mlp.experts.core_w1_DH": fc1.T.copy(),
        "blocks.1.mlp.experts.core_w2_HO": fc2.T.copy(),
        "blocks.1.mlp.experts.core_b1_H": np.zeros(H, np.float32),
        "blocks.1.mlp.experts.core_b2_O": np.zeros(O, np.float32),
        "blocks.1.mlp.experts.res_w1_EDH": 0.05 * rng.normal(size=(E, D, H)).astype(np.float32),
        "blocks.1.mlp.experts.res_w2_EHO": 0.05 * rng.normal(size=(E, H, O)).astype(np.float32),
        "blocks.1.mlp.experts.res_b1_EH": np.zeros((E, H), np.float32),
        "blocks.1.mlp.experts.res_b2_EO": np.zeros((E, O), np.float32),
        "blocks.1.mlp.router.gate.weight": rng.normal(size=(E, D)).astype(np.float32),
        "blocks.3.mlp.experts.core_w1_DH": fc1.T.copy(),
        "blocks.3.mlp.experts.core_w2_HO": fc2.T.copy(),
        "blocks.3.mlp.experts.res_w1_a_EDR": rng.normal(size=(E, D, R)).astype(np.float32),
        "blocks.3.mlp.experts.res_w1_b_ERH": 0.05 * rng.normal(size=(E, R, H)).astype(np.float32),
        "blocks.3.mlp.experts.res_w2_a_EHR": rng.normal(size=(E, H, R)).astype(np.float32),
        "blocks.3.mlp.experts.res_w2_b_ERO": 0.05 * rng.normal(size=(E, R, O)).astype(np.float32),
    }
    plain = {
        "blocks.1.mlp.experts.w1_EDH": (fc1.T[None] + 0.1 * rng.normal(size=(E, D, H))).astype(np.float32),
        "blocks.1.mlp.experts.w2_EHO": (fc2.T[None] + 0.1 * rng.normal(size=(E, H, O))).astype(np.float32),
        "blocks.1.mlp.experts.b1_EH": np.zeros((E, H), np.float32),
        "blocks.1.mlp.experts.b2_EO": np.zeros((E, O), np.float32),
    }
    uris = {}
    for name, tensors in (("dense", dense), ("residual", residual), ("plain", plain)):
        folder = root / name / "checkpoint_00000010"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"step": "10"})
        uris[name] = str(folder)
    return uris


def _stage(run_id: str, stage: str, kind: str, pipeline: str, parent: str | None, **extra: Any) -> dict[str, Any]:
    row = {
        "row_type": "stage",
        "experiment": "exp-a",
        "task": "classification",
        "arch": "rmoe_vit_nano_patch4_32",
        "pipeline": pipeline,
        "stage": stage,
        "stage_kind": kind,
        "run_id": run_id,
        "parent_run_id": parent,
        "status": "succeeded",
        "metric_name": "accuracy",
        "device_kind": "gpu",
        "config": {"name": run_id, "budget": {"steps": 20}},
        "finished_at": T0,
    }
    row.update(extra)
    return row


def _pipeline(name: str, stages: list[dict[str, Any]], metric: float | None, **extra: Any) -> dict[str, Any]:
    total = {k: sum(s[k] for s in stages) for k in ("flops", "device_seconds", "gpu_days", "dollars")}
    entries = [
        {"stage": s["stage"], "run_id": s["run_id"], "status": s["status"], "shared": s.get("shared", False)}
        | {k: s[k] for k in ("flops", "device_seconds", "dollars")}
        for s in stages
    ]
    row = {
        "row_type": "pipeline",
        "experiment": "exp-a",
        "task": "classification",
        "arch": "rmoe_vit_nano_patch4_32",
        "pipeline": name,
        "stage": stages[-1]["stage"],
        "run_id": f"exp-a-{name}-{extra.pop('suffix', '0')}",
        "parent_run_id": stages[-1]["run_id"],
        "status": "succeeded" if metric is not None else "failed",
        "metric_name": "accuracy",
        "metric": metric,
        "config": {"stages": entries, "experiment": {"name": "exp-a"}},
        "checkpoint_uri": stages[-1].get("checkpoint_uri"),
        "finished_at": T0 + dt.timedelta(hours=1),
        **total,
    }
    row.update(extra)
    return row


def full_rows(ckpt: dict[str, str]) -> list[dict[str, Any]]:
    """exp-a: all five pipelines (upcycle failed in its last stage), a sweep over rmoe_i, and exp-seg."""
    shared = "dense,rmoe_i,rmoe_d,upcycle"
    up = _stage(
        "up-dense",
        "upstream_dense",
        "upstream_dense",
        shared,
        None,
        shared=True,
        metric=0.6,
        checkpoint_uri=ckpt["dense"],
        history=history(moe=False),
        **_cost(100, 10, 10),
    )
    dense = _stage(
        "dense-down",
        "dense/downstream",
        "downstream",
        "dense",
        "up-dense",
        metric=0.70,
        metrics={"val_accuracy": 0.70, "val_loss": 1.1},
        **_cost(10, 1, 1),
    )
    up_moe = _stage(
        "up-moe",
        "upstream_moe",
        "upstream_moe",
        "moe",
        None,
        num_experts=E,
        metric=0.65,
        checkpoint_uri=ckpt["plain"],
        **_cost(300, 30, 30),
    )
    moe = _stage("moe-down", "moe/downstream", "downstream", "moe", "up-moe", metric=0.80, **_cost(12, 1.2, 1.2))
    res = _stage(
        "res-i",
        "rmoe_i/residual",
        "residual",
        "rmoe_i",
        "up-dense",
        num_experts=E,
        metric=0.62,
        checkpoint_uri=ckpt["residual"],
        history=history(),
        telemetry={
            "moe/blocks.1.mlp/router_entropy": 1.3,
            "moe/blocks.1.mlp/residual_norm_ratio_mean": 0.05,
            "moe/blocks.1.mlp/load_0": 0.4,
        },
        **_cost(20, 2, 2),
    )
    rmoe_i = _stage(
        "rmoe_i-down",
        "rmoe_i/downstream",
        "downstream",
        "rmoe_i",
        "res-i",
        metric=0.78,
        history=history(),
        checkpoint_uri=ckpt["residual"],
        **_cost(12, 1.2, 1.2),
    )
    rmoe_d = _stage(
        "rmoe_d-down",
        "rmoe_d/downstream",
        "downstream",
        "rmoe_d",
        "up-dense",
        num_experts=E,
        metric=0.74,
        **_cost(12, 1.2, 1.2),
    )
    upc = _stage(
        "upc-int",
        "upcycle/intermediate",
        "upcycle",
        "upcycle",
        "up-dense",
        num_experts=E,
        metric=0.63,
        checkpoint_uri=ckpt["plain"],
        **_cost(40, 4, 4),
    )
    upc_down = _stage(
        "upc-down",
        "upcycle/downstream",
        "downstream",
        "upcycle",
        "upc-int",
        status="failed",
        error=FAILED_ERROR,
        finished_at=T0 - dt.timedelta(days=1),
        **_cost(0, 0, 0),
    )
    rows = [up, dense, up_moe, moe, res, rmoe_i, rmoe_d, upc, upc_down]
    rows += [
        _pipeline("dense", [up, dense], 0.70),
        _pipeline("dense", [up, dense], 0.10, suffix="old", finished_at=T0),  # superseded by the newer row
        _pipeline("moe", [up_moe, moe], 0.80, num_experts=E),
        _pipeline("rmoe_i", [up, res, rmoe_i], 0.78, num_experts=E),
        _pipeline("rmoe_d", [up, rmoe_d], 0.74, num_experts=E),
        _pipeline("upcycle", [up, upc, upc_down], None, error="upcycle/downstream: RuntimeError: boom"),
    ]
    for experts in (2, 4):
        for steps in (12, 24):
            params = {"num_experts": experts, "residual_budget": {"steps": steps}}
            key = f"e{experts}-s{steps}"
            common = {"sweep_id": "sw-1", "params": params}
            trial_res = _stage(
                f"res-{key}",
                "rmoe_i/residual",
                "residual",
                "rmoe_i",
                "up-dense",
                num_experts=experts,
                metric=0.6,
                **common,
                **_cost(steps, steps / 10, steps / 10),
            )
            trial_down = _stage(
                f"down-{key}",
                "rmoe_i/downstream",
                "downstream",
                "rmoe_i",
                f"res-{key}",
                metric=0.7 + experts / 100 + steps / 1000,
                **common,
                **_cost(12, 1.2, 1.2),
            )
            rows += [trial_res, trial_down]
            rows.append(_pipeline("rmoe_i", [up, trial_res, trial_down], trial_down["metric"], suffix=key, **common))
    stopped_params = {"num_experts": 8, "residual_budget": {"steps": 24}}
    stopped = _stage(
        "res-e8-s24", "rmoe_i/residual", "residual", "rmoe_i", "up-dense", num_experts=8, metric=0.6,
        sweep_id="sw-1", params=stopped_params, **_cost(24, 2.4, 2.4),
    )  # fmt: skip
    rows += [stopped]
    # ASHA stopped it after one evaluation: the best metric of the sweep at the lowest cost, yet no final result
    rows.append(
        _pipeline(
            "rmoe_i", [up, stopped], 0.95, suffix="e8-s24", status="stopped", sweep_id="sw-1", params=stopped_params
        )
    )
    rows += replicate_rows()
    seg = {"experiment": "exp-seg", "task": "segmentation", "arch": "rmoe_swin_nano_patch4_window4_64"}
    seg_metrics = {"metric_name": "mIoU", **seg}
    seg_dense = _stage(
        "seg-dense",
        "dense/downstream",
        "downstream",
        "dense",
        None,
        metric=0.30,
        metrics={"val_mIoU": 0.30, "val_aAcc": 0.80},
        **seg_metrics,
        **_cost(5, 1, 1),
    )
    seg_rmoe = _stage(
        "seg-rmoe",
        "rmoe_i/downstream",
        "downstream",
        "rmoe_i",
        None,
        metric=0.35,
        metrics={"val_mIoU": 0.35, "val_aAcc": 0.85},
        **seg_metrics,
        **_cost(6, 1.5, 1.5),
    )
    rows += [seg_dense, seg_rmoe]
    rows += [
        _pipeline("dense", [seg_dense], 0.30, suffix="seg", **seg_metrics),
        _pipeline("rmoe_i", [seg_rmoe], 0.35, suffix="seg", imported=True, **seg_metrics),  # from an imported core
    ]
    return rows


# exp-rep: three pipelines, three seeds each (metric, dollars); an older seed-0 dense row is superseded
REPLICATES = {
    "dense": {0: (0.70, 1.0), 1: (0.72, 1.1), 2: (0.71, 0.9)},
    "moe": {0: (0.80, 4.0), 1: (0.83, 4.4), 2: (0.81, 4.2)},
    "rmoe_i": {0: (0.76, 1.5), 1: (0.77, 1.6), 2: (0.79, 1.4)},
}


def replicate_rows() -> list[dict[str, Any]]:
    rows = []
    for pipeline, by_seed in REPLICATES.items():
        for seed, (metric, dollars) in by_seed.items():
            stage = _stage(
                f"rep-{pipeline}-{seed}", f"{pipeline}/downstream", "downstream", pipeline, None,
                experiment="exp-rep", seed=seed, metric=metric, **_cost(10, dollars, dollars),
            )  # fmt: skip
            rows += [
                stage,
                _pipeline(pipeline, [stage], metric, suffix=f"rep-s{seed}", experiment="exp-rep", seed=seed),
            ]
    stale = _stage("rep-dense-old", "dense/downstream", "downstream", "dense", None, experiment="exp-rep", seed=0)
    rows.append(
        _pipeline(
            "dense", [{**stale, **_cost(1, 9, 9)}], 0.1, suffix="old", experiment="exp-rep", seed=0, finished_at=T0
        )
    )
    return rows


def write_full_store(root: Path) -> Path:
    ckpt = write_checkpoints(root / "checkpoints")
    store = root / "results"
    ResultsStore(str(store)).append(full_rows(ckpt))
    return store


def write_malformed_store(root: Path) -> Path:
    """Good rows next to a file that is not Parquet, an older file lacking columns, unreadable JSON,
    and pipeline rows without metric or cost."""
    store = root / "malformed"
    rows = full_rows(write_checkpoints(root / "checkpoints-malformed"))[:14]
    rows[1]["config"] = "{not json"
    rows[4]["history"] = "[1, 2"
    rows[5]["history"] = json.dumps([1, 2])  # JSON, but not a list of records
    rows[6]["params"] = "oops"
    rows[7]["metrics"] = "[]"
    rows[11].update(metric=None, flops=None, device_seconds=None, gpu_days=None, dollars=None)
    ResultsStore(str(store)).append(rows)
    (store / "part-zzz-not-parquet.parquet").write_bytes(b"this is not a parquet file")
    old = pa.table({"row_type": ["pipeline"], "experiment": ["exp-old"], "pipeline": ["dense"], "run_id": ["old-1"]})
    pq.write_table(old, store / "part-000-old-schema.parquet")
    return store


# The columns the cost ledger added (results schema 3); a store written before has none of them.
LEDGER_COLUMNS = ("overhead_device_seconds", "achieved_flops_per_second", "mfu", "device_model", "ledger")


def write_pre_ledger_store(root: Path) -> Path:
    """The full store's rows as a schema-2 writer wrote them: without the ledger's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rmoe_platform.results.store import SCHEMA, normalize_row

    ckpt = write_checkpoints(root / "checkpoints")
    schema = pa.schema([f for f in SCHEMA if f.name not in LEDGER_COLUMNS])
    rows = []
    for row in full_rows(ckpt):
        record = {k: v for k, v in normalize_row(row).items() if k not in LEDGER_COLUMNS}
        rows.append({**record, "schema_version": 2})
    store = root / "results"
    store.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), store / "part-old.parquet")
    return store
