"""mmseg/mmdet models that add the backbone's MoE auxiliary loss to the task loss.

`RMoEEncoderDecoder` (mmseg) and `RMoEMaskRCNN` (mmdet) are the stock `EncoderDecoder` and `MaskRCNN`
whose `loss()` also returns `loss_moe_aux`: the load-balance losses of this forward's MoE layers
(mmengine sums every `loss*` entry into the total). With a dense backbone it is zero.
"""

from __future__ import annotations

from typing import Any

import torch
from mmdet.models.detectors import MaskRCNN
from mmdet.registry import MODELS as MMDET_MODELS
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS as MMSEG_MODELS

from rmoe import collect_moe_aux
from rmoe.upcycle import moe_layers

AUX_LOSS_KEY = "loss_moe_aux"


class MoEAuxLossMixin:
    """Adds `loss_moe_aux` to `loss()`; `last_moe_aux` keeps this forward's summary for telemetry."""

    backbone: torch.nn.Module
    last_moe_aux: Any = None

    def loss(self, inputs: torch.Tensor, data_samples: Any) -> dict[str, Any]:
        for _, layer in moe_layers(self):  # type: ignore[arg-type]
            layer.pop_aux()  # drop anything a previous forward left behind
        losses = super().loss(inputs, data_samples)  # type: ignore[misc]
        aux = collect_moe_aux(self)  # type: ignore[arg-type]
        self.last_moe_aux = aux
        losses[AUX_LOSS_KEY] = aux.loss
        return losses


class RMoEEncoderDecoder(MoEAuxLossMixin, EncoderDecoder):
    """mmseg's EncoderDecoder (e.g. UperNet) with the MoE aux loss."""


class RMoEMaskRCNN(MoEAuxLossMixin, MaskRCNN):
    """mmdet's Mask R-CNN with the MoE aux loss."""


MMSEG_MODELS.register_module(module=RMoEEncoderDecoder, force=True)
MMDET_MODELS.register_module(module=RMoEMaskRCNN, force=True)
