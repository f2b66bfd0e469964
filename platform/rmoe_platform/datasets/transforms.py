"""Per-example decode-side transforms (numpy + PIL, no Ray, no torch): classification crops and flips,
and joint image+target transforms for segmentation and detection, so targets always follow the pixels.

Images are uint8 HxWx3; masks uint8 HxW; boxes float32 [n, 4] xyxy in pixels; instance masks
uint8 [n, H, W]. `normalize` turns an image into float32 CxHxW with the dataset's mean/std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rmoe_platform.config.fields import check
from rmoe_platform.datasets.format import IGNORE_INDEX


@dataclass(frozen=True)
class AugmentSpec:
    """Train-time augmentation. `crop_scale`/`crop_ratio`: classification random-resized-crop area and
    aspect ranges; `resize_range`: segmentation/detection multi-scale factor; `hflip`: p=0.5 flips."""

    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    resize_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "resize_range"):
            low, high = getattr(self, name)
            check(0 < low <= high, f"{name} must be 0 < low <= high, got {(low, high)}")
        check(self.crop_scale[1] <= 1.0, f"crop_scale must be <= 1, got {self.crop_scale}")


def resize(array: np.ndarray, height: int, width: int, *, nearest: bool = False) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize((width, height), resample))


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 → float32 3xHxW, (x/255 − mean)/std."""
    return ((image.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)


# ---- classification -------------------------------------------------------------------------------
def random_resized_crop(image: np.ndarray, size: int, aug: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """Inception-style crop (area in `crop_scale`, aspect in `crop_ratio`), resized to size x size."""
    h, w = image.shape[:2]
    area = h * w
    log_ratio = np.log(aug.crop_ratio)
    for _ in range(10):
        target = area * rng.uniform(*aug.crop_scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return resize(image[top : top + ch, left : left + cw], size, size)
    return center_crop(image, size)  # fallback, as torchvision does


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size`, then take the central size x size."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = resize(image, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top : top + size, left : left + size]


def classification_train(image: np.ndarray, size: int, aug: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    out = random_resized_crop(image, size, aug, rng)
    if aug.hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


# ---- segmentation ---------------------------------------------------------------------------------
def segmentation_train(
    image: np.ndarray, mask: np.ndarray, size: int, aug: AugmentSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-scale resize (shorter side = size·s), random size x size crop (padding: 0 / ignore), flip."""
    h, w = image.shape[:2]
    scale = size * rng.uniform(*aug.resize_range) / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image, mask = resize(image, nh, nw), resize(mask, nh, nw, nearest=True)
    ph, pw = max(size, nh), max(size, nw)
    canvas = np.zeros((ph, pw, 3), dtype=np.uint8)
    labels = np.full((ph, pw), IGNORE_INDEX, dtype=np.uint8)
    canvas[:nh, :nw], labels[:nh, :nw] = image, mask
    top, left = int(rng.integers(0, ph - size + 1)), int(rng.integers(0, pw - size + 1))
    image, mask = canvas[top : top + size, left : left + size], labels[top : top + size, left : left + size]
    if aug.hflip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def segmentation_eval(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    return resize(image, size, size), resize(mask, size, size, nearest=True)


# ---- detection ------------------------------------------------------------------------------------
def detection_content_shape(height: int, width: int, size: int, scale: float = 1.0) -> tuple[int, int]:
    """(h, w) of an image after `detection_resize`'s keep-ratio resize, before padding."""
    factor = size * min(scale, 1.0) / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def detection_resize(
    image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, size: int, scale: float = 1.0, flip: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep-ratio resize (longer side = size·scale, scale <= 1), optional flip, pad to size x size
    (content top-left: `detection_content_shape` gives its extent)."""
    h, w = image.shape[:2]
    nh, nw = detection_content_shape(h, w, size, scale)
    image = resize(image, nh, nw)
    masks = np.stack([resize(m, nh, nw, nearest=True) for m in masks]) if len(masks) else masks.reshape(0, nh, nw)
    boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
    if flip:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
        boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], axis=1)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[:nh, :nw] = image
    padded = np.zeros((len(masks), size, size), dtype=np.uint8)
    padded[:, :nh, :nw] = masks
    return canvas, boxes.astype(np.float32).reshape(-1, 4), padded


def detection_train(
    image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, size: int, aug: AugmentSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Random keep-ratio scale (within `resize_range`, at most 1) and flip; returns the content shape too."""
    scale = rng.uniform(min(aug.resize_range[0], 1.0), min(aug.resize_range[1], 1.0))
    image_out, boxes, masks = detection_resize(image, boxes, masks, size, scale, flip=aug.hflip and rng.random() < 0.5)
    return image_out, boxes, masks, detection_content_shape(*image.shape[:2], size, scale)


def clip_boxes(boxes: np.ndarray, height: int, width: int, min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to the image, and which to keep: a box left with less than `min_size` px of width or
    height inside the image (wholly outside, or degenerate) is dropped with its label and mask."""
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    return clipped, keep
