"""Image, mask and instance-mask codecs of the shard format (no Ray, no torch).

Images are stored as their encoded bytes (PNG or JPEG, never re-encoded by converters); masks as PNG of
class ids; instance masks as COCO RLE (compressed `counts` strings, column-major) or COCO polygons.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


class DecodeError(ValueError):
    """An image, mask or instance mask that cannot be decoded."""


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxWx3 (RGB) or HxW (class ids / grey) → PNG bytes (lossless)."""
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes → uint8 HxWx3 RGB; DecodeError if they are not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as err:  # PIL raises many types for corrupt data
        raise DecodeError(f"cannot decode image ({len(data)} bytes): {err}") from None


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes of class ids → uint8 HxW (palette PNGs keep their indices)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise DecodeError(f"mask must be single-channel, got mode {image.mode}")
            array = np.asarray(image)
    except DecodeError:
        raise
    except Exception as err:
        raise DecodeError(f"cannot decode mask ({len(data)} bytes): {err}") from None
    if array.max(initial=0) > 255:
        raise DecodeError(f"mask class ids must be < 256, found {array.max()}")
    return array.astype(np.uint8)


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.height, image.width
    except Exception as err:
        raise DecodeError(f"cannot read image header: {err}") from None


# ---- COCO RLE ---------------------------------------------------------------------------------------
def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Binary HxW mask → COCO compressed RLE {"size": [h, w], "counts": str} (as pycocotools writes it)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]  # counts start with a run of zeros
    return {"size": [h, w], "counts": _counts_to_string(runs)}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) → uint8 HxW mask."""
    h, w = rle["size"]
    counts = rle["counts"]
    runs = _string_to_counts(counts) if isinstance(counts, str | bytes) else list(counts)
    if sum(runs) != h * w:
        raise DecodeError(f"RLE counts sum to {sum(runs)}, expected {h}x{w}={h * w}")
    values = np.zeros(len(runs), dtype=np.uint8)
    values[1::2] = 1
    return np.repeat(values, runs).reshape((h, w), order="F")


def _counts_to_string(runs: list[int]) -> str:
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run  # delta-code runs after the first pair
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _string_to_counts(text: str | bytes) -> list[int]:
    if isinstance(text, bytes):
        text = text.decode("ascii")
    runs: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def polygons_decode(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons [[x0, y0, x1, y1, …], …] → uint8 HxW mask (PIL rasterisation)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) >= 6:
            draw.polygon([(polygon[i], polygon[i + 1]) for i in range(0, len(polygon) - 1, 2)], fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def instance_mask_decode(encoded: str, height: int, width: int) -> np.ndarray:
    """One `masks` entry (JSON of a COCO RLE dict or a polygon list) → uint8 HxW."""
    try:
        value = json.loads(encoded)
        if isinstance(value, dict):
            mask = rle_decode(value)
            if mask.shape != (height, width):
                raise DecodeError(f"RLE size {list(mask.shape)} differs from the image {[height, width]}")
            return mask
        return polygons_decode(value, height, width)
    except DecodeError:
        raise
    except Exception as err:
        raise DecodeError(f"cannot decode instance mask: {err}") from None
