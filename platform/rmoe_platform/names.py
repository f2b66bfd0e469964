"""The platform's vocabulary, in one torch-free module: what the configs accept, the results rows say
and the dashboard shows (it imports these names too, so they cannot drift apart).
"""

from __future__ import annotations

# What a stage trains: classification (a timm model), segmentation (UperNet), detection (Mask R-CNN).
TASKS = ("classification", "segmentation", "detection")

# Each task's validation metric: reported as `val_metric`, higher is better; a pipeline's metric is
# that of its downstream task.
METRIC_NAMES = {"classification": "accuracy", "segmentation": "mIoU", "detection": "bbox_mAP"}

# The paper's pipelines, in the order tables and charts list them: the dense lower bound, the MoE upper
# bound trained from scratch, RMoE with an intermediate residual stage (I) or straight downstream (D),
# and Sparse-Upcycling-style copies (see `rmoe_platform.pipelines.graph`).
PIPELINES = ("dense", "moe", "rmoe_i", "rmoe_d", "upcycle")

__all__ = ["METRIC_NAMES", "PIPELINES", "TASKS"]
