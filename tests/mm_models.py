"""The CPU-sized mm models the tests build: the repo's plain mm config files (`configs/mm/`) shrunk to a Swin
nano backbone. Its own module, so Ray workers can be sent it by value."""

from __future__ import annotations

import copy
from pathlib import Path

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
