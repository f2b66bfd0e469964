"""The repo layout keeps the standard library's `platform` importable and ships both packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_platform_dir_is_not_a_package(repo_root: Path) -> None:
    assert not (repo_root / "platform" / "__init__.py").exists()
    assert (repo_root / "platform" / "rmoe_platform" / "__init__.py").exists()


def test_stdlib_platform_still_works_from_the_repo_root(repo_root: Path) -> None:
    code = "import platform, rmoe_platform, rmoe; print(platform.system(), rmoe_platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    system, location = out.stdout.split()
    assert system and Path(location).parent.name == "rmoe_platform"


def test_model_library_does_not_import_ray(repo_root: Path) -> None:
    hits = [p for p in (repo_root / "rmoe").rglob("*.py") if "import ray" in p.read_text()]
    assert not hits, f"rmoe/ must stay Ray-free: {hits}"
