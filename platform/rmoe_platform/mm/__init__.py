"""The OpenMMLab layer (the `mm` extra: mmengine, mmcv with ops, mmseg, mmdet): RMoE backbones in their
registries, UperNet / Mask R-CNN models on them, data samples from Ray Data batches, and evaluation.

Importing `rmoe_platform.mm` registers `RMoEViT`, `RMoESwinTransformer`, `RMoEEncoderDecoder` and
`RMoEMaskRCNN`; an mm config file can do it with `custom_imports = dict(imports=["rmoe_platform.mm"])`.
"""

from __future__ import annotations

from rmoe_platform.mm.backbones import RMoEBackbone, RMoESwinTransformer, RMoEViT
from rmoe_platform.mm.models import AUX_LOSS_KEY, RMoEEncoderDecoder, RMoEMaskRCNN


def load_dense_model(path: str) -> object:
    """A trained segmentation/detection model from its stage checkpoint (see `mm.build.load_dense_model`)."""
    from rmoe_platform.mm.build import load_dense_model as load

    return load(path)


__all__ = [
    "AUX_LOSS_KEY",
    "RMoEBackbone",
    "RMoEEncoderDecoder",
    "RMoEMaskRCNN",
    "RMoESwinTransformer",
    "RMoEViT",
    "load_dense_model",
]
