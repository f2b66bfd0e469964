"""The results store: append-only, concurrent-safe, tolerant of malformed files."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from rmoe_platform.results import SCHEMA_VERSION, ResultsStore


def _writer(args: tuple[str, int, int]) -> None:
    uri, writer, count = args
    store = ResultsStore(uri)
    for i in range(count):
        store.append([{"row_type": "stage", "experiment": "concurrency", "run_id": f"w{writer}-{i}", "metric": i}])


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    uri = str(tmp_path / "results")
    with mp.get_context("spawn").Pool(8) as pool:
        pool.map(_writer, [(uri, w, 50) for w in range(8)])
    result = ResultsStore(uri).read()
    assert not result.skipped
    ids = result.table.column("run_id").to_pylist()
    assert len(ids) == 400 and len(set(ids)) == 400
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
