"""What a stage trains, per task: how its model is built, what loss a batch gives, how it is evaluated
and what a training image costs. Classification is timm-only; segmentation and detection use OpenMMLab
(the `mm` extra) and are imported only when a stage asks for them. A task is built with its dataset's
facts (`DataFacts`: pixel statistics, class names)."""

from __future__ import annotations

import importlib

from rmoe_platform.names import TASKS
from rmoe_platform.tasks.base import DataFacts, StageTask, StepOutput

# task name -> "module:class", imported on first use (the dense-prediction tasks pull in OpenMMLab)
TASK_CLASSES = {
    "classification": "rmoe_platform.tasks.classification:ClassificationTask",
    "segmentation": "rmoe_platform.tasks.segmentation:SegmentationTask",
    "detection": "rmoe_platform.tasks.detection:DetectionTask",
}
assert set(TASK_CLASSES) == set(TASKS), "every task name has a task class"


def task_type(name: str) -> type[StageTask]:
    """The task class of a stage's `task` field; ImportError when its extra is not installed."""
    if name not in TASK_CLASSES:
        raise ValueError(f"task: unknown task {name!r} (use {', '.join(TASKS)})")
    module_name, _, class_name = TASK_CLASSES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"task {name!r} needs the OpenMMLab stack (mmcv with ops, mmseg, mmdet): install the 'mm' extra "
            f"as the README says (make installs it) ({err})"
        ) from err
    return getattr(module, class_name)


def task_for(name: str, facts: DataFacts) -> StageTask:
    """The task object of a stage's `task` field, for a dataset with these facts."""
    return task_type(name)(facts)


__all__ = ["TASK_CLASSES", "DataFacts", "StageTask", "StepOutput", "task_for", "task_type"]
