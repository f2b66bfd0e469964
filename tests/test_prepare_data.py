"""`jobs/prepare_data.py`: its command line, exit codes, and resumable writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "prepare_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_generate_and_the_three_converters() -> None:
    top = prepare("--help")
    assert top.returncode == 0 and "generate" in top.stdout and "convert" in top.stdout
    convert = prepare("convert", "--help")
    assert all(name in convert.stdout for name in ("imagenet", "ade20k", "coco"))


def test_generate_writes_a_card_and_a_rerun_writes_nothing_new(tmp_path: Path) -> None:
    out = tmp_path / "shapes-seg"
    args = ("generate", "--task", "segmentation", "--size", "tiny", "--shard-rows", "16", "--out", str(out))
    first = prepare(*args)
    assert first.returncode == 0, first.stderr
    assert "segmentation, 11 classes, train 64, val 32" in first.stdout
    card = json.loads((out / "card.json").read_text())
    assert card["classes"][0] == "background" and len(card["splits"]["train"]["shards"]) == 4
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = prepare(*args, "--no-progress")
    assert again.returncode == 0 and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    other = prepare(*args[:-2], "--seed", "3", "--out", str(out))
    assert other.returncode == 2 and "made differently" in other.stderr


def test_bad_sources_exit_2_and_write_nothing(tmp_path: Path) -> None:
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    cases = [
        (("convert", "imagenet", "--root", str(tmp_path / "imagenet")), "no class folders"),
        (("convert", "ade20k", "--root", str(tmp_path / "missing")), "missing"),
        (("convert", "coco", "--root", str(tmp_path / "missing")), "instances_train2017.json"),
        (("generate", "--num-classes", "40"), "num_classes"),
        (("generate", "--s3-endpoint-url", "localhost:9000"), "endpoint_url"),
    ]
    for args, message in cases:
        out = prepare(*args, "--out", str(tmp_path / "out"))
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()
