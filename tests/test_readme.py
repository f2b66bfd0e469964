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


def test_readme_stage_config_is_a_valid_stage(repo_root: Path) -> None:
    import yaml

    from rmoe_platform.config.stage import StageConfig

    text = (repo_root / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    config = StageConfig.from_dict(yaml.safe_load(block))
    assert config.trainable == ("residual", "router") and config.scaling.expert_parallel_size == 2
