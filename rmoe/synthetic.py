"""Procedural image-classification data, so demos and tests need no downloads.

Each class is an oriented sinusoidal grating of its own angle, frequency and colour, seen through a
random phase, contrast and pixel noise: learnable by a small ViT in a few hundred steps, yet not
separable by mean colour alone (colours repeat across classes).
"""

from __future__ import annotations

import math

import torch

_PALETTE = torch.tensor([[1.0, 0.3, 0.2], [0.2, 0.8, 0.3], [0.3, 0.4, 1.0], [0.9, 0.8, 0.2]])


def make_gratings(
    num_images: int,
    num_classes: int = 10,
    img_size: int = 32,
    *,
    noise: float = 0.35,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, S, S] in about [-1.5, 1.5] and labels [N] (int64), deterministic in `seed`."""
    if num_images < 1 or num_classes < 2 or img_size < 4:
        raise ValueError(
            f"make_gratings: need num_images >= 1, num_classes >= 2, img_size >= 4 "
            f"(got {num_images}, {num_classes}, {img_size})"
        )
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_images,), generator=g)
    angle = labels.float() * math.pi / num_classes
    freq = 1.5 + (labels % 3).float()
    phase = torch.rand(num_images, generator=g) * 2 * math.pi
    contrast = 0.6 + 0.4 * torch.rand(num_images, generator=g)
    coords = torch.linspace(0, 1, img_size)
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    wave = torch.cos(
        2 * math.pi * freq[:, None, None] * (u * angle.cos()[:, None, None] + v * angle.sin()[:, None, None])
        + phase[:, None, None]
    )
    colour = _PALETTE[labels % len(_PALETTE)]
    images = contrast[:, None, None, None] * wave[:, None] * colour[:, :, None, None]
    images = images + noise * torch.randn(images.shape, generator=g)
    return images, labels
