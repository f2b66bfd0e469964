"""Every stage's model checked from the config alone, before the first stage trains.

A stage's model depends on its parent's (an RMoE stage upcycles the dense core it is given), and the
parent does not exist until it has trained. So each stage is built from its parent's *spec*: the
stages are walked parents first, each model is built on the meta device (no memory, no weights, fast for
Swin-L), and its spec is handed to the children as a spec-only checkpoint. A bad layer selection, a
residual rank wider than the MLPs, experts that do not divide over the expert-parallel group, or a head
that does not fit the task fail here, naming the stage, instead of after the dense stages have trained.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from rmoe.checkpoint import save_state_dict
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.datasets.checks import DatasetCheck
from rmoe_platform.pipelines.graph import StageNode
from rmoe_platform.stage.prepare import check_stage
from rmoe_platform.stage.worker.checkpoints import MODEL_FILE


def check_stage_models(plans: Mapping[str, list[StageNode]], datasets: Mapping[str, DatasetCheck]) -> None:
    """Build every planned stage's model as its run will (weights aside); `datasets` maps a dataset uri
    (as the stage configs hold it) to its check. Raises a ConfigError naming the stage and the field."""
    nodes: dict[str, StageNode] = {}
    for stages in plans.values():  # each pipeline's stages come parents first
        for node in stages:
            nodes.setdefault(node.key, node)
    with tempfile.TemporaryDirectory(prefix="rmoe-specs-") as tmp:
        specs: dict[str, Path] = {}
        for node in nodes.values():
            specs[node.key] = _check_node(node, datasets, specs, Path(tmp))


# a stage field's message as the experiment field that sets it
_EXPERIMENT_FIELDS = {
    "stage.model: moe_layers: ": "experiment.moe.layers: ",
    "stage.model: residual_rank ": "experiment.moe.residual_rank ",
    "stage.model: top_k ": "experiment.moe.top_k ",
}


def _experiment_field(message: str) -> str:
    for stage_field, experiment_field in _EXPERIMENT_FIELDS.items():
        if message.startswith(stage_field):
            return experiment_field + message.removeprefix(stage_field)
    return f"experiment: {message}"


def _check_node(node: StageNode, datasets: Mapping[str, DatasetCheck], specs: Mapping[str, Path], tmp: Path) -> Path:
    """Check one stage; returns the directory of its spec-only checkpoint (for its children)."""
    directory = tmp / node.key.replace("/", "-")
    if node.imported is not None:
        save_state_dict({}, directory / MODEL_FILE, spec=node.imported.spec)
        return directory
    config = node.config
    checked = datasets.get(config.data.uri)
    if checked is None:
        raise ConfigError(f"experiment: stage {node.key} reads {config.data.uri!r}, which was not checked")
    parent = specs[node.parent.key] if node.parent is not None else None
    try:
        with torch.device("meta"):
            spec = check_stage(config, checked, parent=parent).spec
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"{_experiment_field(str(err))} (stage {node.key})") from None
    save_state_dict({}, directory / MODEL_FILE, spec=spec)
    return directory
