"""Faults injected for real: a driver killed mid-stage and rerun, Ctrl-C, checkpoints cut short on disk.

A rerun of an experiment resumes an interrupted stage from its newest whole checkpoint (same config hash),
keeps its step count and history, charges the sum over its attempts, and writes the stage's row once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
import yaml
from outage import OutageProxy
from processes import cmdline, descendants

from rmoe.checkpoint import save_state_dict
from rmoe_platform.cli.interrupts import Interrupted, interruptible
from rmoe_platform.pipelines.resume import checkpoint_problem, find_resume_point, run_prefix
from rmoe_platform.results import ResultsStore
from rmoe_platform.stage.worker.checkpoints import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def write_checkpoint(directory: Path, step: int) -> None:
    directory.mkdir(parents=True)
    save_state_dict({"w": torch.full((64, 64), float(step))}, directory / MODEL_FILE, spec=None)
    save_state_dict({"w.exp_avg": torch.zeros(64, 64)}, directory / OPTIMIZER_FILE, spec=None)
    (directory / STATE_FILE).write_text(json.dumps({"progress": {"step": step}}))


def test_the_newest_whole_checkpoint_of_an_unfinished_run_is_chosen(tmp_path: Path) -> None:
    prefix = run_prefix("rmoe_i/residual", "0123456789abcdef")
    assert prefix == "rmoe_i-residual-01234567-"
    write_checkpoint(tmp_path / f"{prefix}aaaaaa" / "checkpoint_00000010", 10)
    write_checkpoint(tmp_path / f"{prefix}bbbbbb" / "checkpoint_00000020", 20)
    write_checkpoint(tmp_path / f"{prefix}bbbbbb" / "checkpoint_00000030", 30)
    write_checkpoint(tmp_path / f"{prefix}cccccc" / "checkpoint_00000050", 50)  # a finished run
    write_checkpoint(tmp_path / "rmoe_i-residual-ffffffff-dddddd" / "checkpoint_00000090", 90)  # another config
    newest = tmp_path / f"{prefix}bbbbbb" / "checkpoint_00000030" / MODEL_FILE
    newest.write_bytes(newest.read_bytes()[:-100])  # cut short, as by a kill during the write
    messages: list[str] = []

    point = find_resume_point(
        str(tmp_path), prefix, finished_runs={f"{prefix}cccccc"}, access=None, log=messages.append
    )

    assert point is not None and point.step == 20 and point.run_name == f"{prefix}bbbbbb"
    assert point.checkpoint_uri == str(tmp_path / f"{prefix}bbbbbb" / "checkpoint_00000020")
    assert len(messages) == 1 and "checkpoint_00000030 passed over: model.safetensors is truncated" in messages[0]


@pytest.mark.parametrize("damage", ["state", "optimizer-header", "empty"])
def test_a_damaged_checkpoint_is_never_resumed_from(tmp_path: Path, damage: str) -> None:
    prefix = run_prefix("upstream_dense", "feedfacefeedface")
    directory = tmp_path / f"{prefix}aaaaaa" / "checkpoint_00000004"
    write_checkpoint(directory, 4)
    if damage == "state":
        (directory / STATE_FILE).write_text('{"progress": ')
    elif damage == "optimizer-header":
        (directory / OPTIMIZER_FILE).write_bytes((directory / OPTIMIZER_FILE).read_bytes()[:20])
    else:
        (directory / MODEL_FILE).write_bytes(b"")
    messages: list[str] = []
    assert find_resume_point(str(tmp_path), prefix, finished_runs=(), access=None, log=messages.append) is None
    assert len(messages) == 1 and "passed over" in messages[0]


class LaggingListing(pafs.FileSystemHandler):
    """A local filesystem whose lookups do not see files it already serves, as an object store's may not
    while an upload completes: a check must judge a file by one view of it, the opened file's."""

    def __init__(self) -> None:
        self.local = pafs.LocalFileSystem()

    def get_type_name(self) -> str:
        return "lagging"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return [pafs.FileInfo(path, pafs.FileType.NotFound) for path in paths]

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.local.get_file_info(selector)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.local.open_input_file(path)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.local.open_input_stream(path)

    def _read_only(self, *args: object) -> None:
        raise NotImplementedError("read-only")

    copy_file = create_dir = delete_dir = delete_dir_contents = delete_file = _read_only
    delete_root_dir_contents = move = open_append_stream = open_output_stream = _read_only


def test_a_checkpoint_is_judged_by_the_files_it_serves_while_their_listing_lags(tmp_path: Path) -> None:
    whole, cut = tmp_path / "checkpoint_00000004", tmp_path / "checkpoint_00000008"
    write_checkpoint(whole, 4)
    write_checkpoint(cut, 8)
    full = (cut / MODEL_FILE).read_bytes()
    (cut / MODEL_FILE).write_bytes(full[:-100])
    fs = pafs.PyFileSystem(LaggingListing())
    assert checkpoint_problem(fs, str(whole)) is None
    assert checkpoint_problem(fs, str(cut)) == f"{MODEL_FILE} is truncated ({len(full) - 100} bytes of {len(full)})"


def test_no_storage_yet_means_nothing_to_resume(tmp_path: Path) -> None:
    assert find_resume_point(str(tmp_path / "none"), "x-", finished_runs=(), access=None, log=print) is None


def long_dense_job(
    tmp_path: Path, steps: int, checkpoint_every: int, keep: int, root: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """`jobs/pipeline.py` on the smoke preset's dense pipeline with an upstream stage long enough to stop
    mid-way (checkpointing every `checkpoint_every` steps), in its own local Ray; data, checkpoints and
    results under `root` (tmp_path when not given); returns command and env."""
    root = root or str(tmp_path)
    experiment = yaml.safe_load(SMOKE.read_text())
    experiment.update(pipelines=["dense"], storage=f"{root}/ckpt", results=f"{root}/results")
    experiment["data"] = {"uri": f"{root}/data"}
    experiment["upstream"]["data"]["generate"]["num_train"] = 1024
    experiment["upstream"]["budget"] = {"steps": steps}
    experiment["upstream"]["checkpoints"] = {"every_n_steps": checkpoint_every, "every_n_epochs": None, "keep": keep}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(experiment))
    command = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(config)]
    return command, {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _kill_tree(process: subprocess.Popen) -> None:
    started = descendants(process.pid)
    process.kill()
    process.wait(timeout=60)
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _steps_reached(checkpoints: Path) -> list[int]:
    return sorted(int(p.name[11:]) for p in checkpoints.glob("upstream_dense-*/checkpoint_0*"))


def _wait_for_checkpoint(job: subprocess.Popen, checkpoints: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not [s for s in _steps_reached(checkpoints) if s >= step]:
        assert job.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no checkpoint at step >= {step} in time"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_worker_then_a_killed_driver_and_the_stage_resumes_on_another_worker_count(tmp_path: Path) -> None:
    """One stage, three faults: its Train worker's process is killed (the worker group restarts in the same
    run, from the newest checkpoint), then the driver is killed; the rerun, on 2 workers instead of 1,
    continues from the newest checkpoint. One row, three attempts, no step trained twice in its history."""
    command, env = long_dense_job(tmp_path, steps=160, checkpoint_every=8, keep=2)
    command += ["--set", "max_failures=1"]
    checkpoints, log_path = tmp_path / "ckpt" / "smoke", tmp_path / "first.log"

    log = log_path.open("w")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_checkpoint(first, checkpoints, 16, log_path)
        workers = [pid for pid in descendants(first.pid) if "RayTrainWorker" in " ".join(cmdline(pid))]
        assert len(workers) == 1, [cmdline(pid) for pid in descendants(first.pid)]
        os.kill(workers[0], signal.SIGKILL)
        killed_after = max(_steps_reached(checkpoints))
        _wait_for_checkpoint(first, checkpoints, killed_after + 16, log_path)  # the restarted group trains on
    finally:
        _kill_tree(first)
        log.close()
    reached = max(_steps_reached(checkpoints))
    assert reached < 160, "killed mid-stage"
    assert not ResultsStore(str(tmp_path / "results")).rows(row_type="stage", stage="upstream_dense")

    two_workers = [*command, "--set", "scaling={num_workers: 2}"]
    second = subprocess.run(two_workers, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[upstream_dense] resuming interrupted run upstream_dense-" in second.stdout
    assert "on 2 worker(s)" in second.stdout
    rows = ResultsStore(str(tmp_path / "results")).rows(row_type="stage", stage="upstream_dense")
    assert len(rows) == 1 and rows[0]["status"] == "succeeded", "the row is written once"
    assert rows[0]["attempts"] == 3 and rows[0]["num_workers"] == 2
    history = json.loads(rows[0]["history"])
    steps = [entry["step"] for entry in history if "step" in entry]
    before_final = [step for step in steps if step < 160]  # the last step reports twice: training, then final
    assert before_final == sorted(set(before_final)) and steps[-1] == 160, "no step is repeated in the history"
    assert any(step <= killed_after for step in steps) and any(step > reached for step in steps), "every attempt's"
    ledger = json.loads(rows[0]["ledger"])  # the attempts' parts summed: still adding up to the wall time
    assert ledger["train_seconds"] > 0 and sum(ledger.values()) == pytest.approx(rows[0]["wall_seconds"], rel=1e-3)
    assert rows[0]["flops"] > 0


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_becomes_an_interruption_with_the_shells_exit_status(signum: int, status: int) -> None:
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as caught, interruptible():
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler runs at the next bytecode: never reached
    assert caught.value.exit_status == status
    assert signal.getsignal(signum) == before, "the previous handler is back"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_the_job_cleanly_and_says_how_to_resume(
    tmp_path: Path, signum: int, status: int
) -> None:
    command, env = long_dense_job(tmp_path, steps=400, checkpoint_every=4, keep=1)
    checkpoints = tmp_path / "ckpt" / "smoke"
    out, err = (tmp_path / "job.log").open("w"), (tmp_path / "job.err").open("w")  # files: no pipe fills up
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("upstream_dense-*/checkpoint_0*")):
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        job.send_signal(signum)  # the driver only, as `kill -INT` / `kill -TERM` does
        job.wait(timeout=60)
    finally:
        _kill_tree(job)
        out.close()
        err.close()
    stderr = (tmp_path / "job.err").read_text()
    assert job.returncode == status, stderr[-3000:]  # SIGTERM: not Ray's handlers, which abort the driver
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert (
        len(lines) == 1
        and f"({signal.Signals(signum).name}) during stage upstream_dense" in lines[0]
        and "rerun `jobs/pipeline.py" in lines[0]
    )
    assert "Traceback" not in stderr
    assert not ResultsStore(str(tmp_path / "results")).rows(), "an interrupted stage writes no row"
    for checkpoint in checkpoints.glob("upstream_dense-*/checkpoint_0*"):
        assert checkpoint_problem(pafs.LocalFileSystem(), str(checkpoint)) is None, "every checkpoint is whole"


@pytest.mark.slow
def test_an_s3_endpoint_restarting_mid_stage_fails_the_stage_clearly_and_the_rerun_resumes(
    s3_server, tmp_path: Path
) -> None:
    """Data, checkpoints and results on S3, reached through a proxy that goes down for 10 s once the stage has
    a checkpoint (the endpoint restarting, its data kept): the stage fails with one line naming the endpoint,
    its row waits for the endpoint to come back, no checkpoint is half-written or loaded partially, and
    the rerun resumes from the newest whole checkpoint and writes one succeeded row."""
    bucket = s3_server.bucket()
    client, access = s3_server.client(), s3_server.access()
    with OutageProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1])) as proxy:
        command, env = long_dense_job(tmp_path, steps=48, checkpoint_every=8, keep=2, root=f"s3://{bucket}")
        env.update({**s3_server.env(), "AWS_ENDPOINT_URL": proxy.url})

        fs = access.filesystem()

        def checkpoint_keys() -> list[str]:
            listed = client.list_objects_v2(Bucket=bucket, Prefix="ckpt/smoke/upstream_dense-").get("Contents", [])
            return [o["Key"] for o in listed]

        def whole_checkpoint_steps() -> set[int]:
            """Steps of the checkpoints whose every file is complete (an upload in flight is not yet one)."""
            files = [key for key in checkpoint_keys() if "/checkpoint_" in key and not key.endswith("/")]
            directories = {key.rsplit("/", 1)[0] for key in files}
            return {int(d.rsplit("_", 1)[1]) for d in directories if checkpoint_problem(fs, f"{bucket}/{d}") is None}

        log = (tmp_path / "first.log").open("w")
        first = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 300
            while not (before_outage := whole_checkpoint_steps()):
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.2)
            proxy.down()
            time.sleep(10)
            proxy.up()
            first.wait(timeout=300)
        finally:
            _kill_tree(first)
            log.close()
        output = (tmp_path / "first.log").read_text()
        assert first.returncode == 1, output[-3000:]
        assert (
            f"[upstream_dense] FAILED: storage unreachable: the S3 endpoint {proxy.url} could not be reached" in output
        )
        assert "rerun once the endpoint is back" in output and "Traceback" not in output, output[-3000:]
        store = ResultsStore(f"s3://{bucket}/results", s3=access)
        failed = store.rows(row_type="stage", stage="upstream_dense")
        assert [row["status"] for row in failed] == ["failed"], "the failed row waited for the endpoint"
        whole = whole_checkpoint_steps()
        assert whole and max(whole) >= max(before_outage), "the whole checkpoints written before the outage survived it"

        second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = max(whole)
    assert "[upstream_dense] resuming interrupted run upstream_dense-" in second.stdout
    assert f"from step {resumed} " in second.stdout, "from the newest whole checkpoint"
    rows = store.rows(row_type="stage", stage="upstream_dense")
    assert sorted(row["status"] for row in rows) == ["failed", "succeeded"]
    succeeded = next(row for row in rows if row["status"] == "succeeded")
    steps = [entry["step"] for entry in json.loads(succeeded["history"]) if "step" in entry]
    before_final = [step for step in steps if step < 48]  # the last step reports twice: training, then final
    assert succeeded["attempts"] == 2 and steps[-1] == 48
    assert before_final == sorted(set(before_final)), "continued from the checkpoint: no step repeated in the history"
