"""A run's three ImageNet datasets (training, center crop, 10-crop) on the decoding path that
`data.decode` chooses: CPU workers (repro/data/imagenet.py) or nvJPEG (repro/data/gpu_imagenet.py).
It sits above both, so that neither imports the other's caller."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder

from repro.data.gpu_imagenet import EncodedSamples
from repro.data.imagenet import (DECODE_CHOICES, MEAN_SAMPLE_SIZE, ImageNetSamples, UnreadableImages,
                                 center_plan, check_imagenet_root, mean_image, ten_crop_plan, train_plan)
from repro.errors import DataError


def decode_path(decode: str, device: torch.device | str | None) -> str:
    """'cpu' or 'gpu': where data.decode (auto | cpu | gpu) has JPEGs decoded and augmented."""
    if decode not in DECODE_CHOICES:
        raise DataError(f"data.decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    if decode == "gpu":
        if device is None or torch.device(device).type != "cuda":
            raise DataError(f"data.decode=gpu decodes with nvJPEG on a CUDA device, but this run's device is "
                            f"{device}: use data.decode=cpu or auto")
        return "gpu"
    # auto is the CPU path everywhere: the GPU path has never been measured on a GPU. Make auto pick
    # it on CUDA once `repro bench imagenet-data` on one shows it faster end to end.
    return "cpu"


@dataclass
class ImageNetData:
    train: ImageNetSamples        # training augmentation (Sec. 3.4)
    val: ImageNetSamples          # center crop: per-epoch validation error (Figure 4)
    val_ten_crop: ImageNetSamples  # 10-crop: final errors (Tables 2 and 3)
    mean: torch.Tensor            # per-pixel mean image [3, 224, 224]
    # Files skipped so far, mean image included; pass it to make_loader for each of the datasets.
    unreadable: UnreadableImages = field(default_factory=UnreadableImages)

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def imagenet_datasets(root: str | Path, *, seed: int, mean_sample_size: int = MEAN_SAMPLE_SIZE,
                      mean_workers: int = 0, decode: str = "auto", draft_decode: bool = False,
                      ten_crop: str = "full_image", device: torch.device | str | None = None) -> ImageNetData:
    """Check the layout, get the mean image (cached) and build the datasets of the path `decode`
    chooses (decode_path), whose batches come out on `device` (default: the CPU). Class indices are
    the sorted wnids (ImageFolder), the same in train and val. `draft_decode` and `ten_crop` are
    data.draft_decode and eval.ten_crop."""
    train_dir, val_dir = check_imagenet_root(root)
    samples = EncodedSamples if decode_path(decode, device) == "gpu" else ImageNetSamples
    on = {"seed": seed, "device": torch.device("cpu" if device is None else device), "draft_decode": draft_decode}
    unreadable = UnreadableImages()
    # One mean per data folder (sample seed 0), shared by the runs of every seed instead of recomputed.
    mean = mean_image(train_dir, mean_sample_size, seed=0, workers=mean_workers, unreadable=unreadable)
    train, val = ImageFolder(str(train_dir)), ImageFolder(str(val_dir))
    return ImageNetData(train=samples(train, train_plan, mean, keep_batch_size=True, **on),
                        val=samples(val, center_plan, mean, keep_batch_size=False, **on),
                        val_ten_crop=samples(val, partial(ten_crop_plan, geometry=ten_crop), mean, keep_batch_size=False, **on),
                        mean=mean, unreadable=unreadable)
