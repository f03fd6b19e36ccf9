"""How many training images per second the ImageNet pipeline (Sec. 3.4) decodes and augments, per
number of DataLoader workers, and how many workers keep one GPU busy.

    python -m repro.bench_imagenet [--data IMAGENET] [--workers 1 2 4 8]

Without --data it measures on a generated set with ImageNet's layout and typical image sizes.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torchvision.datasets import ImageFolder

from repro.data.imagenet import (CROP, EpochSampler, SeededDataset, check_imagenet_root, make_loader,
                                 open_image, train_transform, write_imagenet)

# Training images/s one GPU consumes on ResNet-18 at 224x224 (our planning figure for a modern
# data-centre GPU in bf16), which the loader of each GPU must keep up with.
TARGET_IMAGES_PER_S = 3000
# The generated stand-in: 20 classes x 30 training images with shorter sides of 350-400 pixels and
# aspect ratios 0.6-1.8, about the average ImageNet training image (~400 x 350, most 500 x 375).
GENERATED = {"classes": 20, "n_train": 30, "n_val": 1, "short_side": (350, 400)}


def _endless_batches(loader, sampler: EpochSampler):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_imagenet_data(root: str | Path, workers=(1, 2), batches: int = 20, batch_size: int = 32,
                        warmup_batches: int = 5, seed: int = 0) -> pd.DataFrame:
    """Training images/s through the full training transform (decode, scale augmentation, crop,
    flip, mean, lighting) and the DataLoader, for each worker count, timed over `batches` batches
    after `warmup_batches` (workers started, files in the page cache). Persistent workers; pinned
    memory when CUDA exists, as in training."""
    train_dir, _ = check_imagenet_root(root)
    # The mean's values do not change the cost: zeros spare computing it.
    dataset = SeededDataset(ImageFolder(str(train_dir), loader=open_image),
                            train_transform(torch.zeros(3, CROP, CROP)), seed)
    rows = []
    for count in workers:
        sampler = EpochSampler(len(dataset), shuffle=True, seed=seed, batch_size=batch_size)
        loader = make_loader(dataset, sampler, batch_size, count, pin_memory=torch.cuda.is_available(),
                             persistent_workers=True)
        stream = _endless_batches(loader, sampler)
        for _ in range(warmup_batches):
            next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        seconds = time.perf_counter() - start
        stream.close()
        del loader  # shuts its workers down before the next count starts its own
        rate = batches * batch_size / seconds
        rows.append({"workers": count, "batch_size": batch_size, "images": batches * batch_size,
                     "seconds": round(seconds, 3), "images_per_s": round(rate, 1),
                     "images_per_s_per_worker": round(rate / max(count, 1), 1)})
    return pd.DataFrame(rows)


def device_label() -> str:
    """'cpu', or the GPU's name as bench_cifar writes it (e.g. 'nvidia_h100_80gb_hbm3')."""
    return torch.cuda.get_device_name(0).lower().replace(" ", "_") if torch.cuda.is_available() else "cpu"


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def workers_for(images_per_s_per_worker: float, target: float = TARGET_IMAGES_PER_S) -> int:
    """Workers needed for `target` images/s if each kept its measured rate (an optimistic bound:
    workers share memory bandwidth and the GPU process needs cores too)."""
    return math.ceil(target / images_per_s_per_worker)


def write_imagenet_bench(root: str | Path, out_dir: str | Path = "results/bench", data: str | None = None,
                         **bench_options) -> Path:
    """Run bench_imagenet_data and write results/bench/imagenet_data_<device>.csv, each row with the
    machine, the data (`data` describes it, default the root path) and the workers it predicts for
    TARGET_IMAGES_PER_S per GPU."""
    frame = bench_imagenet_data(root, **bench_options)
    frame["workers_for_target"] = frame["images_per_s_per_worker"].map(workers_for)
    frame["target_images_per_s"] = TARGET_IMAGES_PER_S
    frame["cpu"] = _cpu_name()
    frame["cpu_cores"] = os.cpu_count()
    frame["data"] = data or str(root)
    out = Path(out_dir) / f"imagenet_data_{device_label()}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return out


def run_imagenet_data_bench(args: argparse.Namespace) -> str:
    """`repro bench imagenet-data`: time each of args.workers over args.steps batches on args.data (an
    ImageNet root; None: a generated stand-in), write the CSV into args.out, return a summary."""
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data or write_imagenet(Path(scratch) / "generated-imagenet", **GENERATED)
        data = args.data or "generated: " + ", ".join(f"{k}={v}" for k, v in GENERATED.items())
        path = write_imagenet_bench(root, args.out, data, workers=args.workers, batches=args.steps)
    frame = pd.read_csv(path)
    last = frame.iloc[-1]
    return (frame.drop(columns=["cpu", "data"]).to_string(index=False)
            + f"\n\n{path}: at {last.images_per_s_per_worker:.0f} images/s per worker ({last.workers} "
            f"workers), about {last.workers_for_target} workers feed {TARGET_IMAGES_PER_S} images/s to "
            f"one GPU (ResNet-18).")
