"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_example_runs(repo_root: Path, tmp_path, monkeypatch) -> None:
    text = (repo_root / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), {})
