"""Stage datasets as Ray Data datasets (generated in memory until the Parquet/S3 ingest lands)."""

from __future__ import annotations

import ray.data
import torch

from rmoe.synthetic import make_gratings
from rmoe_platform.config import DataSpec


def _rows(images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    return [{"image": img.numpy(), "label": int(label)} for img, label in zip(images, labels, strict=True)]


def build_datasets(spec: DataSpec) -> dict[str, ray.data.Dataset]:
    """Train and validation splits from different seeds of the same generator."""
    common = dict(num_classes=spec.num_classes, img_size=spec.img_size, noise=spec.noise)
    train = make_gratings(spec.num_train, seed=spec.seed, **common)
    val = make_gratings(spec.num_val, seed=spec.seed + 1_000_003, **common)
    return {"train": ray.data.from_items(_rows(*train)), "val": ray.data.from_items(_rows(*val))}


def to_tensors(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"].to(device, torch.float32), batch["label"].to(device, torch.long)
