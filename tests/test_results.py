"""The results store: append-only, concurrent-safe, tolerant of malformed files."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from rmoe_platform.results import SCHEMA_VERSION, ResultsStore
from rmoe_platform.storage.s3 import S3Access


def _writer(args: tuple[str, S3Access | None, int, int]) -> None:
    uri, access, writer, count = args
    store = ResultsStore(uri, access)
    for i in range(count):
        store.append([{"row_type": "stage", "experiment": "concurrency", "run_id": f"w{writer}-{i}", "metric": i}])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_writers_lose_nothing(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """8 processes append at once, to a folder or to a bucket on a real S3 endpoint: every row is there once."""
    if where == "s3":
        endpoint = request.getfixturevalue("s3_server")
        uri, access, per_writer = f"s3://{endpoint.bucket()}/results", endpoint.access(), 25
    else:
        uri, access, per_writer = str(tmp_path / "results"), None, 50
    with mp.get_context("spawn").Pool(8) as pool:
        pool.map(_writer, [(uri, access, w, per_writer) for w in range(8)])
    result = ResultsStore(uri, access).read()
    assert not result.skipped
    ids = result.table.column("run_id").to_pylist()
    assert len(ids) == 8 * per_writer and len(set(ids)) == 8 * per_writer
    assert set(result.table.column("schema_version").to_pylist()) == {SCHEMA_VERSION}


def test_truncated_file_is_reported_and_skipped(tmp_path: Path) -> None:
    store = ResultsStore(str(tmp_path / "results"))
    good = store.append([{"row_type": "stage", "run_id": "a"}, {"row_type": "pipeline", "run_id": "b"}])
    bad = Path(store.append([{"row_type": "stage", "run_id": "c"}]))
    bad.write_bytes(bad.read_bytes()[:40])  # a writer that died mid-file (or a corrupted object)
    (tmp_path / "results" / "notes.txt").write_text("not parquet, not ours")
    result = store.read()
    assert sorted(result.table.column("run_id").to_pylist()) == ["a", "b"]
    assert len(result.skipped) == 1 and bad.name in result.skipped[0]
    assert Path(good).exists()


def test_unknown_columns_are_rejected_and_nothing_written(tmp_path: Path) -> None:
    store = ResultsStore(str(tmp_path / "results"))
    with pytest.raises(ValueError, match="unknown column"):
        store.append([{"row_type": "stage", "accuracy_typo": 1.0}])
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_empty_or_missing_store_reads_as_empty(tmp_path: Path) -> None:
    result = ResultsStore(str(tmp_path / "nothing-here")).read()
    assert result.table.num_rows == 0 and not result.skipped


def test_rows_from_before_the_cost_ledger_load_in_the_runner_and_the_sweep_report(tmp_path: Path) -> None:
    from dashboard_store import LEDGER_COLUMNS, write_pre_ledger_store

    from rmoe_platform.results.rows import row_cost
    from rmoe_platform.sweep.report import format_tables, trial_rows

    rows = ResultsStore(str(write_pre_ledger_store(tmp_path))).read().table.to_pylist()
    assert rows and all(row["schema_version"] == 2 for row in rows)
    assert all(row[column] is None for row in rows for column in LEDGER_COLUMNS)
    for row in rows:  # the runner reads a cached stage's cost this way
        cost = row_cost(row)
        assert cost.overhead_device_seconds == 0.0 and cost.device_seconds == (row["device_seconds"] or 0.0)
    trials = trial_rows(rows, "sw-1")
    assert trials
    text = format_tables(trials, "dollars", "accuracy", None)
    assert text.startswith(f"{len(trials)} trial(s)") and "(no finished trial)" not in text


def test_a_write_waits_out_an_unreachable_endpoint_then_gives_up_with_a_clear_error(s3_server) -> None:
    import threading
    import time

    from outage import OutageProxy

    from rmoe_platform.results import ResultsWriteError

    bucket = s3_server.bucket()
    with OutageProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1])) as proxy:
        access = s3_server.access(endpoint_url=proxy.url, max_attempts=1)
        store = ResultsStore(f"s3://{bucket}/results", access, write_patience=30)
        proxy.down()
        threading.Timer(3.0, proxy.up).start()  # the endpoint comes back while the write waits
        started = time.monotonic()
        store.append([{"row_type": "stage", "run_id": "through-a-restart"}])
        assert time.monotonic() - started >= 2.5
        assert [r["run_id"] for r in store.rows()] == ["through-a-restart"]

        proxy.down()
        impatient = ResultsStore(f"s3://{bucket}/results", access, write_patience=2)
        with pytest.raises(ResultsWriteError, match=rf"results: cannot write rows to 's3://{bucket}/results' \(tried "):
            impatient.append([{"row_type": "stage", "run_id": "lost-if-written-half"}])
        proxy.up()
        assert [r["run_id"] for r in store.rows()] == ["through-a-restart"], "nothing of the refused write"
