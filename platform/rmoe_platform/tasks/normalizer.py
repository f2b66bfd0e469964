"""Image batches as they leave Ray Data (uint8 NCHW) → float32 normalised on the training device: the
images cross the object store at a quarter of the float size, and the arithmetic runs where the model is."""

from __future__ import annotations

import torch


class Normalizer:
    """uint8 NCHW batches → float32 normalised with the dataset's mean/std, on the training device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.scale.device, torch.float32, non_blocking=True) * self.scale - self.shift
