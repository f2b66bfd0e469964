"""Bad input, refused up front: one table over the three jobs and the dashboard.

Each case runs the job's entry point in this process (as `jobs/*.py` does) with Ray's start replaced by a
failure, so a case that got past validation fails loudly instead of training. Every case must exit 2 (the
dashboard: show its message), name the field or file in the message, print no traceback, and leave the
storage, results and data locations unwritten.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

import rmoe
from rmoe_platform.cli import pipeline as pipeline_cli
from rmoe_platform.cli import prepare_data as prepare_cli
from rmoe_platform.cli import sweep as sweep_cli

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
APP = ROOT / "dashboard" / "app.py"
WRITTEN = ("ckpt", "res", "data", "out")  # what no case may create under its tmp_path


@dataclass(frozen=True)
class Case:
    """`args` may hold `{tmp}` (the case's tmp_path); `setup(tmp)` writes the files the case needs."""

    job: str  # pipeline | sweep | prepare_data | dashboard
    args: tuple[str, ...]
    message: str
    setup: Callable[[Path], None] | None = None


def _file(name: str, text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_text(text)


def _truncated_checkpoint(tmp: Path) -> None:
    model = rmoe.build_model(rmoe.ModelSpec("rmoe_vit_nano_patch4_32", {"embed_dim": 32, "depth": 2, "num_heads": 2}))
    path = tmp / "core.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _sweep_file(tmp: Path, extra: str = "") -> None:
    (tmp / "sweep.yaml").write_text(
        f"name: bad\nexperiment: {SMOKE}\npipeline: rmoe_i\nspace:\n  num_experts: {{grid: [2, 4]}}\n{extra}"
    )


def _swept(extra: str) -> Callable[[Path], None]:
    return lambda tmp: _sweep_file(tmp, extra)


P, S = "pipeline", "sweep"
CASES: dict[str, Case] = {
    # configs
    "yaml-malformed": Case(P, ("--config", "{tmp}/x.yaml"), "not valid YAML", _file("x.yaml", "name: [unclosed")),
    "config-missing": Case(P, ("--config", "{tmp}/none.yaml"), "no such file"),
    "top-level-not-a-mapping": Case(P, ("--config", "{tmp}/x.yaml"), "mapping", _file("x.yaml", "- a\n- b\n")),
    "unknown-field": Case(
        P,
        ("--config", "{tmp}/x.yaml"),
        "experiment.upstream_typo: unknown field",
        _file("x.yaml", "name: x\nupstream_typo: 1\n"),
    ),
    # overrides: types
    "seed-not-int": Case(P, ("--set", "seed=abc"), "experiment.seed: expected int, got 'abc'"),
    "max-failures-negative": Case(P, ("--set", "max_failures=-1"), "experiment.max_failures must be >= 0, got -1"),
    "seed-bool": Case(P, ("--set", "seed=true"), "experiment.seed: expected int, got True"),
    "lr-not-number": Case(
        P, ("--set", "upstream.optim.lr=abc"), "experiment.upstream.optim.lr: expected float, got 'abc'"
    ),
    "layers-int": Case(P, ("--set", "moe.layers=99"), "experiment.moe.layers: expected str or a list of int, got 99"),
    "layers-list-item": Case(P, ("--set", "moe.layers=[1,x]"), "experiment.moe.layers: expected str or a list of int"),
    "top-k-fraction": Case(P, ("--set", "moe.top_k=1.5"), "experiment.moe.top_k: expected int, got 1.5"),
    "compile-not-bool": Case(P, ("--set", "upstream.compile=1"), "experiment.upstream.compile: expected bool"),
    "pipelines-not-list": Case(P, ("--set", "pipelines=dense"), "experiment.pipelines: expected a list of str"),
    "price-not-number": Case(P, ("--set", "prices={cpu: x}"), "experiment.prices: expected a mapping of str to float"),
    "seeds-not-list": Case(P, ("--set", "seeds=3"), "experiment.seeds: expected a list of int, got 3"),
    # overrides: values
    "batch-zero": Case(P, ("--set", "batch_size=0"), "batch_size must be >= 1"),
    "top-k-over-experts": Case(P, ("--set", "moe.top_k=9"), "top_k"),
    "unknown-pipeline": Case(P, ("--pipelines", "dense,bogus"), "unknown pipeline 'bogus'"),
    "override-without-value": Case(P, ("--set", "noequals"), "expected key=value"),
    "too-many-classes": Case(P, ("--set", "upstream.data.generate.num_classes=99"), "num_classes"),
    "unknown-arch": Case(P, ("--set", "arch=no_such_model"), "no_such_model"),
    "unknown-task": Case(P, ("--set", "downstream.task=bogus"), "downstream.task: unknown task 'bogus'"),
    "seeds-not-integers": Case(P, ("--seeds", "0,x"), "--seeds: expected comma-separated integers"),
    "seeds-repeated": Case(P, ("--seeds", "1,1"), "seeds: each seed once"),
    "seed-outside-seeds": Case(P, ("--set", "seed=4", "--seeds", "0,1"), "seed=4 is not among seeds"),
    "estimate-flags-alone": Case(P, ("--device", "h100"), "--device and --calibrate-from go with --estimate"),
    "estimate-unknown-device": Case(P, ("--estimate", "--device", "tpu9"), "tpu9"),
    # the model of every stage, resolved against the real model before any stage trains
    "layer-out-of-range": Case(P, ("--set", "moe.layers=[0,99]"), "experiment.moe.layers: unknown layer index 99"),
    "layer-count-zero": Case(P, ("--set", "moe.layers=last_0"), "experiment.moe.layers: 'last_0'"),
    "residual-rank-too-wide": Case(P, ("--set", "moe.residual_rank=1000"), "experiment.moe.residual_rank (1000)"),
    "experts-not-divisible": Case(
        P,
        ("--set", "moe.num_experts=3", "--set", "moe_scaling={num_workers: 2, expert_parallel_size: 2}"),
        "moe.num_experts: 3 experts cannot be sharded",
    ),
    # data, storage, results, endpoints, credentials, checkpoints
    "dataset-missing": Case(P, ("--set", "downstream.data={uri: /nonexistent/ds}"), "experiment.downstream.data.uri"),
    "storage-under-a-file": Case(
        P, ("--set", "storage={tmp}/blocker/ckpt"), "experiment.storage", _file("blocker", "x")
    ),
    "results-under-a-file": Case(P, ("--results", "{tmp}/blocker/res"), "results", _file("blocker", "x")),
    "endpoint-not-http": Case(P, ("--set", "s3.endpoint_url=localhost:9000"), "experiment.s3.endpoint_url"),
    "profile-unknown": Case(
        P,
        ("--set", "data.uri=s3://bucket/data", "--set", "s3.profile=no-such-profile"),
        "no-such-profile",
    ),
    "checkpoint-missing": Case(
        P, ("--set", "upstream.checkpoint={tmp}/none.safetensors"), "experiment.upstream.checkpoint"
    ),
    "checkpoint-truncated": Case(
        P, ("--set", "upstream.checkpoint={tmp}/core.safetensors"), "core.safetensors", _truncated_checkpoint
    ),
    # the sweep job
    "sweep-no-config": Case(S, (), "--config: a sweep file is required"),
    "sweep-unknown-field": Case(
        S, ("--config", "{tmp}/sweep.yaml"), "sweep.bogus: unknown field", _swept("bogus: 1\n")
    ),
    "sweep-experiment-type": Case(
        S,
        ("--config", "{tmp}/sweep.yaml", "--set", "experiment.seed=abc"),
        "experiment.seed: expected int",
        _sweep_file,
    ),
    "sweep-experiment-layers": Case(
        S,
        ("--config", "{tmp}/sweep.yaml", "--set", "experiment.moe.layers=[0,99]"),
        "experiment.moe.layers: unknown layer index 99",
        _sweep_file,
    ),
    # the data preparation job
    "prepare-too-many-classes": Case(
        "prepare_data", ("generate", "--num-classes", "99", "--out", "{tmp}/out"), "num_classes"
    ),
    "prepare-out-under-a-file": Case(
        "prepare_data", ("generate", "--size", "tiny", "--out", "{tmp}/blocker/out"), "blocker", _file("blocker", "x")
    ),
    "prepare-no-source-tree": Case(
        "prepare_data", ("convert", "ade20k", "--root", "{tmp}/nowhere", "--out", "{tmp}/out"), "nowhere"
    ),
    # the dashboard
    "dashboard-unknown-scheme": Case("dashboard", ("gs://bucket/results",), "Cannot read the results store"),
    "dashboard-store-is-a-file": Case(
        "dashboard", ("{tmp}/blocker",), "Cannot read the results store", _file("blocker", "x")
    ),
}


def run_case(case: Case, tmp: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The job's exit status and what it printed to stderr (the dashboard: 2 and its page's errors)."""
    args = [arg.replace("{tmp}", str(tmp)) for arg in case.args]
    if case.job == "dashboard":
        monkeypatch.setattr(sys, "argv", ["app.py", "--results", *args])
        app = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not app.exception, [e.value for e in app.exception]
        return (2 if app.error else 0), " ".join(str(e.value) for e in app.error)
    for module in (pipeline_cli, sweep_cli):
        monkeypatch.setattr(module, "connect", lambda: pytest.fail("Ray was started for bad input"))
    places = ("--set", f"storage={tmp / 'ckpt'}", "--set", f"data.uri={tmp / 'data'}", "--results", str(tmp / "res"))
    try:
        if case.job == "pipeline":
            overrides_first = "--config" not in args
            argv = [*(("--config", str(SMOKE)) if overrides_first else ()), *places, *args]
            status = pipeline_cli.main(argv)
        elif case.job == "sweep":
            sweep_places = (
                "--set",
                f"experiment.storage={tmp / 'ckpt'}",
                "--set",
                f"experiment.data.uri={tmp / 'data'}",
            )
            status = sweep_cli.main([*sweep_places, "--results", str(tmp / "res"), *args])
        else:
            status = prepare_cli.main(args)
    except SystemExit as exit_:  # argparse's own refusals
        status = int(exit_.code or 0)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_up_front(name: str, tmp_path: Path, monkeypatch, capsys) -> None:
    case = CASES[name]
    if case.setup is not None:
        case.setup(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    monkeypatch.chdir(tmp_path)  # a relative default location would land here, and be seen
    status, message = run_case(case, tmp_path, monkeypatch, capsys)
    assert status == 2, message
    assert case.message in message, message
    assert "Traceback" not in message
    created = {p.name for p in tmp_path.iterdir()} - before
    assert not created & set(WRITTEN) and not any((tmp_path / name).exists() for name in WRITTEN), created


def test_the_table_covers_every_job_and_enough_cases() -> None:
    assert {case.job for case in CASES.values()} == {"pipeline", "sweep", "prepare_data", "dashboard"}
    assert len(CASES) >= 30


@pytest.mark.parametrize("override", ["moe.layers=99", "seed=abc"])
def test_a_bad_override_exits_2_without_ray(override: str, tmp_path: Path) -> None:
    """As a user runs it: its own process, exit status 2, and no Ray started (the job is checked up front)."""
    probe = (
        "import sys, ray; sys.path[:0] = ['platform', 'jobs']; from rmoe_platform.cli.pipeline import main; "
        f"status = main(sys.argv[1:], {str(SMOKE)!r}); "
        "print('ray started' if ray.is_initialized() else 'no ray', file=sys.stderr); sys.exit(status)"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            "--set",
            override,
            "--set",
            f"storage={tmp_path / 'ckpt'}",
            "--results",
            str(tmp_path / "res"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "platform")},
    )
    assert out.returncode == 2, out.stderr
    assert "no ray" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "res").exists()
