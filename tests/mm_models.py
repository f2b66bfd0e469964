"""The CPU-sized mm models the tests build: the repo's plain mm config files (`configs/mm/`) shrunk to a Swin
nano backbone. Its own module, so Ray workers can be sent it by value."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config

from rmoe_platform.mm.build import build_registered

ROOT = Path(__file__).resolve().parents[1]
NANO = "rmoe_swin_nano_patch4_window4_64"
NANO_CHANNELS = [48, 96, 192, 384]


def nano_model(task: str, residual: bool = True, stock: bool = False) -> torch.nn.Module:
    """The model of the repo's plain mm config file, shrunk to the CPU-sized Swin (same file, same types)."""
    name = "upernet_rmoe-swin-t_ade20k.py" if task == "segmentation" else "mask-rcnn_rmoe-swin-t_fpn_coco.py"
    cfg = Config.fromfile(str(ROOT / "configs" / "mm" / name))
    model = copy.deepcopy(cfg.model)
    model.backbone.update(arch=NANO, model_kwargs={"img_size": 64})
    model.backbone.moe = {"num_experts": 2, "top_k": 1, "residual": residual, "init_noise": 0.01}
    if task == "segmentation":
        model.data_preprocessor.size = (64, 64)
        model.decode_head.update(in_channels=NANO_CHANNELS, channels=32, num_classes=5)
        model.auxiliary_head.update(in_channels=NANO_CHANNELS[2], channels=16, num_classes=5)
        for head in (model.decode_head, model.auxiliary_head):
            head.norm_cfg = {"type": "BN", "requires_grad": True}  # SyncBN needs GPUs
        if stock:
            model.type = "EncoderDecoder"
    else:
        model.neck.update(in_channels=NANO_CHANNELS, out_channels=32)
        model.rpn_head.update(in_channels=32, feat_channels=32)
        model.rpn_head.anchor_generator.scales = [2]
        for extractor in ("bbox_roi_extractor", "mask_roi_extractor"):
            model.roi_head[extractor].out_channels = 32
        model.roi_head.bbox_head.update(in_channels=32, fc_out_channels=64, num_classes=4)
        model.roi_head.mask_head.update(in_channels=32, conv_out_channels=32, num_classes=4)
        if stock:
            model.type = "MaskRCNN"
    return build_registered(task, model.to_dict())


def training_batch(task: str, count: int, seed: int = 7) -> dict[str, Any]:
    """`count` images with targets, as the mm data preprocessor takes them (deterministic)."""
    import numpy as np
    import torch
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData, PixelData
    from mmseg.structures import SegDataSample

    gen = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8, generator=gen) for _ in range(count)]
    samples: list[Any] = []
    for i in range(count):
        meta = {"img_shape": (64, 64), "ori_shape": (64, 64), "pad_shape": (64, 64), "scale_factor": (1.0, 1.0)}
        if task == "segmentation":
            sample = SegDataSample(metainfo=meta)
            sample.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 64, 64), generator=gen))
        else:
            sample = DetDataSample(metainfo=meta)
            masks = np.zeros((2, 64, 64), np.uint8)
            top = 4 + 6 * i
            masks[0, top : top + 20, 6:30], masks[1, 30:60, 20 + i : 50 + i] = 1, 1
            sample.gt_instances = InstanceData(
                bboxes=torch.tensor([[6.0, top, 30, top + 20], [20 + i, 30, 50 + i, 60]]),
                labels=torch.tensor([1, i % 4]),
                masks=BitmapMasks(masks, 64, 64),
            )
        samples.append(sample)
    return {"inputs": images, "data_samples": samples}
