"""Procedural datasets for all three tasks: textured scenes of shapes with exact masks and boxes.

Every example is a pure function of (recipe, split, index), so generation is deterministic, resumable
shard by shard, and parallelisable. Classification scenes hold one labelled shape (plus small
distractor blobs); segmentation and detection scenes hold several, possibly overlapping: the visible
part of each object gives its mask, its class-id pixels and its box.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from rmoe_platform.config.fields import check
from rmoe_platform.datasets.codec import encode_png, rle_encode
from rmoe_platform.datasets.writer import DatasetPlan

Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (u, v) in object coords → inside


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (v < 0.7) & (v > -0.9 + 1.8 * np.abs(u))


SHAPES: dict[str, Shape] = {
    "circle": lambda u, v: u**2 + v**2 <= 0.9,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.75,
    "triangle": _triangle,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "ring": lambda u, v: (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.35),
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)),
    "star": lambda u, v: np.hypot(u, v) <= 0.55 + 0.4 * np.cos(5 * np.arctan2(v, u)),
    "hexagon": lambda u, v: np.maximum(np.abs(u) * 0.866 + np.abs(v) * 0.5, np.abs(v)) <= 0.85,
    "bar": lambda u, v: (np.abs(u) <= 1.0) & (np.abs(v) <= 0.3),
    "crescent": lambda u, v: (u**2 + v**2 <= 1.0) & ((u - 0.45) ** 2 + v**2 >= 0.6),
    "semicircle": lambda u, v: (u**2 + v**2 <= 1.0) & (v >= 0.0),
    "frame": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.85) & (np.maximum(np.abs(u), np.abs(v)) >= 0.5),
}
SHAPE_NAMES = tuple(SHAPES)
SPLIT_SALT = {"train": 0, "val": 1}
CONTEXT_SALT = 99  # seeds the per-context label permutations, apart from every example's own stream
MAX_CONTEXTS = 8  # background brightness levels that stay apart under the generator's colour jitter
# Fields added after datasets were first written, with the value that reproduces the data written before
# them: a recipe at that value is recorded without the field, so existing datasets' recorded recipes still
# match and the stage hashes (rmoe_platform.pipelines.graph) stay put.
NEUTRAL_RECIPE_FIELDS: dict[str, Any] = {"contexts": 1}


@dataclass(frozen=True)
class SceneRecipe:
    """A procedural dataset. `class_offset` picks which shapes are the classes (another label set for
    a downstream task); `distractors`: up to that many small blobs beside a classification scene's
    shape; `noise` is the pixel noise std (0..1 scale); sizes range from tiny test sets to tens of
    thousands of images.

    `contexts` > 1 (classification) makes the label depend on the scene's context as well as on its
    shape: each scene gets one of `contexts` background brightness levels, and each level relabels the
    shapes by its own fixed permutation (level 0 keeps them). Every token sees the context, so a router
    can send each context to its own experts, while a dense MLP must hold every (context, shape)
    pairing at once: a task whose difficulty is MLP capacity, not only optimisation (issue 20)."""

    task: Literal["classification", "segmentation", "detection"] = "classification"
    num_train: int = 2048
    num_val: int = 512
    img_size: int = 32
    num_classes: int = 10
    class_offset: int = 0
    max_objects: int = 4
    distractors: int = 2
    noise: float = 0.08
    contexts: int = 1
    seed: int = 0
    shard_rows: int = 512

    def __post_init__(self) -> None:
        check(self.task in ("classification", "segmentation", "detection"), f"task: unknown task {self.task!r}")
        check(self.num_train >= 1 and self.num_val >= 1, "num_train and num_val must be >= 1")
        check(16 <= self.img_size <= 1024, f"img_size must be in [16, 1024], got {self.img_size}")
        check(
            self.num_classes >= 2 and self.class_offset >= 0 and self.class_offset + self.num_classes <= len(SHAPES),
            f"class_offset + num_classes must be <= {len(SHAPES)} shapes and num_classes >= 2",
        )
        check(self.max_objects >= 1, f"max_objects must be >= 1, got {self.max_objects}")
        check(self.distractors >= 0, f"distractors must be >= 0, got {self.distractors}")
        check(0 <= self.noise <= 1, f"noise must be in [0, 1], got {self.noise}")
        check(1 <= self.contexts <= MAX_CONTEXTS, f"contexts must be in [1, {MAX_CONTEXTS}], got {self.contexts}")
        check(
            self.contexts == 1 or self.task == "classification",
            f"contexts: only classification scenes have contexts, got task {self.task!r}",
        )
        check(self.shard_rows >= 1, f"shard_rows must be >= 1, got {self.shard_rows}")

    @property
    def shapes(self) -> tuple[str, ...]:
        return SHAPE_NAMES[self.class_offset : self.class_offset + self.num_classes]

    @property
    def classes(self) -> tuple[str, ...]:
        """Detection/classification: the shapes; segmentation: 'background' (id 0) then the shapes."""
        return ("background", *self.shapes) if self.task == "segmentation" else self.shapes

    @cached_property
    def context_labels(self) -> np.ndarray:
        """[contexts, num_classes]: the label of shape `k` (of this recipe's classes) in context `c`."""
        table = [np.arange(self.num_classes)]
        for context in range(1, self.contexts):
            table.append(np.random.default_rng([self.seed, CONTEXT_SALT, context]).permutation(self.num_classes))
        return np.stack(table)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as recorded in a dataset's card (later fields at their neutral value left out)."""
        return {k: v for k, v in asdict(self).items() if NEUTRAL_RECIPE_FIELDS.get(k, object()) != v}

    def plan(self, name: str) -> DatasetPlan:
        return DatasetPlan(
            name=name,
            task=self.task,
            classes=self.classes,
            split_rows={"train": self.num_train, "val": self.num_val},
            source={"kind": "generate", "recipe": self.to_dict()},
            shard_rows=self.shard_rows,
        )

    def rows(self, split: str, start: int, stop: int) -> Iterator[dict[str, Any]]:
        for index in range(start, stop):
            yield make_example(self, split, index)


def make_example(recipe: SceneRecipe, split: str, index: int) -> dict[str, Any]:
    """One example as a shard row (plus `_pixels`, the image, and `_targets`, the decoded targets)."""
    rng = np.random.default_rng([recipe.seed, SPLIT_SALT.get(split, 2), index])
    size = recipe.img_size
    image = _background(rng, size)
    if recipe.task == "classification":
        shape = int(rng.integers(recipe.num_classes))
        label = shape
        if recipe.contexts > 1:
            context = int(rng.integers(recipe.contexts))
            image = _context_background(image, context, recipe.contexts, rng)
            label = int(recipe.context_labels[context, shape])
        for _ in range(int(rng.integers(0, recipe.distractors + 1))):  # small distractor blobs
            _paint(image, _object_mask(rng, "circle", size, scale=(0.06, 0.12)), rng)
        shape_index = recipe.class_offset + shape
        mask = _object_mask(rng, recipe.shapes[shape], size, scale=(0.22, 0.42))
        _paint(image, mask, rng, hue=shape_index / len(SHAPES))  # a hue band per shape: learnable in minutes
        row: dict[str, Any] = {"label": label, "_targets": {"label": label}}
    else:
        row = _multi_object(recipe, rng, image)
    noisy = image + rng.normal(0.0, recipe.noise, image.shape)
    pixels = np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8)
    return {**row, "image": encode_png(pixels), "id": index, "_pixels": pixels}


def _multi_object(recipe: SceneRecipe, rng: np.random.Generator, image: np.ndarray) -> dict[str, Any]:
    size = recipe.img_size
    count = int(rng.integers(1, recipe.max_objects + 1))
    owner = np.full((size, size), -1, dtype=np.int64)  # which object each pixel shows (later = on top)
    labels = []
    for k in range(count):
        label = int(rng.integers(recipe.num_classes))
        mask = _object_mask(rng, recipe.shapes[label], size, scale=(0.12, 0.3))
        _paint(image, mask, rng)
        owner[mask] = k
        labels.append(label)
    if recipe.task == "segmentation":
        classes = np.zeros((size, size), dtype=np.uint8)
        for k, label in enumerate(labels):
            classes[owner == k] = label + 1  # 0 = background
        return {"mask": encode_png(classes), "_targets": {"mask": classes}}
    boxes, kept, masks, encoded = [], [], [], []
    for k, label in enumerate(labels):
        visible = owner == k
        if visible.sum() < 4:  # hidden behind later objects: not an instance any more
            continue
        ys, xs = np.nonzero(visible)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
        kept.append(label)
        masks.append(visible.astype(np.uint8))
        encoded.append(json.dumps(rle_encode(visible)))
    targets = {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(kept, dtype=np.int64),
        "masks": np.asarray(masks, dtype=np.uint8).reshape(-1, size, size),
    }
    return {"boxes": boxes, "labels": kept, "masks": encoded, "width": size, "height": size, "_targets": targets}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour gradient plus faint stripes: texture that is not the signal."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0.2, 0.8, 3)
    slope = rng.uniform(-0.25, 0.25, (2, 3))
    angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 6)
    stripes = 0.06 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)))
    return base + x[..., None] * slope[0] + y[..., None] * slope[1] + stripes[..., None]


def _context_background(image: np.ndarray, context: int, contexts: int, rng: np.random.Generator) -> np.ndarray:
    """The background moved to context `context`'s brightness level (its texture kept): levels split
    [0.1, 0.9] into `contexts` bands, each channel's mean drawn inside the band."""
    width = 0.8 / contexts
    low = 0.1 + width * context
    return image - image.mean((0, 1)) + rng.uniform(low, low + width, 3)


def _object_mask(rng: np.random.Generator, shape: str, size: int, scale: tuple[float, float]) -> np.ndarray:
    radius = rng.uniform(*scale) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    theta = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return SHAPES[shape](u, v)


def _paint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, hue: float | None = None) -> None:
    """Fill `mask` with a colour far from the local background (or of the given hue, jittered), with a
    checker texture."""
    background = image[mask].mean(0) if mask.any() else np.full(3, 0.5)
    colour = np.where(background > 0.5, rng.uniform(0.0, 0.3, 3), rng.uniform(0.7, 1.0, 3))
    if hue is not None:
        h = (hue + rng.uniform(-0.02, 0.02)) % 1.0
        colour = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0)))
    y, x = np.nonzero(mask)
    period = int(rng.integers(2, 5))
    checker = (((y // period) + (x // period)) % 2)[:, None] * rng.uniform(0.03, 0.1)
    image[y, x] = colour + checker
