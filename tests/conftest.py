"""Shared fixtures: deterministic seeds, the repo root, a local Ray, and a real S3 endpoint (moto)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rmoe_platform.cluster import start_local
from rmoe_platform.storage.local_s3 import LocalS3, S3Endpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding slow tests run first, each file's tests in their own order.

    `make test` runs the suite on two xdist workers that take whole files in this order (`--dist loadfile
    --no-loadscope-reorder`: a file's module fixtures, such as a sweep's shared dense core, stay in one
    process). Started first, the long files end near together and the short ones fill in after them;
    in name order, `test_sweep.py` (the longest) would start last and run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within a group is kept


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance for the whole session, shut down by the handle that started it."""
    import ray

    context = start_local(6, namespace="rmoe-tests")  # on loopback, as the jobs start it
    try:
        yield context
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    """`moto_server` on a free loopback port with IAM auth on; stopped by the handle that started it."""
    with LocalS3() as endpoint:
        yield endpoint
