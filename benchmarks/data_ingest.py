"""Data ingest throughput: images/s that Ray Data streams from S3 into a Ray Train worker's loop, ÷ a
plain single-process loop that decodes and augments the same shards from local disk (goal ≥ 1.0), and
the wait for an epoch's first batch once the pipeline is warm (goal ≤ 1 s).

Both paths do the same work per image (PNG decode, random resized crop, flip, normalize, batch into
torch tensors). The S3 endpoint is a `moto_server` on loopback that the benchmark starts and stops.
Rounds alternate (plain, Ray, plain, Ray, …); the medians are compared. Ray Data decodes in parallel
tasks over all cores; the plain loop is one process, as a simple PyTorch loop without workers would be.

    python benchmarks/data_ingest.py [--images 16384] [--img-size 64] [--batch 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rmoe_platform.cluster import start_local
from rmoe_platform.datasets import AugmentSpec, SceneRecipe, write_dataset
from rmoe_platform.datasets import transforms as T
from rmoe_platform.datasets.codec import decode_image
from rmoe_platform.datasets.ingest import DecodeSpec, create_ledger, open_dataset, read_split
from rmoe_platform.stage.data import ingest_config
from rmoe_platform.storage.local_s3 import LocalS3
from rmoe_platform.tasks.normalizer import Normalizer

GOAL_RATIO = 1.0  # Ray Data images/s ÷ the plain loop's, at least: decode tasks use both cores, the loop one
GOAL_FIRST_BATCH_SECONDS = 1.0  # from an epoch's start to its first batch, once the pipeline is warm


def plain_loop(root: Path, card, size: int, batch: int) -> float:
    """images/s: read each local shard with pyarrow, decode + augment in this process, batch to torch."""
    rng, aug = np.random.default_rng(0), AugmentSpec()
    started, count, images, labels = time.perf_counter(), 0, [], []
    for shard in card.splits["train"].shards:
        table = pq.read_table(root / shard.path, columns=["image", "label"])
        for data, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist(), strict=True):
            image = T.classification_train(decode_image(data), size, aug, rng)
            images.append(image.transpose(2, 0, 1))
            labels.append(label)
            if len(images) == batch:
                _consume(torch.as_tensor(np.stack(images)), torch.as_tensor(labels), card.stats)
                count += batch
                images, labels = [], []
    return count / (time.perf_counter() - started)


def _consume(images: torch.Tensor, labels: torch.Tensor, stats) -> None:
    """What a training step does with the batch before the model: normalise it (touches every pixel)."""
    float(Normalizer(stats.mean, stats.std, torch.device("cpu"))(images).sum()) + float(labels.sum())


def ray_worker(config: dict) -> None:
    """Two epochs; of the last one (pipeline warm, as in training): images/s and time to first batch."""
    shard = ray.train.get_dataset_shard("train")
    for _ in range(config["epochs"]):
        started, count, first = time.perf_counter(), 0, None
        for batch in shard.iter_torch_batches(batch_size=config["batch"], drop_last=True):
            first = first or time.perf_counter() - started
            _consume(batch["image"], batch["label"], config["stats"])
            count += len(batch["label"])
        rate = count / (time.perf_counter() - started)
    Path(config["out"]).write_text(json.dumps([rate, first]))


def ray_data_rate(uri: str, access, size: int, batch: int, storage: str) -> tuple[float, float]:
    opened = open_dataset(uri, access)
    ledger = create_ledger(opened, 0.0)
    spec = DecodeSpec("classification", "train", size, AugmentSpec(), 0.0)
    dataset = read_split(opened, "train", spec, ledger, seed=0)
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={
            "batch": batch,
            "epochs": 2,
            "out": f"{storage}.rate",
            "stats": opened.card.stats,
        },
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(storage_path=storage),
        datasets={"train": dataset},
        dataset_config=ingest_config(["train"], num_workers=1),  # as a stage reads its data
    )
    try:
        trainer.fit()
        rate, first = json.loads(Path(f"{storage}.rate").read_text())
        return rate, first
    finally:
        ray.kill(ledger)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    recipe = SceneRecipe(num_train=args.images, num_val=64, img_size=args.img_size, shard_rows=512)
    with tempfile.TemporaryDirectory() as tmp, LocalS3() as s3:
        local = Path(tmp) / "shapes"
        card = write_dataset(str(local), recipe.plan("shapes"), recipe.rows, progress=False)
        access = s3.access()
        uri = f"s3://{s3.bucket()}/shapes"
        write_dataset(uri, recipe.plan("shapes"), recipe.rows, s3=access, progress=False)
        # The Train worker mostly waits for batches (on a GPU node it would hold a core of its own), so it
        # gets one logical CPU on top of the machine's: the decode tasks may use every real core.
        cpus = (os.cpu_count() or 1) + 1
        start_local(cpus, include_dashboard=False)
        try:
            plain, streamed, first = [], [], []
            for round_index in range(args.rounds):
                plain.append(plain_loop(local, card, args.img_size, args.batch))
                runs = str(Path(tmp) / f"runs{round_index}")
                rate, latency = ray_data_rate(uri, access, args.img_size, args.batch, runs)
                streamed.append(rate)
                first.append(latency)
                print(
                    f"round {round_index}: plain {plain[-1]:.0f} img/s; Ray Data from S3 {rate:.0f} img/s "
                    f"(first batch after {latency:.2f} s)"
                )
        finally:
            ray.shutdown()
    ratio = statistics.median(streamed) / statistics.median(plain)
    print(
        f"\nepoch of {args.images} images ({args.img_size}px), batch {args.batch}, "
        f"{os.cpu_count()} cores: plain loop (local disk) {statistics.median(plain):.0f} img/s; Ray Data (S3 on "
        f"moto) {statistics.median(streamed):.0f} img/s, first batch after {statistics.median(first):.2f} s"
    )
    print(f"Ray Data ÷ plain loop = {ratio:.2f} (goal ≥ {GOAL_RATIO}: {'met' if ratio >= GOAL_RATIO else 'MISSED'})")
    latency = statistics.median(first)
    verdict = "met" if latency <= GOAL_FIRST_BATCH_SECONDS else "MISSED"
    print(f"first batch of the second epoch after {latency:.2f} s (goal ≤ {GOAL_FIRST_BATCH_SECONDS:g} s: {verdict})")


if __name__ == "__main__":
    main()
