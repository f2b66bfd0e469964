"""Results: the append-only Parquet store (`store`), the rows it holds, built in one place (`rows`), and
pure analysis over them (`analysis`: the Pareto front). Torch-free: the dashboard reads through it."""

from rmoe_platform.results.store import (
    SCHEMA,
    SCHEMA_VERSION,
    ReadResult,
    ResultsStore,
    ResultsWriteError,
    normalize_row,
)

__all__ = ["SCHEMA", "SCHEMA_VERSION", "ReadResult", "ResultsStore", "ResultsWriteError", "normalize_row"]
