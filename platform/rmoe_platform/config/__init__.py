"""Typed configuration: frozen dataclasses validated on construction, built from YAML with errors that
name the field's path (`stage.optim.lr`, `experiment.moe.num_experts`).

- `fields`: the machinery (`from_dict`, `check`, `ConfigError`, YAML loading, `--set key=value` overrides);
- `stage`: one training stage (`StageConfig` and its parts);
- `experiment`: the paper's pipelines side by side (`ExperimentConfig`).

Only the torch-free machinery is imported here, so the dashboard can use `ConfigError` without torch.
"""

from rmoe_platform.config.fields import ConfigError, apply_override, check, from_dict, load_yaml, set_path

__all__ = ["ConfigError", "apply_override", "check", "from_dict", "load_yaml", "set_path"]
