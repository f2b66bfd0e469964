"""`ray job submit` against a `ray start --head` cluster the test starts (and stops by process group)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import StartupFailedError, free_ports, ray_cluster_env, start_retrying

from rmoe_platform.cluster import SINGLE_MACHINE_ENV
from rmoe_platform.results import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """A token-authenticated Ray head on loopback with its own ports and temp dir."""
    temp = Path("/tmp") / f"rmoe-head-{secrets.token_hex(4)}"  # short: Ray's socket paths have a length limit
    env = ray_cluster_env(**SINGLE_MACHINE_ENV)  # with --node-ip-address=127.0.0.1: every Ray process on loopback
    log = tmp_path_factory.mktemp("ray-head") / "head.log"  # kept: its tail says why a head died

    def start() -> tuple[subprocess.Popen, str]:
        gcs, dash, agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr, client = free_ports(9)
        with log.open("a") as out:
            head = subprocess.Popen(
                [
                    str(BIN / "ray"),
                    "start",
                    "--head",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    f"--port={gcs}",
                    f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--runtime-env-agent-port={runtime_env}",
                    f"--metrics-export-port={metrics}",
                    f"--node-manager-port={node_mgr}",
                    f"--object-manager-port={obj_mgr}",
                    f"--ray-client-server-port={client}",
                    "--num-cpus=4",
                    f"--temp-dir={temp}",
                    "--include-dashboard=true",
                    "--disable-usage-stats",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 180
        while subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True
        ).returncode:
            if head.poll() is not None:
                _stop(head)
                raise StartupFailedError(f"the Ray head exited during start-up:\n{tail(log)}")
            if time.monotonic() > deadline:
                _stop(head)
                raise AssertionError(f"the Ray head's job server never became ready:\n{tail(log)}")
            time.sleep(2)
        return head, address

    try:
        head, address = start_retrying(start)
        try:
            yield address, env
        finally:
            _stop(head)
    finally:
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _stop(head: subprocess.Popen) -> None:
    """The head and everything it started (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.slow
def test_job_submission_runs_the_smoke_preset_into_the_store(ray_head, tmp_path: Path) -> None:
    address, env = ray_head
    results = tmp_path / "results"
    out = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "jobs/pipeline.py",
            "--config",
            "configs/smoke.yaml",
            "--pipelines",
            "dense",
            "--set",
            f"storage={tmp_path / 'ckpt'}",
            "--set",
            f"data.uri={tmp_path / 'data'}",
            "--results",
            str(results),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    rows = ResultsStore(str(results)).read().table.to_pylist()
    assert sorted(r["stage"] for r in rows if r["row_type"] == "stage") == ["dense/downstream", "upstream_dense"]
    assert [r["pipeline"] for r in rows if r["row_type"] == "pipeline"] == ["dense"]
