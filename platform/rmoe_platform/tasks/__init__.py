"""What a stage trains, per task: how its model is built, what loss a batch gives, how it is evaluated
and what a training image costs. Classification is timm-only; segmentation and detection use OpenMMLab
(the `mm` extra) and are imported only when a stage asks for them."""

from __future__ import annotations

from rmoe_platform.tasks.base import StageTask, StepOutput


def task_for(name: str) -> StageTask:
    """The task object of a stage's `task` field."""
    if name == "classification":
        from rmoe_platform.tasks.classification import ClassificationTask

        return ClassificationTask()
    if name in ("segmentation", "detection"):
        try:
            from rmoe_platform.tasks.dense import DenseTask
        except ImportError as err:
            raise ImportError(
                f"task {name!r} needs the OpenMMLab stack (mmcv with ops, mmseg, mmdet): install the 'mm' extra "
                f"as the README says (make installs it) ({err})"
            ) from err
        return DenseTask(name)
    raise ValueError(f"task: unknown task {name!r}")


__all__ = ["StageTask", "StepOutput", "task_for"]
