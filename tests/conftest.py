"""Shared fixtures: deterministic seeds, the repo root, a local Ray, and a real S3 endpoint (moto)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rmoe_platform.cluster import start_local
from rmoe_platform.storage.local_s3 import LocalS3, S3Endpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


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
