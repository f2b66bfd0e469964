"""`jobs/prepare_data.py`: generate procedural datasets or convert ImageNet/ADE20K/COCO trees into the
shard format, to a local folder or s3://… (resumable: finished shards are kept)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rmoe_platform import storage
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.datasets import convert
from rmoe_platform.datasets.format import FormatError, dataset_name
from rmoe_platform.datasets.scenes import SceneRecipe
from rmoe_platform.datasets.writer import write_dataset
from rmoe_platform.storage.s3 import S3Access, S3Options

SIZES = {  # presets for `generate --size`: (train, val)
    "tiny": (64, 32),
    "small": (2048, 512),
    "medium": (10_000, 2_000),
    "large": (50_000, 5_000),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="jobs/prepare_data.py",
        description="Write datasets in the rmoe shard format (Parquet shards + card.json) locally or to s3://.",
    )
    commands = top.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="procedural scenes of shapes (all three tasks)")
    gen.add_argument("--task", choices=["classification", "segmentation", "detection"], default="classification")
    gen.add_argument("--size", choices=sorted(SIZES), default="small", help="preset train/val sizes")
    gen.add_argument("--num-train", type=int, help="train images (overrides --size)")
    gen.add_argument("--num-val", type=int, help="val images (overrides --size)")
    gen.add_argument("--img-size", type=int, default=32)
    gen.add_argument("--num-classes", type=int, default=10)
    gen.add_argument("--class-offset", type=int, default=0, help="first shape used as a class (another label set)")
    gen.add_argument("--max-objects", type=int, default=4, help="objects per scene (segmentation/detection)")
    gen.add_argument("--noise", type=float, default=0.08)
    gen.add_argument(
        "--contexts", type=int, default=1, help="classification: background contexts that each relabel the shapes"
    )
    gen.add_argument("--seed", type=int, default=0)
    _common(gen)

    conv = commands.add_parser("convert", help="convert an ImageNet-, ADE20K- or COCO-style tree")
    formats = conv.add_subparsers(dest="format", required=True)
    imagenet = formats.add_parser("imagenet", help="<root>/{train,val}/<class>/<image>")
    ade = formats.add_parser("ade20k", help="<root>/images/{training,validation} + <root>/annotations/…")
    ade.add_argument("--num-classes", type=int, default=150)
    ade.add_argument("--classes-file", type=Path, help="class names, one per line (sets --num-classes)")
    ade.add_argument("--keep-zero-label", action="store_true", help="keep id 0 as a class (default: 0 → ignore)")
    coco = formats.add_parser("coco", help="<root>/annotations/instances_<split>.json + <root>/<split>/")
    coco.add_argument("--train-split", default="train2017")
    coco.add_argument("--val-split", default="val2017")
    for sub in (imagenet, ade, coco):
        sub.add_argument("--root", type=Path, required=True, help="the source tree")
        _common(sub)
    return top


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--out", required=True, help="dataset root: a local folder or s3://bucket/prefix")
    sub.add_argument("--shard-rows", type=int, default=512, help="rows per Parquet shard")
    sub.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    sub.add_argument("--s3-region")
    sub.add_argument("--s3-profile", help="profile of the shared credentials file")
    sub.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        access = S3Access.resolve(S3Options(args.s3_endpoint_url, args.s3_region, args.s3_profile))
        name = dataset_name(args.out)
        storage.check_writable(args.out, "--out", access)
        if args.command == "generate":
            recipe = _recipe(args)
            plan, rows = recipe.plan(name), recipe.rows
        else:
            conversion = _conversion(args, name)
            plan, rows = conversion.plan, conversion.rows
        card = write_dataset(args.out, plan, rows, s3=access, progress=not args.no_progress)
    except (ConfigError, FormatError, convert.SourceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{split} {info.num_rows}" for split, info in card.splits.items())
    print(f"{card.name}: {card.task}, {card.num_classes} classes, {sizes} → {args.out}")
    return 0


def _recipe(args: argparse.Namespace) -> SceneRecipe:
    train, val = SIZES[args.size]
    return SceneRecipe(
        task=args.task,
        num_train=args.num_train or train,
        num_val=args.num_val or val,
        img_size=args.img_size,
        num_classes=args.num_classes,
        class_offset=args.class_offset,
        max_objects=args.max_objects,
        noise=args.noise,
        contexts=args.contexts,
        seed=args.seed,
        shard_rows=args.shard_rows,
    )


def _conversion(args: argparse.Namespace, name: str) -> convert.Conversion:
    if args.format == "imagenet":
        return convert.imagenet(args.root, name, shard_rows=args.shard_rows)
    if args.format == "ade20k":
        names = None
        if args.classes_file is not None:
            names = [line.strip() for line in args.classes_file.read_text().splitlines() if line.strip()]
        return convert.ade20k(
            args.root,
            name,
            num_classes=len(names) if names else args.num_classes,
            reduce_zero_label=not args.keep_zero_label,
            class_names=names,
            shard_rows=args.shard_rows,
        )
    return convert.coco(
        args.root, name, splits={"train": args.train_split, "val": args.val_split}, shard_rows=args.shard_rows
    )
