"""Shared fixtures: deterministic seeds and the repo root."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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

    context = ray.init(
        num_cpus=6,
        include_dashboard=False,
        log_to_driver=False,
        namespace="rmoe-tests",
        _node_ip_address="127.0.0.1",  # keep the test cluster on loopback
    )
    try:
        yield context
    finally:
        ray.shutdown()
