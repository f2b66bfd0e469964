"""The results store: an append-only Parquet dataset (local path or s3://…), one row per stage run and
one per pipeline summary.

Every write is a new object with a unique name, written whole (a temp file renamed into place locally;
a single PUT on S3), never a read-modify-write: concurrent writers cannot lose each other's rows.
A write to an S3 endpoint that cannot be reached is tried again for a while (an endpoint restarting, a
network cut): the row of a stage that trained for hours is worth a minute's wait. Readers skip files they
cannot parse and report them instead of failing.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rmoe_platform import storage
from rmoe_platform.storage.s3 import S3Access, explain_error, unreachable

# 2: predictions_uri; 3: the cost ledger (device_seconds = compute only, overhead apart); 4: seed;
# 5: attempts (a stage resumed after an interruption)
SCHEMA_VERSION = 5

SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("row_type", pa.string()),  # "stage" | "pipeline"
        ("experiment", pa.string()),
        ("pipeline", pa.string()),
        ("stage", pa.string()),
        ("stage_kind", pa.string()),
        ("run_id", pa.string()),
        ("parent_run_id", pa.string()),
        ("config_hash", pa.string()),
        ("parent_hash", pa.string()),
        ("shared", pa.bool_()),
        ("imported", pa.bool_()),  # an imported core's stage row / a pipeline that starts from one
        ("head_reinitialized", pa.bool_()),  # the stage's classifier is new: its parent's had other classes
        ("cached", pa.bool_()),
        ("status", pa.string()),
        ("attempts", pa.int32()),  # a stage's runs: 1, or more when it resumed an interrupted run (null before v5)
        ("error", pa.string()),
        ("task", pa.string()),
        ("arch", pa.string()),
        ("seed", pa.int64()),  # the run's seed: replicates of one setting differ only in it (null before v4)
        ("num_experts", pa.int32()),
        ("top_k", pa.int32()),
        ("moe_layers", pa.string()),
        ("residual_rank", pa.int32()),
        ("budget_steps", pa.int64()),
        ("budget_epochs", pa.int64()),
        ("metric_name", pa.string()),
        ("metric", pa.float64()),
        ("metrics", pa.string()),  # JSON: every validation metric (e.g. mIoU, aAcc; bbox/segm AP) and loss terms
        ("val_loss", pa.float64()),
        ("train_loss", pa.float64()),
        ("flops", pa.float64()),
        ("device_kind", pa.string()),
        ("num_workers", pa.int32()),
        ("wall_seconds", pa.float64()),
        ("device_seconds", pa.float64()),  # compute (training + evaluation) x devices: the compared cost
        ("overhead_device_seconds", pa.float64()),  # start, setup, ingest start, checkpoints, teardown x devices
        ("achieved_flops_per_second", pa.float64()),  # training FLOPs / training time, all devices together
        ("mfu", pa.float64()),  # achieved / (device peak in the stage's precision x devices), known devices only
        ("device_model", pa.string()),  # the device table's key of what a stage ran on (cpu, h100, a100, l4)
        ("ledger", pa.string()),  # JSON: wall seconds per part (start, setup, ingest_start, train, eval, …)
        ("gpu_days", pa.float64()),
        ("dollars", pa.float64()),
        ("marginal_flops", pa.float64()),
        ("marginal_device_seconds", pa.float64()),
        ("marginal_dollars", pa.float64()),
        ("telemetry", pa.string()),  # JSON: the precision it ran in; MoE load, drop fraction, entropy, residual norms
        ("history", pa.string()),  # JSON list: the stage's training reports over time (loss, lr, val_*, moe/*)
        ("params", pa.string()),  # JSON: a sweep trial's sampled setting (name -> value)
        ("config", pa.string()),  # JSON of the stage or experiment config
        ("checkpoint_uri", pa.string()),
        ("predictions_uri", pa.string()),  # a seg/det stage's exported validation predictions (PNGs / COCO JSON)
        ("sweep_id", pa.string()),
        ("git_commit", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass
class ReadResult:
    table: pa.Table
    skipped: list[str] = field(default_factory=list)  # "path: reason" for files that could not be read


class ResultsWriteError(RuntimeError):
    """Rows could not be written (after waiting out an unreachable endpoint): nothing of them was written."""


class ResultsStore:
    """Append rows to, and read rows from, the Parquet dataset at `uri`. `write_patience`: seconds a write
    keeps trying an S3 endpoint that cannot be reached before it gives up."""

    def __init__(self, uri: str, s3: S3Access | None = None, write_patience: float = 60.0) -> None:
        self.uri = storage.normalize(uri)
        self.access = s3
        self.write_patience = write_patience
        self.fs, self.root = storage.filesystem(self.uri, field="results", s3=s3)

    def check_writable(self) -> None:
        storage.check_writable(self.uri, field="results", s3=self.access)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> str:
        """Write `rows` as one new Parquet object; returns its path. Unknown columns are an error."""
        records = [normalize_row(row) for row in rows]
        if not records:
            raise ValueError("results: nothing to append")
        table = pa.Table.from_pylist(records, schema=SCHEMA)
        name = f"part-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex}.parquet"
        final = f"{self.root.rstrip('/')}/{name}"
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self._write_patiently(final, buffer.getvalue())
        return final

    def _write_patiently(self, path: str, data: bytes) -> None:
        """One whole object (it appears whole or not at all), tried again while the endpoint is unreachable."""
        deadline, pause = time.monotonic() + self.write_patience, 1.0
        while True:
            try:
                storage.write_bytes(self.fs, path, data)
                return
            except OSError as err:
                if not unreachable(err) or time.monotonic() + pause > deadline:
                    reason = explain_error(err, self.uri, self.access or S3Access())
                    waited = f" (tried for {self.write_patience:.0f} s)" if unreachable(err) else ""
                    raise ResultsWriteError(f"results: cannot write rows to {self.uri!r}{waited}: {reason}") from err
                time.sleep(pause)
                pause = min(2 * pause, 8.0)

    def read(self) -> ReadResult:
        """All rows of all readable files (schema-aligned); unreadable files are listed in `skipped`."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False, allow_not_found=True))
        except OSError as err:
            raise ValueError(f"results: cannot list {self.uri!r}: {err}") from None
        tables, skipped = [], []
        for info in sorted(infos, key=lambda i: i.path):
            base = info.base_name
            if info.type != pafs.FileType.File or not base.endswith(".parquet") or base.startswith("."):
                continue
            try:
                table = pq.read_table(info.path, filesystem=self.fs)
                tables.append(_align(table))
            except Exception as err:  # a truncated or foreign file must not hide the others
                skipped.append(f"{info.path}: {type(err).__name__}: {err}")
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        return ReadResult(table, skipped)

    def rows(self, **equals: Any) -> list[dict[str, Any]]:
        """Rows whose columns equal the given values (a convenience over `read()`)."""
        out = []
        for row in self.read().table.to_pylist():
            if all(row.get(k) == v for k, v in equals.items()):
                out.append(row)
        return out


def normalize_row(row: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(row) - set(SCHEMA.names))
    if unknown:
        raise ValueError(f"results: unknown column(s) {', '.join(unknown)}")
    out = {name: row.get(name) for name in SCHEMA.names}
    out["schema_version"] = SCHEMA_VERSION
    for key in ("telemetry", "config", "metrics", "history", "params", "ledger"):
        if out[key] is not None and not isinstance(out[key], str):
            out[key] = json.dumps(out[key], sort_keys=True, default=str)
    return out


def _align(table: pa.Table) -> pa.Table:
    """Conform a file's table to the current schema (missing columns as nulls, extra ones dropped)."""
    columns = []
    for schema_field in SCHEMA:
        if schema_field.name in table.column_names:
            columns.append(table.column(schema_field.name).cast(schema_field.type))
        else:
            columns.append(pa.nulls(len(table), schema_field.type))
    return pa.Table.from_arrays(columns, schema=SCHEMA)
