"""The ImageNet (ILSVRC2012) data pipeline of Section 3.4: layout checks, JPEG decoding, the paper's
augmentation and testing crops, the per-pixel mean image, and sampling that is deterministic,
resumable mid-epoch and independent of the number of processes.

Every random choice of a sample's augmentation is drawn from a generator seeded by (seed, epoch,
index), and every epoch's order from one seeded by (seed, epoch). So a resumed run, a 1-process run
and a 2-process DDP run see the same global batches with the same augmentations.

A sample goes through three steps, shared by the CPU path (here, in DataLoader workers) and the GPU
path (repro/data/gpu_imagenet.py, data.decode=gpu):
- a Plan, from the image's header alone: the size of the shorter-side resize and the 224 crops in
  it, plus the colour noise (train_plan, center_plan, ten_crop_plan);
- decoding to RGB (decode: libjpeg-turbo through TorchCodec, Pillow's reduced-size decoding where
  the resize at least halves the image, Pillow for other formats and as the second try);
- resample (the crops, resampled from the source pixels they cover), then, batch by batch on the
  training device, normalize (mean, lighting).
A file that no decoder reads is skipped, reported once and counted (UnreadableImages).
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import io
import multiprocessing
import os
import re
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchcodec.decoders import decode_jpeg

from repro.contract import STOP_SIGNALS
from repro.errors import DataError

# Scale augmentation: the shorter side is resized to a random size in [256, 480] (Sec. 3.4).
TRAIN_SHORT_SIDE = (256, 480)
# Side of the square crops the networks see, in training and testing (Sec. 3.4, Table 1).
CROP = 224
# Shorter side for the center-crop and 10-crop tests (Sec. 3.4's 10-crop test, as fb.resnet.torch resizes).
EVAL_SHORT_SIDE = 256
# eval.ten_crop: where the 10 crops lie in that resize (ten_crop_plan). full_image, ours: the corners of the
# whole resize, as fb.resnet.torch and the authors' model README ("10 224x224 crops from resized image with
# shorter side=256"); center_square: the corners of its central 256 x 256 square, as AlexNet, which the
# paper cites for its "standard 10-crop testing".
TEN_CROP_GEOMETRIES = ("full_image", "center_square")
# AlexNet's PCA colour augmentation (Krizhevsky et al. 2012, Sec. 4.1), cited by Sec. 3.4: std of
# the random weights of the RGB principal components, on the [0, 1] pixel scale.
LIGHTING_STD = 0.1
# Eigenvalues and eigenvectors (columns) of ImageNet's RGB covariance on the [0, 1] scale, as used by
# fb.resnet.torch (datasets/imagenet.lua), the Torch code that reproduced the paper.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))
# Training crops averaged into the per-pixel mean image. 10,000 is what imagenet-multiGPU.torch used
# for its mean estimate, and enough: a pixel's value has a std of about 0.3 on the [0, 1] scale, so
# the mean's standard error is 0.3 / sqrt(10,000) = 0.003, below one grey level (1/255 = 0.004).
MEAN_SAMPLE_SIZE = 10_000
# Batches each DataLoader worker keeps ready (PyTorch's default). More only costs shared memory:
# a batch of 256 crops is 154 MB.
PREFETCH_BATCHES = 2
# Pixels a file may declare before it is refused undecoded: Pillow's default decompression-bomb
# limit. A corrupt header can declare 65535 x 65535, which would take 12 GiB to decode and kill the
# worker.
MAX_PIXELS = 89_478_485
# data.decode: where JPEGs are decoded and augmented (see decode_path).
DECODE_CHOICES = ("auto", "cpu", "gpu")

CACHE_DIR_NAME = ".repro-cache"  # inside the ImageNet root, beside train/ and val/
MEAN_FILE = "mean_image.pt"
# Short: an error is one line. README.md's "Getting the data" says the rest.
GET_IMAGENET = ("Expected DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG from ILSVRC2012 "
                "(https://image-net.org/download; README.md, 'Getting the data').")
SORT_VAL = "Sort them into class folders (the devkit's ground truth, or valprep.sh; README.md, 'Getting the data')."


# ---------------------------------------------------------------------------------------------
# Layout


def _is_image(name: str) -> bool:
    return has_file_allowed_extension(name, IMG_EXTENSIONS)


def _class_folders(split_dir: Path, split: str) -> list[str]:
    """The class folders of one split, after checking that each holds at least one image."""
    if not split_dir.is_dir():
        raise DataError(f"ImageNet {split} folder not found: {split_dir}. " + GET_IMAGENET)
    entries = list(os.scandir(split_dir))
    loose_images = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if loose_images:
        found = f"{split_dir} holds {len(loose_images)} images directly (e.g. {sorted(loose_images)[0]})"
        if split == "val":
            raise DataError(f"{found}: this is the raw ILSVRC2012 validation layout, without class "
                            f"folders. {SORT_VAL}")
        raise DataError(f"{found}; images must sit in one folder per class: {split_dir}/<wnid>/*.JPEG.")
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        tars = sorted(e.name for e in entries if e.name.endswith(".tar"))
        hint = (f"It holds {len(tars)} .tar files (e.g. {tars[0]}): extract each into a folder of "
                f"its name." if tars else GET_IMAGENET)
        raise DataError(f"ImageNet {split} folder {split_dir} has no class folders. {hint}")
    for name in classes:
        with os.scandir(split_dir / name) as files:
            if not any(f.is_file() and _is_image(f.name) for f in files):
                raise DataError(f"ImageNet class folder {split_dir / name} holds no images "
                                f"(looked for {', '.join(IMG_EXTENSIONS)}). Copy its images again or "
                                f"remove the folder from both train/ and val/.")
    return classes


def _first_few(names: list[str]) -> str:
    return str(names[:5]) + ("..." if len(names) > 5 else "")


def check_imagenet_root(root: str | Path) -> tuple[Path, Path]:
    """(train_dir, val_dir) of an ImageNet root laid out as root/{train,val}/<wnid>/*.JPEG, or a
    DataError that says what is wrong and how to fix it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageNet root not found: {root}. " + GET_IMAGENET)
    train_dir, val_dir = root / "train", root / "val"
    train_classes = _class_folders(train_dir, "train")
    val_classes = _class_folders(val_dir, "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"ImageNet train and val class folders differ under {root}: {len(train_classes)} in train, "
            f"{len(val_classes)} in val; only in train: {_first_few(only_train)}, only in val: "
            f"{_first_few(only_val)}. Both must hold the same wnid folders, or class indices would not "
            f"match.")
    return train_dir, val_dir


# ---------------------------------------------------------------------------------------------
# Unreadable files


class UnreadableImage(Exception):
    """No decoder reads this file; the message says why."""


@dataclass
class Unreadable:
    """Stands in a batch for a sample whose file no decoder reads."""
    path: str
    reason: str
    key: tuple[int, int] | None = None  # (epoch, index): where a training batch with no readable sample refills


class UnreadableImageWarning(UserWarning):
    """An image file was skipped (see UnreadableImages)."""


class UnreadableImages:
    """The files the pipeline skipped, path -> why. Each is reported once, when the training process first
    meets it: as an UnreadableImageWarning, unless `report` is set (e.g. to the trainer's log)."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.report: Callable[[str], None] = self._warn

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, UnreadableImageWarning, stacklevel=3)

    def record(self, path: str, reason: str) -> None:
        if path not in self.files:
            self.files[path] = reason
            self.report(f"skipped unreadable image {path}: {reason}")

    def __len__(self) -> int:
        return len(self.files)


# ---------------------------------------------------------------------------------------------
# Decoding


def read_header(data: bytes) -> Image.Image:
    """The file as Pillow opens it: format, mode and size read from the header, no pixel decoded yet."""
    if not data:
        raise UnreadableImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below says it
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnreadableImage("not an image: Pillow knows no format that starts like it") from None
    except Exception as error:  # Pillow raises many kinds on garbage (SyntaxError, struct.error, ...)
        raise UnreadableImage(f"Pillow cannot open it ({type(error).__name__}: {error})") from None
    if image.width * image.height > MAX_PIXELS:
        raise UnreadableImage(f"declares {image.width} x {image.height} pixels, more than {MAX_PIXELS:,}")
    return image


def _torchcodec_decode(data: bytes, header: Image.Image, resized: tuple[int, int]) -> torch.Tensor:
    """A full-size JPEG decode: libjpeg-turbo through TorchCodec, which needs no FFmpeg for images (it
    superseded torchvision's decoders, deprecated since torchvision 0.29; the same pixels, README)."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")


def _pillow_decode(data: bytes, header: Image.Image, resized: tuple[int, int]) -> torch.Tensor:
    # JPEG: libjpeg scales the DCT by the smallest of 1/2, 1/4, 1/8 that keeps both sides at least
    # `resized`, much cheaper than a full decode; a no-op for other formats or a scale of 1.
    header.draft("RGB", (resized[1], resized[0]))
    return torch.from_numpy(np.array(header.convert("RGB"))).permute(2, 0, 1)


def decode(data: bytes, header: Image.Image, resized: tuple[int, int], draft: bool = False,
           full_size: Callable[[bytes, Image.Image, tuple[int, int]], torch.Tensor] = _torchcodec_decode
           ) -> torch.Tensor:
    """The RGB pixels, uint8 [3, H, W], of a file that will be resized to `resized` = (height, width).

    A JPEG goes to `full_size`, libjpeg-turbo through TorchCodec, the faster full-size decoder (the
    benchmark passes torchvision's, its predecessor); with `draft` (data.draft_decode, opt-in: it
    changes the pixels) and where the resize at least halves it, to Pillow's reduced-size decoding,
    faster still (both measured side by side, see README). The other one is the second try: each
    reads some damaged files the other refuses.
    Other formats (ImageNet has a PNG named .JPEG) go to Pillow. Grayscale and CMYK become RGB.
    Raises UnreadableImage when every decoder fails."""
    if header.format != "JPEG":
        decoders = (_pillow_decode,)
    elif draft and 2 * resized[0] <= header.height and 2 * resized[1] <= header.width:
        decoders = (_pillow_decode, full_size)
    else:
        decoders = (full_size, _pillow_decode)
    failures = []
    for decoder in decoders:
        try:
            return decoder(data, header, resized)
        except Exception as error:  # a damaged file makes Pillow raise nearly anything (OSError, SyntaxError...)
            message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            # TorchCodec's messages start with the C++ function and source line: keep what follows
            message = re.sub(r"^.*[.](cpp|h):[0-9]+, ", "", message).rstrip(".")
            failures.append(f"{decoder.__name__.strip('_').split('_')[0]}: {message}")
    raise UnreadableImage("; ".join(failures))


# ---------------------------------------------------------------------------------------------
# Plans: what each sample becomes, decided from the image's size before any pixel is decoded


@dataclass(frozen=True)
class Plan:
    """The image resized to `resized` = (height, width), then the CROP x CROP crops at `crops` =
    ((top, left, flip), ...) of that resized image, and the PCA lighting weights `alpha` (None: no
    colour noise)."""
    resized: tuple[int, int]
    crops: tuple[tuple[int, int, bool], ...]
    alpha: tuple[float, float, float] | None = None


def resized_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(height, width) of the resize whose shorter side is `side`, rounded down as torchvision's does."""
    if width <= height:
        return int(side * height / width), side
    return side, int(side * width / height)


def train_plan(width: int, height: int, sample_seed: int) -> Plan:
    """Scale augmentation, a random 224 crop and flip, and colour noise (Sec. 3.4), drawn from a generator
    seeded by `sample_seed` in the reference pipeline's order (repro/bench_imagenet.py: the resize's
    side, RandomCrop's top then left, RandomHorizontalFlip's coin, MeanAndLighting's weights), so a key gives
    the same sample in every path."""
    generator = torch.Generator().manual_seed(sample_seed)
    side = int(torch.randint(TRAIN_SHORT_SIDE[0], TRAIN_SHORT_SIDE[1] + 1, (), generator=generator))
    rows, cols = resized_size(width, height, side)
    top = int(torch.randint(0, rows - CROP + 1, (1,), generator=generator))
    left = int(torch.randint(0, cols - CROP + 1, (1,), generator=generator))
    flip = bool(torch.rand(1, generator=generator) < 0.5)
    alpha = torch.randn(3, generator=generator) * LIGHTING_STD
    return Plan((rows, cols), ((top, left, flip),), tuple(alpha.tolist()))


def _center(rows: int, cols: int) -> tuple[int, int]:
    return int(round((rows - CROP) / 2)), int(round((cols - CROP) / 2))  # as torchvision's center_crop


def center_plan(width: int, height: int, sample_seed: int | None = None) -> Plan:
    """The center crop of the 256 resize, for the per-epoch validation error of Figure 4."""
    rows, cols = resized_size(width, height, EVAL_SHORT_SIDE)
    return Plan((rows, cols), ((*_center(rows, cols), False),))


def ten_crop_plan(width: int, height: int, sample_seed: int | None = None, geometry: str = "full_image") -> Plan:
    """The 10-crop test (Sec. 3.4) of the 256 resize: the top-left, top-right, bottom-left, bottom-right
    and center crops, then the horizontal flip of each in the same order, for the final errors of Tables
    2 and 3 (their scores are averaged, so the order does not matter). The corners are those of the whole
    resize (geometry full_image) or of its central 256 x 256 square (center_square; TEN_CROP_GEOMETRIES)."""
    if geometry not in TEN_CROP_GEOMETRIES:
        raise ValueError(f"ten_crop geometry must be one of {', '.join(TEN_CROP_GEOMETRIES)}, got {geometry!r}")
    rows, cols = resized_size(width, height, EVAL_SHORT_SIDE)
    top, left, bottom, right = 0, 0, rows, cols
    if geometry == "center_square":
        top, left = int(round((rows - EVAL_SHORT_SIDE) / 2)), int(round((cols - EVAL_SHORT_SIDE) / 2))
        bottom, right = top + EVAL_SHORT_SIDE, left + EVAL_SHORT_SIDE
    corners = ((top, left), (top, right - CROP), (bottom - CROP, left), (bottom - CROP, right - CROP),
               _center(rows, cols))
    return Plan((rows, cols), tuple((top, left, flip) for flip in (False, True) for top, left in corners))


def _source_span(start: int, stop: int, source: int, resized: int) -> tuple[int, int]:
    """The source pixels [a, b) under pixels [start, stop) of a resize from `source` to `resized`,
    rounded to whole pixels, at least one."""
    scale = source / resized
    a = min(round(start * scale), source - 1)
    return a, max(a + 1, round(stop * scale))


def resample(image: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The plan's crops [n, 3, CROP, CROP] of `image` (uint8 [3, H, W]) resized to plan.resized, each
    flipped where the plan says; antialiased bilinear, as Pillow's resize. Only the part of the resize
    the crops cover is computed, from the source pixels under it rounded to whole pixels: each edge
    lies within half a source pixel of the exact crop of the full resize, for a fraction of the
    cost (README). uint8 on the CPU, float in 0-255 elsewhere."""
    rows, cols = plan.resized
    top, left = min(c[0] for c in plan.crops), min(c[1] for c in plan.crops)
    bottom, right = max(c[0] for c in plan.crops) + CROP, max(c[1] for c in plan.crops) + CROP
    y0, y1 = _source_span(top, bottom, image.shape[-2], rows)
    x0, x1 = _source_span(left, right, image.shape[-1], cols)
    region = image[None, :, y0:y1, x0:x1]
    # torch's antialiased resize has a fast uint8 kernel on the CPU for channels-last images; CUDA's
    # takes floats only.
    region = region.contiguous(memory_format=torch.channels_last) if image.is_cpu else region.float()
    union = nnf.interpolate(region, size=(bottom - top, right - left), mode="bilinear", antialias=True,
                            align_corners=False)[0]
    crops = [union[:, t - top:t - top + CROP, l - left:l - left + CROP] for t, l, _ in plan.crops]
    return torch.stack([crop.flip(-1) if flip else crop for crop, (_, _, flip) in zip(crops, plan.crops)])


def normalize(crops: torch.Tensor, mean: torch.Tensor | None, alpha: torch.Tensor | None) -> torch.Tensor:
    """Crops [..., 3, CROP, CROP] in 0-255 as floats on the [0, 1] scale, minus the per-pixel mean
    (Sec. 3.4; no division by a std), plus AlexNet's PCA lighting: eigvec @ (alpha * eigval) added to
    every pixel, alpha [3] for one image or [B, 3] for a batch [B, 3, CROP, CROP]."""
    pixels = crops.div(255)  # a new float32 tensor, whatever the dtype of crops
    if mean is not None:
        pixels.sub_(mean)
    if alpha is not None:
        eigval, eigvec = _eigen(pixels.device)
        pixels.add_(((alpha * eigval) @ eigvec.T)[..., None, None])
    return pixels


@functools.cache
def _eigen(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGENET_EIGVAL and IMAGENET_EIGVEC on `device`, made once: made for every batch, they would
    be two host-to-device copies a training step, each waiting for the device."""
    return torch.tensor(IMAGENET_EIGVAL, device=device), torch.tensor(IMAGENET_EIGVEC, device=device)


# ---------------------------------------------------------------------------------------------
# Samples and batches


def batch_slots(unreadable: list[bool], keep_batch_size: bool) -> list[int]:
    """Which sample fills each slot of a batch whose samples are unreadable where `unreadable` says:
    the readable ones; with keep_batch_size (training), every slot, an unreadable sample's by the
    next readable one (wrapping around). Nothing when no sample is readable."""
    readable = [i for i, bad in enumerate(unreadable) if not bad]
    if not keep_batch_size or not readable:
        return readable
    return [next((j for j in readable if j >= i), readable[0]) for i in range(len(unreadable))]


@dataclass
class Cropped:
    """A sample's crops, uint8 [3, CROP, CROP] (or [10, 3, CROP, CROP] for the 10-crop), and its
    plan's lighting weights."""
    crops: torch.Tensor
    alpha: tuple[float, float, float] | None


class ImageNetSamples(Dataset):
    """The CPU path: an image folder indexed by (epoch, index), each sample read, planned by `plan`
    (train_plan, center_plan or ten_crop_plan) from a generator seeded by (seed, epoch, index),
    decoded and resampled in the DataLoader workers, which send uint8 crops (a quarter of the bytes of
    floats); finish_batch normalizes each batch on `device`, the training device, where a GPU does it
    for nothing: [B, 3, CROP, CROP], or [B, 10, 3, CROP, CROP] for the 10-crop. `mean` None gives the
    crops alone on the [0, 1] scale, without colour noise (for the mean image).

    A file that no decoder reads stops nothing. `collate` leaves it out of the batch, or, with
    keep_batch_size (training), fills its slot with the batch's next readable sample (or, when none
    of the batch is readable, the folder's next readable image), so that every batch keeps its size:
    DDP ranks stay in step and a resumed run counts the same iterations.
    ImageNetLoader reports and counts it."""

    # decode's full-size JPEG decoder; the benchmark swaps in torchvision's to compare (bench_imagenet.py).
    full_size_decoder = staticmethod(_torchcodec_decode)

    def __init__(self, folder: ImageFolder, plan: Callable[[int, int, int], Plan], mean: torch.Tensor | None,
                 seed: int, keep_batch_size: bool, device: torch.device = torch.device("cpu"),
                 draft_decode: bool = False):
        self.folder, self.plan, self.mean, self.seed = folder, plan, mean, seed
        self.draft_decode = draft_decode  # data.draft_decode: reduced-size JPEG decoding (decode's `draft`)
        self.keep_batch_size, self.device = keep_batch_size, device
        # Moved to the device on first use, in the training process: the workers never touch CUDA.
        self._device_mean: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        # Workers started by spawn or forkserver get a pickled copy: without the device's mean.
        return {**self.__dict__, "_device_mean": None}

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def _read(self, path: str, key: tuple[int, int]) -> tuple[bytes, Image.Image, Plan]:
        """The file's bytes, its header and the sample's plan, or UnreadableImage."""
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise UnreadableImage(f"cannot read it ({error.strerror or error})") from None
        header = read_header(data)
        plan = self.plan(header.width, header.height, derived_seed("sample", self.seed, *key))
        rows, cols = plan.resized
        if rows * cols > MAX_PIXELS:  # a 1 x 100,000 strip would resize to 256 x 25.6M
            raise UnreadableImage(f"its shorter-side resize would be {cols} x {rows} pixels, more than "
                                  f"{MAX_PIXELS:,}")
        return data, header, plan

    def __getitem__(self, key: tuple[int, int]) -> tuple[Cropped | Unreadable, int]:
        path, target = self.folder.samples[key[1]]
        try:
            data, header, plan = self._read(path, key)
            crops = resample(decode(data, header, plan.resized, self.draft_decode, self.full_size_decoder), plan)
        except UnreadableImage as error:
            return Unreadable(path, str(error), key), target
        return Cropped(crops[0] if len(plan.crops) == 1 else crops, plan.alpha), target

    def collate(self, samples: list) -> tuple:
        """(crops, lighting weights [B, 3] or None, targets, ((path, reason), ...) of the unreadable
        files); see the class's doc."""
        unreadable = tuple((item.path, item.reason) for item, _ in samples if isinstance(item, Unreadable))
        if self.keep_batch_size and samples and len(unreadable) == len(samples):
            samples = [self.next_readable(samples[-1][0].key)] * len(samples)
        slots = batch_slots([isinstance(item, Unreadable) for item, _ in samples], self.keep_batch_size)
        items, targets = [samples[i][0] for i in slots], torch.tensor([samples[i][1] for i in slots])
        if not items:
            return torch.empty(0, dtype=torch.uint8), None, targets, unreadable
        alphas = torch.tensor([item.alpha for item in items]) if items[0].alpha is not None else None
        # default_collate stacks straight into shared memory in a worker, sparing a copy on the way out
        return default_collate([item.crops for item in items]), alphas, targets, unreadable

    def next_readable(self, key: tuple[int, int]) -> tuple:
        """The first readable sample after `key` in index order (the same epoch, its own draws), for a
        training batch with no readable sample; an unreadable one when no image of the folder is."""
        epoch, index = key
        for step in range(1, len(self)):
            sample = self[(epoch, (index + step) % len(self))]
            if not isinstance(sample[0], Unreadable):
                return sample
        return self[key]

    def finish_batch(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(images, targets, unreadable) on the device, from a batch of `collate`."""
        crops, alphas, targets, unreadable = batch
        targets = targets.to(self.device, non_blocking=True)
        if not len(targets):
            return crops, targets, unreadable
        return self.normalized(crops.to(self.device, non_blocking=True), alphas), targets, unreadable

    def normalized(self, crops: torch.Tensor, alphas: torch.Tensor | None) -> torch.Tensor:
        """normalize(crops) on the device, with the mean and, when there is a mean, the lighting."""
        if self.mean is None:
            return normalize(crops, None, None)
        if self._device_mean is None:
            self._device_mean = self.mean.to(self.device)
        lighting = alphas.to(self.device, non_blocking=True) if alphas is not None else None
        return normalize(crops, self._device_mean, lighting)


class ImageNetLoader:
    """Iterates the (images, targets) batches of a DataLoader over ImageNetSamples (or the GPU path's
    EncodedSamples, whose batches are finished here, in the training process), recording the files
    they skipped in `unreadable`. An evaluation batch left empty is not yielded."""

    def __init__(self, dataset: ImageNetSamples, loader: DataLoader, unreadable: UnreadableImages):
        self.dataset, self.loader, self.unreadable = dataset, loader, unreadable

    def __iter__(self):
        for batch in self.loader:
            images, targets, unreadable = self.dataset.finish_batch(batch)
            for path, reason in unreadable:
                self.unreadable.record(path, reason)
            if len(targets):
                yield images, targets
            elif self.dataset.keep_batch_size:
                path, reason = unreadable[0]
                raise DataError(f"no image of a training batch is readable ({len(unreadable)} files, e.g. "
                                f"{path}: {reason}): the data folder looks damaged; check it or copy it again")


# ---------------------------------------------------------------------------------------------
# Deterministic sampling


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from the given parts, the same on every machine and Python version."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(Sampler):
    """Yields one rank's batches of (epoch, index) keys: a DataLoader's batch_sampler (make_loader).

    The global order of epoch e is a permutation seeded by (seed, e) (or 0..n-1 without shuffle).
    Global batch b is positions [b*B, (b+1)*B) of that order, B = batch_size (the global mini-batch,
    256 in Sec. 3.4), and rank r gets the r-th of world_size contiguous, nearly equal parts of it
    (torch.tensor_split: equal where world_size divides B); so the images of a global batch are the
    same whatever world_size is. start_batch skips the epoch's first global batches (mid-epoch
    resume). With drop_last (default: when shuffling, i.e. training, for a fixed mini-batch size) the
    partial last global batch is dropped, and B must divide by world_size, since DDP averages the
    ranks' gradients with equal weights; otherwise (evaluation, which sums over images) the last
    batch is kept and any world_size works: every image is counted once, and a rank whose part of a
    batch is empty skips it.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, start_batch: int = 0, drop_last: bool | None = None):
        self.drop_last = shuffle if drop_last is None else drop_last
        if self.drop_last and batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.set_epoch(epoch, start_batch)

    @property
    def num_batches(self) -> int:
        """Global batches per epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {self.num_batches} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def _positions(self) -> list[torch.Tensor]:
        """This rank's non-empty parts of the global batches from start_batch, as positions in the
        epoch's global order."""
        starts = range(self.start_batch * self.batch_size, self.num_batches * self.batch_size, self.batch_size)
        parts = [torch.tensor_split(torch.arange(start, min(start + self.batch_size, self.n)),
                                    self.world_size)[self.rank] for start in starts]
        return [part for part in parts if len(part)]

    def __iter__(self):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(
            derived_seed("order", self.seed, self.epoch))) if self.shuffle else None)
        for positions in self._positions():
            indices = order[positions] if order is not None else positions
            yield [(self.epoch, index) for index in indices.tolist()]

    def __len__(self) -> int:
        """This rank's batches in the epoch (from start_batch)."""
        return len(self._positions())


class _WorkerSignals:
    """A DataLoader's worker_init_fn. Slurm signals every process of a job, so the workers leave the
    stop signals and SIGINT to the trainer, which checkpoints at the next step and then shuts them
    down. Once the training process exits (`exiting`, set by its exit hook), SIGTERM stops a worker
    again: multiprocessing's own exit hook stops leftover workers with it, then waits for them, which
    would otherwise be forever."""

    def __init__(self) -> None:
        self.exiting = multiprocessing.Event()
        atexit.register(self.exiting.set)  # runs before multiprocessing's hook, registered earlier

    def __call__(self, worker_id: int) -> None:
        for sig in (*STOP_SIGNALS, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGTERM and self.exiting.is_set():
            os._exit(0)


def make_loader(dataset: ImageNetSamples, sampler: EpochSampler, workers: int, pin_memory: bool,
                persistent_workers: bool, unreadable: UnreadableImages | None = None) -> ImageNetLoader:
    """An ImageNetLoader over the batches of `sampler`, this rank's parts of the global batches (the
    sampler already dropped (training) or kept (evaluation) the partial last one). Skipped files go to
    `unreadable` (ImageNetData.unreadable, shared by a run's loaders), else to the loader's own."""
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=dataset.collate,
                        pin_memory=pin_memory, persistent_workers=persistent_workers and workers > 0,
                        worker_init_fn=_WorkerSignals(),
                        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None)
    return ImageNetLoader(dataset, loader, UnreadableImages() if unreadable is None else unreadable)


# ---------------------------------------------------------------------------------------------
# Per-pixel mean image


def user_cache_dir(root: Path) -> Path:
    """Where a read-only ImageNet root's cache goes: $XDG_CACHE_HOME (or ~/.cache)/repro/<hash of root>."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "repro" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]


def _mean_record_key(sample_size: int, seed: int) -> dict:
    """What a cached mean must match to be reused: the sample and the crop geometry it used."""
    return {"sample_size": sample_size, "seed": seed, "train_short_side": TRAIN_SHORT_SIDE, "crop": CROP}


def _compute_mean_image(train_dir: Path, sample_size: int, seed: int, workers: int,
                        unreadable: UnreadableImages) -> tuple[torch.Tensor, int]:
    dataset = ImageNetSamples(ImageFolder(str(train_dir)), train_plan, None, seed, keep_batch_size=False)
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:sample_size]
    # its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, and a
    # run that computes the mean would start from other initial weights than one that reads the cache
    loader = DataLoader(dataset, batch_size=64, sampler=[(0, i) for i in chosen.tolist()], num_workers=workers,
                        collate_fn=dataset.collate, generator=torch.Generator().manual_seed(seed))
    total, used = torch.zeros(3, CROP, CROP, dtype=torch.float64), 0
    for images, _ in ImageNetLoader(dataset, loader, unreadable):
        total += images.sum(0, dtype=torch.float64)
        used += len(images)
    if not used:
        raise DataError(f"none of the {len(chosen)} training images sampled for the mean image under "
                        f"{train_dir} is readable (e.g. {next(iter(unreadable.files.items()))}): the data "
                        f"folder looks damaged; check it or copy it again")
    return (total / used).float(), used


def mean_image(train_dir: str | Path, sample_size: int = MEAN_SAMPLE_SIZE, seed: int = 0,
               cache_dir: str | Path | None = None, workers: int = 0,
               unreadable: UnreadableImages | None = None) -> torch.Tensor:
    """The per-pixel mean [3, 224, 224] of `sample_size` random training crops (train_plan's geometry,
    without colour noise; unreadable files, recorded in `unreadable`, are left out), read from the
    cache when one with the same sample size, seed and geometry exists, otherwise computed and cached:
    in cache_dir if given, else in <root>/.repro-cache/, else (read-only data folder) in the user
    cache (see user_cache_dir)."""
    train_dir = Path(train_dir)
    key = _mean_record_key(sample_size, seed)
    folders = ([Path(cache_dir)] if cache_dir is not None
               else [train_dir.parent / CACHE_DIR_NAME, user_cache_dir(train_dir.parent)])
    for folder in folders:
        path = folder / MEAN_FILE
        if path.is_file():
            record = torch.load(path, weights_only=True)
            if all(record.get(k) == v for k, v in key.items()):
                return record["mean"]
    mean, used = _compute_mean_image(train_dir, sample_size, seed, workers,
                                     UnreadableImages() if unreadable is None else unreadable)
    record = {**key, "mean": mean, "images_used": used, "train_dir": str(train_dir.resolve())}
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f"{MEAN_FILE}.{os.getpid()}.tmp"
            torch.save(record, partial)
            os.replace(partial, folder / MEAN_FILE)  # atomic: ranks computing at once never read half a file
            return mean
        except OSError:
            continue
    warnings.warn(f"could not cache the ImageNet mean image in any of {[str(f) for f in folders]}; "
                  f"it will be computed again next time")
    return mean


