"""How many training images per second each ImageNet pipeline (Sec. 3.4) decodes and augments, per
DataLoader worker, side by side in one run, and how many workers keep one GPU busy.

    repro bench imagenet-data [--data IMAGENET] [--workers 1 2] [--steps 20] [--rounds 5]

The paths: `reference`, the pipeline before issue 12 (below; Pillow and torchvision.transforms),
`cpu-torchvision`, the cpu path before issue 22 (its JPEGs decoded by torchvision's deprecated
decoder), `cpu` (data.decode=cpu, TorchCodec's decoder) and, on a CUDA machine, `gpu`
(data.decode=gpu: the workers only read the files). Without --data it measures on a generated set
with ImageNet's layout and typical image sizes.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F

from repro.data.generated import write_imagenet
from repro.data.imagenet import (CROP, IMAGENET_EIGVAL, IMAGENET_EIGVEC, LIGHTING_STD, PREFETCH_BATCHES,
                                 TRAIN_SHORT_SIDE, EpochSampler, ImageNetSamples, check_imagenet_root,
                                 derived_seed, make_loader, train_plan)
from repro.errors import DataError
from repro.hardware import cpu_model

# Training images/s one GPU consumes on ResNet-18 at 224x224 (our planning figure for a modern
# data-centre GPU in bf16), which the loader of each GPU must keep up with.
TARGET_IMAGES_PER_S = 3000
# The generated stand-in: 20 classes x 30 training images with shorter sides of 350-400 pixels and
# aspect ratios 0.6-1.8, about the average ImageNet training image (~400 x 350, most 500 x 375).
GENERATED = {"classes": 20, "n_train": 30, "n_val": 1, "short_side": (350, 400)}
PATHS = ("reference", "cpu-torchvision", "cpu", "gpu")


# ---------------------------------------------------------------------------------------------
# The reference: the training pipeline before issue 12, kept as this benchmark's baseline and as the
# reference of the same-draws test (tests/test_imagenet_data.py). Its random choices come from torch's
# global RNG, seeded per sample by (seed, epoch, index), in this order: the resize's side,
# RandomCrop's top then left, RandomHorizontalFlip's coin, Lighting's weights.


class ResizeShorterSide:
    """Decode a lazily opened image as RGB, at the smallest JPEG scale (1/2, 1/4, 1/8) whose shorter
    side is still at least the drawn side, and resize the shorter side to a size drawn uniformly
    from the integers in [low, high], keeping the aspect ratio."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def __call__(self, image: Image.Image) -> Image.Image:
        side = int(torch.randint(self.low, self.high + 1, ()))
        image.draft("RGB", (side, side))
        return F.resize(image.convert("RGB"), side)


class MeanAndLighting:
    """Subtract the per-pixel mean, then add eigvec @ (alpha * eigval), alpha ~ N(0, std^2) per image."""

    def __init__(self, mean: torch.Tensor, std: float = LIGHTING_STD):
        self.mean, self.std = mean, std
        self.eigval, self.eigvec = torch.tensor(IMAGENET_EIGVAL), torch.tensor(IMAGENET_EIGVEC)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        return tensor - self.mean + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)


def reference_train_transform(mean: torch.Tensor) -> T.Compose:
    return T.Compose([ResizeShorterSide(*TRAIN_SHORT_SIDE), T.RandomCrop(CROP), T.RandomHorizontalFlip(),
                      T.ToTensor(), MeanAndLighting(mean)])


class ReferenceSamples(Dataset):
    """The reference's training samples, keyed by (epoch, index) like ImageNetSamples (whose loader
    interface it has); it has no defence against unreadable files."""

    keep_batch_size = True

    def __init__(self, folder: ImageFolder, mean: torch.Tensor, seed: int):
        self.folder, self.transform, self.seed = folder, reference_train_transform(mean), seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        path, target = self.folder.samples[key[1]]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derived_seed("sample", self.seed, *key))
            return self.transform(Image.open(path)), target

    def collate(self, samples: list) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        return *default_collate(samples), ()

    def finish_batch(self, batch):
        return batch


def torchvision_decode(data: bytes, header: Image.Image, resized: tuple[int, int]) -> torch.Tensor:
    """The cpu path's full-size JPEG decoder before issue 22: libjpeg-turbo through torchvision, whose
    decoders are deprecated since torchvision 0.29. Kept only to compare with TorchCodec's, so its
    DeprecationWarning is silenced here, at the call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


class TorchvisionSamples(ImageNetSamples):
    """The cpu path as before issue 22: torchvision's full-size JPEG decoder in TorchCodec's place."""
    full_size_decoder = staticmethod(torchvision_decode)


# ---------------------------------------------------------------------------------------------
# The benchmark


def _training_samples(path: str, folder: ImageFolder, seed: int, device: torch.device):
    # The mean's values do not change the cost: zeros spare computing it.
    mean = torch.zeros(3, CROP, CROP)
    if path == "reference":
        return ReferenceSamples(folder, mean, seed)
    if path == "cpu-torchvision":
        return TorchvisionSamples(folder, train_plan, mean, seed, keep_batch_size=True, device=device)
    if path == "cpu":
        return ImageNetSamples(folder, train_plan, mean, seed, keep_batch_size=True, device=device)
    from repro.data.gpu_imagenet import EncodedSamples

    return EncodedSamples(folder, train_plan, mean, seed, keep_batch_size=True, device=device)


def _endless_batches(loader, sampler: EpochSampler):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


@contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def available_paths() -> tuple[str, ...]:
    return PATHS if torch.cuda.is_available() else PATHS[:-1]


def bench_imagenet_data(root: str | Path, workers=(1, 2), batches: int = 20, batch_size: int = 32,
                        rounds: int = 5, warmup_batches: int = 5, seed: int = 0) -> pd.DataFrame:
    """Training images/s of each path's full training pipeline (decode, scale augmentation, crop,
    flip, mean, lighting) through the DataLoader, for each worker count (0: in this process), as the
    median of `rounds` rounds of `batches` batches. The rounds interleave the paths, so that a busy
    moment of a shared machine hits them alike; a round first drains the batches the workers
    prepared while another path ran. Persistent workers, started and warmed up (files in the page
    cache) by `warmup_batches` batches; on a CUDA machine, batches go to the GPU through pinned
    memory, as in training."""
    train_dir, _ = check_imagenet_root(root)
    folder = ImageFolder(str(train_dir))
    if len(folder) < batch_size:  # the sampler drops a partial batch: an epoch would yield nothing, forever
        raise DataError(f"{train_dir} holds {len(folder)} training images, fewer than one batch of {batch_size}")
    paths = available_paths()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where training batches go
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # CUDA batches come asynchronously
    rows = []
    # One thread, as in a DataLoader worker: with 0 workers this process is the worker, and otherwise it
    # only receives batches (and normalizes the CPU path's), as a GPU trainer's process would; its idle
    # threads would spin on the workers' cores.
    with _threads(1):
        for count in workers:
            streams = {}
            for path in paths:
                dataset = _training_samples(path, folder, seed, device)
                sampler = EpochSampler(len(dataset), shuffle=True, seed=seed, batch_size=batch_size)
                loader = make_loader(dataset, sampler, count, pin_memory=device.type == "cuda",
                                     persistent_workers=True)
                streams[path] = _endless_batches(loader, sampler)
                for _ in range(warmup_batches):
                    next(streams[path])
            seconds = {path: [] for path in paths}
            for _ in range(rounds):
                for path, stream in streams.items():
                    for _ in range(PREFETCH_BATCHES * count):
                        next(stream)
                    sync()
                    start = time.perf_counter()
                    for _ in range(batches):
                        next(stream)
                    sync()
                    seconds[path].append(time.perf_counter() - start)
            for stream in streams.values():
                stream.close()  # shuts the workers down before the next count starts its own
            for path in paths:
                rate = batches * batch_size / statistics.median(seconds[path])
                rows.append({"path": path, "workers": count, "batch_size": batch_size, "images_per_round":
                             batches * batch_size, "rounds": rounds, "images_per_s": round(rate, 1),
                             "images_per_s_per_worker": round(rate / max(count, 1), 1)})
    frame = pd.DataFrame(rows)
    reference = frame[frame.path == "reference"].set_index("workers").images_per_s
    frame["speedup_vs_reference"] = (frame.images_per_s / frame.workers.map(reference)).round(2)
    return frame


def device_label() -> str:
    """'cpu', or the GPU's name as bench_cifar writes it (e.g. 'nvidia_h100_80gb_hbm3')."""
    return torch.cuda.get_device_name(0).lower().replace(" ", "_") if torch.cuda.is_available() else "cpu"


def workers_for(images_per_s_per_worker: float, target: float = TARGET_IMAGES_PER_S) -> int:
    """Workers needed for `target` images/s if each kept its measured rate (an optimistic bound:
    workers share memory bandwidth and the GPU process needs cores too)."""
    return math.ceil(target / images_per_s_per_worker)


def write_imagenet_bench(root: str | Path, out_dir: str | Path = "results/bench", data: str | None = None,
                         **bench_options) -> Path:
    """Run bench_imagenet_data and write results/bench/imagenet_data_<device>.csv, each row with the
    machine (and its load when the run started: other processes slow every path alike), the data
    (`data` describes it, default the root path) and the workers it predicts for
    TARGET_IMAGES_PER_S per GPU."""
    load = os.getloadavg()[0]
    frame = bench_imagenet_data(root, **bench_options)
    frame["workers_for_target"] = frame["images_per_s_per_worker"].map(workers_for)
    frame["target_images_per_s"] = TARGET_IMAGES_PER_S
    frame["cpu"] = cpu_model()
    frame["cpu_cores"] = os.cpu_count()
    frame["load_average_1min"] = round(load, 2)
    frame["data"] = data or str(root)
    out = Path(out_dir) / f"imagenet_data_{device_label()}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return out


def run_imagenet_data_bench(args: argparse.Namespace) -> str:
    """`repro bench imagenet-data`: time each path with each of args.workers, args.rounds rounds of
    args.steps batches, on args.data (an ImageNet root; None: a generated stand-in), write the CSV
    into args.out, return a summary."""
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data or write_imagenet(Path(scratch) / "generated-imagenet", **GENERATED)
        data = args.data or "generated: " + ", ".join(f"{k}={v}" for k, v in GENERATED.items())
        path = write_imagenet_bench(root, args.out, data, workers=args.workers, batches=args.steps,
                                    rounds=args.rounds)
    frame = pd.read_csv(path)
    last = frame[frame.workers == frame.workers.max()].set_index("path")
    advice = "; ".join(f"{name}: {row.images_per_s_per_worker:.0f} images/s per worker, about "
                       f"{row.workers_for_target} workers" for name, row in last.iterrows())
    return (frame.drop(columns=["cpu", "data"]).to_string(index=False)
            + f"\n\n{path}\nfor {TARGET_IMAGES_PER_S} images/s to one GPU (ResNet-18), at "
            f"{int(last.workers.iloc[0])} workers: {advice}.")
