"""`ray job submit` against a `ray start --head` cluster the test starts (and stops by process group), whose job
reads its data from S3 and writes checkpoints and results there, with the credentials in the cluster's
environment (as a KubeRay pod gets them from a secret), never on a command line."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import StartupFailedError, free_ports, ray_cluster_env, start_retrying, startup_failure

from rmoe_platform.cluster import SINGLE_MACHINE_ENV
from rmoe_platform.results import ResultsStore
from rmoe_platform.storage.local_s3 import S3Endpoint

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path_factory, s3_server: S3Endpoint) -> Iterator[tuple[str, dict[str, str]]]:
    """A token-authenticated Ray head on loopback with its own ports and temp dir, and the S3 endpoint's
    credentials in its environment."""
    temp = Path("/tmp") / f"rmoe-head-{secrets.token_hex(4)}"  # short: Ray's socket paths have a length limit
    # with --node-ip-address=127.0.0.1: every Ray process on loopback
    env = ray_cluster_env(**SINGLE_MACHINE_ENV, **s3_server.env())
    log = tmp_path_factory.mktemp("ray-head") / "head.log"  # kept: its tail says why a head died

    def start() -> tuple[subprocess.Popen, str]:
        gcs, dash, agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr, client = free_ports(9)
        since = log.stat().st_size if log.exists() else 0  # a retried start appends to the same log
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
        while not _job_server_ready(address, env):
            if failure := startup_failure(head, log, since):
                _stop(head)
                raise StartupFailedError(f"the Ray head failed to start ({failure}):\n{tail(log)}")
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


def _job_server_ready(address: str, env: dict[str, str]) -> bool:
    try:
        listed = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return False
    return listed.returncode == 0


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


def prepare(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "prepare_data.py"), *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.slow
def test_a_submitted_job_reads_its_data_from_s3_and_writes_checkpoints_and_results_there(
    ray_head, s3_server: S3Endpoint
) -> None:
    address, env = ray_head
    bucket = s3_server.bucket()
    data, results = f"s3://{bucket}/datasets", f"s3://{bucket}/results"
    # the smoke preset's datasets, written to S3 beforehand (the job would generate them otherwise)
    upstream = ["--num-train", "128", "--num-val", "32", "--num-classes", "4", "--shard-rows", "64"]
    downstream = ["--num-train", "64", "--num-val", "32", "--num-classes", "3", "--class-offset", "4", "--seed", "7"]
    generated = [
        prepare("generate", *flags, "--out", f"{data}/{name}", env=env)
        for name, flags in (("smoke-up", upstream), ("smoke-down", downstream))
    ]
    assert all(p.returncode == 0 for p in generated), [p.stderr[-2000:] for p in generated]
    client = s3_server.client()
    datasets = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix="datasets/")["Contents"]}
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
            f"storage=s3://{bucket}/checkpoints",
            "--set",
            f"data.uri={data}",
            "--results",
            results,
        ],
        env={k: v for k, v in env.items() if not k.startswith("AWS_")},  # the client needs none
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    store = ResultsStore(results, s3=s3_server.access())
    rows = store.read().table.to_pylist()
    stages = [r for r in rows if r["row_type"] == "stage"]
    assert sorted(r["stage"] for r in stages) == ["dense/downstream", "upstream_dense"]
    assert [r["pipeline"] for r in rows if r["row_type"] == "pipeline"] == ["dense"]
    objects = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {k: v for k, v in objects.items() if k.startswith("datasets/")} == datasets, "read, not written again"
    for row in stages:
        assert row["status"] == "succeeded" and row["checkpoint_uri"].startswith(f"s3://{bucket}/checkpoints/")
        assert f"{row['checkpoint_uri'].removeprefix(f's3://{bucket}/')}/model.safetensors" in objects
        assert json.loads(row["config"])["data"]["uri"].startswith(data)
    secret = s3_server.secret_access_key
    assert secret not in out.stdout + out.stderr
    assert all(secret not in json.dumps(row, default=str) for row in rows)
