"""mmseg/mmdet models that add the backbone's MoE auxiliary loss to the task loss.

`RMoEEncoderDecoder` (mmseg) and `RMoEMaskRCNN` (mmdet) are the stock `EncoderDecoder` and `MaskRCNN`
whose `loss()` also returns `loss_moe_aux`: the load-balance losses of this forward's MoE layers
(mmengine sums every `loss*` entry into the total). With a dense backbone it is zero.

Under mixed precision Mask R-CNN keeps its heads in fp32 (`FP32HeadsMixin`): the backbone and the FPN run
in the stage's precision, and what follows them (anchors, box regression and assignment, NMS, RoIAlign)
does not, because anchors and boxes in bf16 are quantised to 8 px at a 1333 px image side, and mmcv's NMS
and RoIAlign kernels take fp32 only. UperNet's heads are plain convolutions and run in bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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

    @property
    def rmoe_head_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of everything but the backbone: the `head` trainable group."""
        return tuple(f"{name}." for name, _ in self.named_children() if name != "backbone")  # type: ignore[attr-defined]

    def loss(self, inputs: torch.Tensor, data_samples: Any) -> dict[str, Any]:
        for _, layer in moe_layers(self):  # type: ignore[arg-type]
            layer.pop_aux()  # drop anything a previous forward left behind
        losses = super().loss(inputs, data_samples)  # type: ignore[misc]
        aux = collect_moe_aux(self)  # type: ignore[arg-type]
        self.last_moe_aux = aux
        losses[AUX_LOSS_KEY] = aux.loss
        return losses


class FP32HeadsMixin:
    """`loss` and `predict` with autocast off, except inside `extract_feat` (backbone and neck), which runs
    in the caller's autocast and hands fp32 features to the heads."""

    _feature_autocast: tuple[str, torch.dtype] | None = None

    @contextlib.contextmanager
    def _heads_in_fp32(self, inputs: torch.Tensor) -> Iterator[None]:
        device_type = inputs.device.type
        if not torch.is_autocast_enabled(device_type):
            yield
            return
        self._feature_autocast = (device_type, torch.get_autocast_dtype(device_type))
        try:
            with torch.autocast(device_type=device_type, enabled=False):
                yield
        finally:
            self._feature_autocast = None

    def loss(self, inputs: torch.Tensor, data_samples: Any) -> dict[str, Any]:
        with self._heads_in_fp32(inputs):
            return super().loss(inputs, data_samples)  # type: ignore[misc]

    def predict(self, inputs: torch.Tensor, data_samples: Any, rescale: bool = True) -> Any:
        with self._heads_in_fp32(inputs):
            return super().predict(inputs, data_samples, rescale=rescale)  # type: ignore[misc]

    def extract_feat(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._feature_autocast is None:
            return super().extract_feat(inputs)  # type: ignore[misc]
        device_type, dtype = self._feature_autocast
        with torch.autocast(device_type=device_type, dtype=dtype):
            features = super().extract_feat(inputs)  # type: ignore[misc]
        return tuple(f.float() for f in features)


class RMoEEncoderDecoder(MoEAuxLossMixin, EncoderDecoder):
    """mmseg's EncoderDecoder (e.g. UperNet) with the MoE aux loss."""


class RMoEMaskRCNN(MoEAuxLossMixin, FP32HeadsMixin, MaskRCNN):
    """mmdet's Mask R-CNN with the MoE aux loss, its heads in fp32 under mixed precision."""


MMSEG_MODELS.register_module(module=RMoEEncoderDecoder, force=True)
MMDET_MODELS.register_module(module=RMoEMaskRCNN, force=True)
