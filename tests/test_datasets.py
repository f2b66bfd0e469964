"""The shard format end to end: generate / convert → (S3) → Ray Data → decoded rows and batches."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from rmoe_platform.config.fields import ConfigError
from rmoe_platform.datasets import AugmentSpec, SceneRecipe, read_card, write_dataset
from rmoe_platform.datasets import transforms as T
from rmoe_platform.datasets.codec import decode_image, encode_png, instance_mask_decode, rle_decode, rle_encode
from rmoe_platform.datasets.convert import ade20k, coco, imagenet
from rmoe_platform.datasets.ingest import (
    DecodeSpec,
    DetectionCollate,
    create_ledger,
    open_dataset,
    read_split,
)
from rmoe_platform.datasets.scenes import make_example
from rmoe_platform.storage.local_s3 import free_port

TASKS = ("classification", "segmentation", "detection")


def recipe(task: str, **kwargs: Any) -> SceneRecipe:
    return SceneRecipe(**{"task": task, "num_train": 24, "num_val": 8, "img_size": 32, "shard_rows": 10, **kwargs})


def decoded(uri: str, split: str = "train", access: Any = None, mode: str = "decode", **spec: Any) -> list[dict]:
    opened = open_dataset(uri, access)
    decode = DecodeSpec(opened.card.task, mode, spec.pop("size", 32), AugmentSpec(), 0.0)
    ledger = create_ledger(opened, spec.pop("max_bad_fraction", 0.0))
    try:
        return read_split(opened, split, decode, ledger).take_all()
    finally:
        ray.kill(ledger)


def assert_targets_equal(task: str, row: dict, targets: dict) -> None:
    if task == "classification":
        assert row["label"] == targets["label"]
    elif task == "segmentation":
        np.testing.assert_array_equal(row["mask"], targets["mask"])
    else:
        np.testing.assert_array_equal(row["boxes"], targets["boxes"])
        np.testing.assert_array_equal(row["labels"], targets["labels"])
        np.testing.assert_array_equal(np.asarray(row["masks"]).reshape(targets["masks"].shape), targets["masks"])


# ---- codecs and transforms (no Ray) -----------------------------------------------------------------
def test_rle_matches_pycocotools() -> None:
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for trial in range(50):
        h, w = rng.integers(1, 30, 2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if trial == 0:
            mask[:] = 1
        ours = rle_encode(mask)
        theirs = mask_api.encode(np.asfortranarray(mask))
        assert ours["counts"] == theirs["counts"].decode()
        np.testing.assert_array_equal(rle_decode(ours), mask)
    # uncompressed RLE and polygons (as COCO files hold them) decode too
    np.testing.assert_array_equal(rle_decode({"size": [2, 2], "counts": [1, 2, 1]}), [[0, 1], [1, 0]])
    square = instance_mask_decode(json.dumps([[1, 1, 4, 1, 4, 4, 1, 4]]), 6, 6)
    assert square[2, 2] == 1 and square[0, 0] == 0


def test_generation_is_deterministic_and_targets_are_exact() -> None:
    r = recipe("detection", max_objects=5)
    for index in range(10):
        a, b = make_example(r, "train", index), make_example(r, "train", index)
        assert a["image"] == b["image"]
        targets = a["_targets"]
        for box, mask in zip(targets["boxes"], targets["masks"], strict=True):
            ys, xs = np.nonzero(mask)
            assert list(box) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert make_example(r, "train", 0)["image"] != make_example(r, "val", 0)["image"]
    seg = make_example(recipe("segmentation"), "train", 3)["_targets"]["mask"]
    assert set(np.unique(seg)) <= set(range(11)) and (seg > 0).any()


def test_contexts_relabel_the_shapes_by_a_fixed_permutation_each() -> None:
    """Scenes with contexts: the label is the context's permutation of the shape, the background sits in
    the context's brightness band, and one context (recipe.contexts == 1) is the plain shape task."""
    r = recipe("classification", num_classes=6, contexts=4, noise=0.0, distractors=0)
    table = r.context_labels
    assert table.shape == (4, 6) and (table[0] == np.arange(6)).all()
    assert all(sorted(row) == list(range(6)) for row in table) and len({tuple(row) for row in table}) == 4
    np.testing.assert_array_equal(table, dataclasses.replace(r).context_labels)  # a function of the recipe
    plain = recipe("classification", num_classes=6, noise=0.0, distractors=0)
    seen, brightness = set(), {c: [] for c in range(4)}
    for index in range(60):
        stream = np.random.default_rng([r.seed, 0, index])  # the example's draws: background, shape, context
        _ = stream.uniform(0.2, 0.8, 3), stream.uniform(-0.25, 0.25, (2, 3)), stream.uniform(0, np.pi, 2)
        shape, context = int(stream.integers(6)), int(stream.integers(4))
        example = make_example(r, "train", index)
        assert example["label"] == table[context, shape]
        assert make_example(plain, "train", index)["label"] == shape
        corners = example["_pixels"][[0, 0, -1, -1], [0, -1, 0, -1]].astype(float) / 255
        brightness[context].append(np.median(corners))
        seen.add((context, shape))
    assert len(seen) > 12
    levels = [np.mean(brightness[c]) for c in range(4)]  # each context's band, brighter with the context
    assert all(b - a > 0.1 for a, b in itertools.pairwise(levels)), levels
    # recorded in cards only where it changes the data: datasets written before the field still match
    assert "contexts" not in plain.to_dict() and r.to_dict()["contexts"] == 4
    assert r.plan("x").source["recipe"] == r.to_dict()
    with pytest.raises(ValueError, match="contexts: only classification"):
        recipe("segmentation", contexts=2)
    with pytest.raises(ValueError, match=r"contexts must be in \[1, 8\]"):
        recipe("classification", contexts=9)


def test_joint_transforms_keep_targets_on_the_pixels() -> None:
    rng = np.random.default_rng(0)
    example = make_example(recipe("detection", img_size=48), "train", 1)
    image, targets = example["_pixels"], example["_targets"]
    aug = AugmentSpec(resize_range=(0.5, 1.0), hflip=True)
    for _ in range(10):
        out, boxes, masks, _ = T.detection_train(image, targets["boxes"], targets["masks"], 40, aug, rng)
        assert out.shape == (40, 40, 3) and masks.shape[1:] == (40, 40)
        for box, mask in zip(boxes, masks, strict=True):
            ys, xs = np.nonzero(mask)
            # nearest-neighbour masks vs scaled boxes: within a pixel
            assert np.allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.01)
    seg_image = np.zeros((20, 30, 3), np.uint8)
    seg_image[:, :10] = 255
    seg_mask = np.zeros((20, 30), np.uint8)
    seg_mask[:, :10] = 1
    for _ in range(10):
        img, mask = T.segmentation_train(seg_image, seg_mask, 16, AugmentSpec(), rng)
        bright, valid = img.mean(-1) >= 128, mask != 255
        agree = bright[valid] == (mask[valid] == 1)
        # the mask follows the image through scale, crop and flip (bilinear edges may differ by a column)
        assert agree.sum() >= valid.sum() - 16


# ---- generate → S3 → Ray Data, bit-exact -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_generated_shards_on_s3_decode_bit_exact(ray_local, s3_server, task: str) -> None:
    access = s3_server.access()
    uri = f"s3://{s3_server.bucket()}/data/shapes-{task}"
    r = recipe(task)
    card = write_dataset(uri, r.plan(f"shapes-{task}"), r.rows, s3=access, progress=False)
    assert card.splits["train"].num_rows == 24 and len(card.splits["train"].shards) == 3
    assert card.classes == r.classes and len(card.stats.mean) == 3
    for split, count in (("train", 24), ("val", 8)):
        rows = decoded(uri, split, access)
        assert sorted(row["id"] for row in rows) == list(range(count))
        for row in rows:
            source = make_example(r, split, int(row["id"]))
            np.testing.assert_array_equal(row["image"], source["_pixels"])
            assert_targets_equal(task, row, source["_targets"])


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_training_batches_stream_into_torch(ray_local, tmp_path: Path, task: str) -> None:
    r = recipe(task)
    uri = str(tmp_path / task)
    write_dataset(uri, r.plan(task), r.rows, progress=False)
    opened = open_dataset(uri)
    ledger = create_ledger(opened, 0.0)
    spec = DecodeSpec(task, "train", 24, AugmentSpec(), 0.0)
    ds = read_split(opened, "train", spec, ledger, seed=3)
    collate = DetectionCollate() if task == "detection" else None
    batches = list(ds.iter_torch_batches(batch_size=8, collate_fn=collate, drop_last=True))
    ray.kill(ledger)
    assert len(batches) == 3
    batch = batches[0]
    # uint8 NCHW: 4x fewer bytes than float32 through the object store; normalised on the device
    assert tuple(batch["image"].shape) == (8, 3, 24, 24) and str(batch["image"].dtype) == "torch.uint8"
    if task == "segmentation":
        assert tuple(batch["mask"].shape) == (8, 24, 24)
    if task == "detection":
        assert len(batch["boxes"]) == 8 and all(b.shape[-1] == 4 for b in batch["boxes"])
        assert all(m.shape[0] == len(lab) for m, lab in zip(batch["masks"], batch["labels"], strict=True))


def test_resume_keeps_finished_shards(tmp_path: Path) -> None:
    r = recipe("classification", num_train=40)
    uri = str(tmp_path / "ds")
    card = write_dataset(uri, r.plan("ds"), r.rows, progress=False)
    shards = sorted((tmp_path / "ds" / "train").glob("*.parquet"))
    (tmp_path / "ds" / "card.json").unlink()  # as if interrupted before the card
    shards[-1].unlink()
    before = {p: p.stat().st_mtime_ns for p in shards[:-1]}
    made: list[tuple[str, int]] = []

    def rows(split: str, start: int, stop: int):
        made.append((split, start))
        return r.rows(split, start, stop)

    again = write_dataset(uri, r.plan("ds"), rows, progress=False)
    assert made == [("train", 30)]  # only the missing shard was generated
    assert {p: p.stat().st_mtime_ns for p in shards[:-1]} == before
    assert again.stats == card.stats and again.splits == card.splits
    other = recipe("classification", seed=5)
    with pytest.raises(ValueError, match=r"another location|made differently"):
        write_dataset(uri, other.plan("ds"), other.rows, progress=False)


# ---- converters ------------------------------------------------------------------------------------
def _png(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def _jpeg(path: Path, array: np.ndarray) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=90)
    return path.read_bytes()


@pytest.mark.slow
def test_convert_imagenet_tree(ray_local, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    source: dict[tuple[str, str], tuple[bytes, int]] = {}
    for split, per_class in (("train", 3), ("val", 1)):
        for label, cls in enumerate(("n01", "n02")):
            for i in range(per_class):
                array = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
                path = tmp_path / "src" / split / cls / f"img{i}.JPEG"
                source[(split, f"{cls}/{i}")] = (_jpeg(path, array), label)
    (tmp_path / "src" / "train" / "n01" / "broken.jpg").write_bytes(b"not an image")
    conversion = imagenet(tmp_path / "src", "tiny-imagenet", shard_rows=4)
    card = write_dataset(str(tmp_path / "out"), conversion.plan, conversion.rows, progress=False)
    assert card.classes == ("n01", "n02") and card.task == "classification"
    assert card.splits["train"].num_rows == 6 and card.source["skipped_rows"] == {"train": 1, "val": 0}
    rows = decoded(str(tmp_path / "out"), "train")
    expected = sorted(
        (decode_image(data).tobytes(), label) for (split, _), (data, label) in source.items() if split == "train"
    )
    assert sorted((row["image"].tobytes(), row["label"]) for row in rows) == expected
    assert card.stats.min_hw == (20, 24) and card.stats.max_hw == (22, 24)


@pytest.mark.slow
def test_convert_ade20k_tree(ray_local, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    expected = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        for i in range(3):
            image = _png(
                tmp_path / "ade" / "images" / folder / f"ADE_{i}.png", rng.integers(0, 255, (16, 20, 3), np.uint8)
            )
            ade_mask = _png(
                tmp_path / "ade" / "annotations" / folder / f"ADE_{i}.png", rng.integers(0, 5, (16, 20), np.uint8)
            )
            reduced = np.where(ade_mask == 0, 255, ade_mask.astype(int) - 1).astype(np.uint8)
            expected[(split, i)] = (image, reduced)
    conversion = ade20k(tmp_path / "ade", "tiny-ade", num_classes=4)
    card = write_dataset(str(tmp_path / "out"), conversion.plan, conversion.rows, progress=False)
    assert card.task == "segmentation" and card.num_classes == 4
    for split in ("train", "val"):
        for row in decoded(str(tmp_path / "out"), split):
            image, mask = expected[(split, int(row["id"]))]
            np.testing.assert_array_equal(row["image"], image)
            np.testing.assert_array_equal(row["mask"], mask)


def _annotation(ann_id: int, image_id: int, category: int, bbox: list, segmentation: Any, crowd: bool = False) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "bbox": bbox,
        "segmentation": segmentation,
        "iscrowd": int(crowd),
        "area": bbox[2] * bbox[3],
    }


@pytest.mark.slow
def test_convert_coco_tree(ray_local, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "coco"
    images, expected = {}, {}
    for split in ("train2017", "val2017"):
        entries, annotations = [], []
        for image_id in (7, 3):
            pixels = _png(root / split / f"{image_id:012d}.png", rng.integers(0, 255, (24, 30, 3), np.uint8))
            entries.append({"id": image_id, "file_name": f"{image_id:012d}.png", "height": 24, "width": 30})
            images[(split, image_id)] = pixels
            blob = np.zeros((24, 30), np.uint8)
            blob[5:15, 4:20] = 1
            crowd_rle = {"size": [24, 30], "counts": [0, 720]}
            annotations += [
                _annotation(image_id * 10, image_id, 18, [4, 5, 16, 10], rle_encode(blob)),
                _annotation(image_id * 10 + 1, image_id, 1, [0, 0, 10, 12], [[0, 0, 10, 0, 10, 12, 0, 12]]),
                _annotation(image_id * 10 + 2, image_id, 1, [0, 0, 30, 24], crowd_rle, crowd=True),
            ]
            expected[(split, image_id)] = blob
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(
                {
                    "images": entries,
                    "annotations": annotations,
                    "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
                }
            )
        )
    conversion = coco(root, "tiny-coco")
    card = write_dataset(str(tmp_path / "out"), conversion.plan, conversion.rows, progress=False)
    assert card.classes == ("person", "dog") and card.task == "detection"
    assert card.source["crowd_skipped"] == 4
    rows = decoded(str(tmp_path / "out"), "val")
    assert sorted(int(row["id"]) for row in rows) == [3, 7]
    for row in rows:
        np.testing.assert_array_equal(row["image"], images[("val2017", int(row["id"]))])
        np.testing.assert_array_equal(row["labels"], [1, 0])  # dog (id 18) → 1, person (id 1) → 0
        np.testing.assert_array_equal(row["boxes"], [[4, 5, 20, 15], [0, 0, 10, 12]])
        masks = np.asarray(row["masks"]).reshape(2, 24, 30)
        np.testing.assert_array_equal(masks[0], expected[("val2017", int(row["id"]))])
        assert masks[1][:12, :10].all() and not masks[1][13:].any()


# ---- bad input ------------------------------------------------------------------------------------
def _rewrite_shard(path: Path, change) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), path)


def _truncate_fourth_image(table: pa.Table) -> pa.Table:
    """The shard with its row 3's PNG cut short: an image no decoder can read."""
    images = table.column("image").to_pylist()
    images[3] = images[3][:40]
    return table.set_column(0, "image", pa.array(images, pa.binary()))


@pytest.mark.slow
def test_corrupt_images_are_skipped_and_counted_then_fail_past_the_fraction(ray_local, tmp_path: Path) -> None:
    r = recipe("classification", num_train=40)
    uri = str(tmp_path / "ds")
    write_dataset(uri, r.plan("ds"), r.rows, progress=False)
    shard = tmp_path / "ds" / "train" / "part-00001-of-00004.parquet"

    _rewrite_shard(shard, _truncate_fourth_image)
    rows = decoded(uri, "train", max_bad_fraction=0.05)  # 2 of 40 allowed
    assert len(rows) == 39 and 13 not in {int(row["id"]) for row in rows}
    with pytest.raises(Exception, match=r"part-00001-of-00004\.parquet' row 3 \(id 13\).*max_bad_fraction=0\.0"):
        decoded(uri, "train", max_bad_fraction=0.0)


@pytest.mark.slow
def test_a_fits_stages_share_one_ledger_and_each_counts_and_fails_on_its_own(ray_local, tmp_path: Path) -> None:
    from ray.util.state import list_actors

    from rmoe_platform.config.stage import DataSpec
    from rmoe_platform.stage.data import StageInput, fit_data

    r = recipe("classification", num_train=40)
    clean, dirty = str(tmp_path / "clean"), str(tmp_path / "dirty")
    for uri in (clean, dirty):
        write_dataset(uri, r.plan(Path(uri).name), r.rows, progress=False)

    _rewrite_shard(tmp_path / "dirty" / "train" / "part-00001-of-00004.parquet", _truncate_fourth_image)

    def stages(dirty_fraction: float) -> list[StageInput]:
        def stage(uri: str, fraction: float, suffix: str) -> StageInput:
            spec = DataSpec(uri, img_size=32, max_bad_fraction=fraction)
            return StageInput(open_dataset(uri), "classification", spec, 0, f"train{suffix}", f"val{suffix}")

        return [stage(clean, 0.0, ""), stage(dirty, dirty_fraction, "_1")]

    def ledgers() -> int:
        """DecodeLedger actors this Ray has had, alive or not (this Ray's address: another process's Ray may run)."""
        gcs = ray.get_runtime_context().gcs_address
        return len(list_actors(address=gcs, filters=[("class_name", "=", "DecodeLedger")], limit=10_000))

    before = ledgers()
    data = fit_data(stages(0.05))  # the second stage may skip 2 of its 40 training rows
    try:
        sizes = {name: len(dataset.take_all()) for name, dataset in data.datasets.items()}
        assert sizes == {"train": 40, "val": 8, "train_1": 39, "val_1": 8}
        assert ledgers() == before + 1, "one ledger for the fit's two stages"
        assert data.skipped_rows() == [{"train": 0, "val": 0}, {"train": 1, "val": 0}]
        assert data.failure() is None
    finally:
        data.close()
    data = fit_data(stages(0.0))
    try:
        data.datasets["train"].take_all()  # the clean stage passes whatever the other's budget
        with pytest.raises(Exception, match=r"dirty/train/part-00001-of-00004\.parquet' row 3 \(id 13\)"):
            data.datasets["train_1"].take_all()
        failure = data.failure()
        assert failure is not None and "in split 'train' exceed data.max_bad_fraction=0.0" in str(failure)
        assert data.skipped_rows() == [{"train": 0, "val": 0}, {"train": 1, "val": 0}]
    finally:
        data.close()


def test_wrong_schema_and_empty_datasets_are_refused(tmp_path: Path) -> None:
    r = recipe("classification")
    uri = str(tmp_path / "ds")
    write_dataset(uri, r.plan("ds"), r.rows, progress=False)
    shard = tmp_path / "ds" / "val" / "part-00000-of-00001.parquet"
    _rewrite_shard(shard, lambda t: t.rename_columns(["image", "class", "id"]))
    with pytest.raises(
        ConfigError, match=r"part-00000-of-00001\.parquet.*missing column\(s\) label.*unexpected.*class"
    ):
        open_dataset(uri)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no dataset at .*no card.json"):
        open_dataset(str(empty))
    card = json.loads((tmp_path / "ds" / "card.json").read_text())
    card["splits"]["train"] = {"num_rows": 0, "shards": []}
    (empty / "card.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="empty or missing 'train' split"):
        open_dataset(str(empty))


def test_s3_bad_bucket_credentials_and_endpoint(s3_server) -> None:
    access = s3_server.access()
    bucket = s3_server.bucket()
    with pytest.raises(ConfigError, match=r"data.uri: bucket 'no-such-bucket' .*does not exist"):
        open_dataset("s3://no-such-bucket/data", access)
    wrong = s3_server.access(access_key_id="AKIAWRONGWRONGWRONG", secret_access_key="nope")
    with pytest.raises(ConfigError, match=r"denied.*check the credentials") as err:
        open_dataset(f"s3://{bucket}/data", wrong)
    assert "nope" not in str(err.value)
    assert "AKIAWRONG" not in repr(wrong)
    closed = free_port()  # nothing listens on it once the probe socket is closed
    down = s3_server.access(endpoint_url=f"http://127.0.0.1:{closed}", max_attempts=2, connect_timeout=1.0)
    with pytest.raises(ConfigError, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:\d+ .*after 2 attempt"):
        open_dataset(f"s3://{bucket}/data", down)
    with pytest.raises(ConfigError, match="no dataset at"):
        open_dataset(f"s3://{bucket}/data", access)


def test_png_roundtrip_is_lossless() -> None:
    array = np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_png(array)), array)
    with Image.open(io.BytesIO(encode_png(array[..., 0]))) as image:
        assert image.mode == "L"
    assert read_card("/nonexistent/dataset") is None
