"""The ImageNet (ILSVRC2012) data pipeline of Section 3.4: layout checks, JPEG decoding, the paper's
augmentation and testing crops, the per-pixel mean image, and sampling that is deterministic,
resumable mid-epoch and independent of the number of processes.

Every random choice of a sample's augmentation is drawn from a generator seeded by (seed, epoch,
index), and every epoch's order from one seeded by (seed, epoch). So a resumed run, a 1-process run
and a 2-process DDP run see the same global batches with the same augmentations.
"""
from __future__ import annotations

import hashlib
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import functional as F

from repro.errors import DataError

# Scale augmentation: the shorter side is resized to a random size in [256, 480] (Sec. 3.4).
TRAIN_SHORT_SIDE = (256, 480)
# Side of the square crops the networks see, in training and testing (Sec. 3.4, Table 1).
CROP = 224
# Shorter side for the center-crop and 10-crop tests (the standard 10-crop test, Sec. 3.4).
EVAL_SHORT_SIDE = 256
# AlexNet's PCA colour augmentation (Krizhevsky et al. 2012, Sec. 4.1), cited by Sec. 3.4: std of
# the random weights of the RGB principal components, on the [0, 1] pixel scale.
LIGHTING_STD = 0.1
# Eigenvalues and eigenvectors (rows) of ImageNet's RGB covariance on the [0, 1] scale, as used by
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

CACHE_DIR_NAME = ".repro-cache"  # inside the ImageNet root, beside train/ and val/
MEAN_FILE = "mean_image.pt"
GET_IMAGENET = (
    "Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org/download "
    "(free registration), extract the training tar into one folder per class (wnid), put the "
    "validation images into the same class folders, and pass the folder that holds train/ and val/.")
SORT_VAL = (
    "Sort them into class folders: run the widely used valprep.sh "
    "(https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh) inside val/, "
    "or move each image into the folder of its wnid using ILSVRC2012_validation_ground_truth.txt and "
    "meta.mat from the ILSVRC2012 devkit.")


# ---------------------------------------------------------------------------------------------
# Layout


def _is_image(name: str) -> bool:
    return has_file_allowed_extension(name, IMG_EXTENSIONS)


def _class_folders(split_dir: Path, split: str) -> list[str]:
    """The class folders of one split, after checking that each holds at least one image."""
    if not split_dir.is_dir():
        raise DataError(f"ImageNet {split} folder not found: {split_dir}. Expected the layout "
                        f"{split_dir.parent}/train/<wnid>/*.JPEG and {split_dir.parent}/val/<wnid>/*.JPEG. "
                        + GET_IMAGENET)
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
# Decoding


def open_image(path: str | Path) -> Image.Image:
    """ImageFolder's loader: opens the file without decoding it, so that the resize can still ask
    the JPEG decoder for a reduced scale (see decode_rgb)."""
    return Image.open(path)


def decode_rgb(image: Image.Image, short_side: int) -> Image.Image:
    """Decode a lazily opened image as RGB. A JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale
    whose shorter side is still at least `short_side` (libjpeg scales in the DCT, much faster than
    decoding in full and resizing). Grayscale and CMYK JPEGs, which ImageNet has, become RGB."""
    image.draft("RGB", (short_side, short_side))  # a no-op for loaded or non-JPEG images
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Transforms (torchvision-compatible callables; their randomness comes from torch's global RNG,
# which SeededDataset seeds per sample)


class ResizeShorterSide:
    """Decode (see decode_rgb) and resize the shorter side to a size drawn uniformly from the
    integers in [low, high], keeping the aspect ratio. low == high gives a fixed size."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def __call__(self, image: Image.Image) -> Image.Image:
        side = int(torch.randint(self.low, self.high + 1, ()))
        return F.resize(decode_rgb(image, side), side)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.low}, {self.high})"


class SubtractMean:
    """Subtract the per-pixel mean image (Sec. 3.4; no division by a std, unlike torchvision's
    Normalize). Broadcasts over leading dimensions, e.g. the 10 crops."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor - self.mean

    def __repr__(self) -> str:
        return f"{type(self).__name__}({tuple(self.mean.shape)})"


class Lighting:
    """AlexNet's PCA colour augmentation (Krizhevsky et al. 2012, Sec. 4.1): adds to every pixel
    eigvec @ (alpha * eigval) with alpha ~ N(0, std^2) drawn once per image."""

    def __init__(self, std: float = LIGHTING_STD, eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC):
        self.std = std
        self.eigval = torch.tensor(eigval)
        self.eigvec = torch.tensor(eigvec)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return tensor
        alpha = torch.randn(3) * self.std
        return tensor + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.std})"


class TenCrop:
    """The standard 10-crop test (Sec. 3.4): the 4 corner and the center crops, then the horizontal
    flip of each in the same order, as a [10, 3, size, size] tensor."""

    def __init__(self, size: int = CROP):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # top-left, top-right, bottom-left, bottom-right, center
        crops = F.five_crop(image, [self.size, self.size])
        return torch.stack([F.to_tensor(c) for c in (*crops, *(F.hflip(c) for c in crops))])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size})"


def train_geometry() -> list:
    """The training crop before mean subtraction and colour noise (Sec. 3.4): scale augmentation,
    random 224 crop, random horizontal flip, to a [0, 1] tensor."""
    return [ResizeShorterSide(*TRAIN_SHORT_SIDE), T.RandomCrop(CROP), T.RandomHorizontalFlip(), T.ToTensor()]


def train_transform(mean: torch.Tensor) -> T.Compose:
    return T.Compose([*train_geometry(), SubtractMean(mean), Lighting(LIGHTING_STD)])


def val_transform(mean: torch.Tensor) -> T.Compose:
    """Center crop, for the per-epoch validation error of Figure 4."""
    return T.Compose([ResizeShorterSide(EVAL_SHORT_SIDE, EVAL_SHORT_SIDE), T.CenterCrop(CROP), T.ToTensor(),
                      SubtractMean(mean)])


def ten_crop_transform(mean: torch.Tensor) -> T.Compose:
    """10-crop, for the final errors of Tables 2 and 3; average the 10 crops' scores per image."""
    return T.Compose([ResizeShorterSide(EVAL_SHORT_SIDE, EVAL_SHORT_SIDE), TenCrop(CROP), SubtractMean(mean)])


# ---------------------------------------------------------------------------------------------
# Deterministic sampling


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from the given parts, the same on every machine and Python version."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededDataset(Dataset):
    """An ImageFolder indexed by (epoch, index): the transform runs under torch's RNG seeded by
    (seed, epoch, index), so a sample's augmentation does not depend on which worker, rank or
    resumed run produced it. The global RNG is restored afterwards."""

    def __init__(self, folder: ImageFolder, transform, seed: int):
        self.folder, self.transform, self.seed = folder, transform, seed

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        path, target = self.folder.samples[index]
        image = self.folder.loader(path)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed CUDA's, which fork_rng
            # does not restore here.
            torch.default_generator.manual_seed(derived_seed("sample", self.seed, epoch, index))
            return self.transform(image), target


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs for one rank.

    The global order of epoch e is a permutation seeded by (seed, e) (or 0..n-1 without shuffle).
    Global batch b is positions [b*B, (b+1)*B) of that order, B = batch_size (the global mini-batch,
    256 in Sec. 3.4), and rank r gets the r-th contiguous slice of B / world_size of it; so the
    images of a global batch are the same whatever world_size is. start_batch skips the epoch's
    first global batches (mid-epoch resume). With drop_last (default: when shuffling, i.e. training,
    for a fixed mini-batch size) the partial last global batch is dropped; otherwise (evaluation)
    it is split into contiguous, nearly equal parts, so the ranks see disjoint parts of all n.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, start_batch: int = 0, drop_last: bool | None = None):
        if batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.local_batch_size = batch_size // world_size
        self.drop_last = shuffle if drop_last is None else drop_last
        self.set_epoch(epoch, start_batch)

    @property
    def num_batches(self) -> int:
        """Global batches per epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {self.num_batches} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def _positions(self) -> torch.Tensor:
        """This rank's positions in the epoch's global order, batch by batch."""
        full = self.n // self.batch_size
        grid = torch.arange(full * self.batch_size).view(full, self.world_size, self.local_batch_size)
        mine = grid[self.start_batch:, self.rank].flatten()
        if self.drop_last or full == self.num_batches:
            return mine
        tail = torch.tensor_split(torch.arange(full * self.batch_size, self.n), self.world_size)[self.rank]
        return torch.cat([mine, tail])

    def __iter__(self):
        positions = self._positions()
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                derived_seed("order", self.seed, self.epoch)))
            positions = order[positions]
        return ((self.epoch, index) for index in positions.tolist())

    def __len__(self) -> int:
        return len(self._positions())


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm signals every process of a job: workers leave SIGTERM/SIGUSR1/SIGINT to the trainer,
    which checkpoints at the next step and then shuts them down."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, workers: int,
                pin_memory: bool, persistent_workers: bool) -> DataLoader:
    """A DataLoader over `sampler`; batch_size is this rank's share of the global batch. The
    sampler already dropped (training) or kept (evaluation) the partial last global batch."""
    if batch_size != sampler.local_batch_size:
        raise ValueError(f"batch_size {batch_size} differs from the sampler's per-rank batch "
                         f"{sampler.local_batch_size} (global {sampler.batch_size} / world_size "
                         f"{sampler.world_size})")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=persistent_workers and workers > 0,
                      worker_init_fn=_ignore_stop_signals,
                      prefetch_factor=PREFETCH_BATCHES if workers > 0 else None, drop_last=False)


# ---------------------------------------------------------------------------------------------
# Per-pixel mean image


def user_cache_dir(root: Path) -> Path:
    """Where a read-only ImageNet root's cache goes: $XDG_CACHE_HOME (or ~/.cache)/repro/<hash of root>."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "repro" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]


def _mean_record_key(sample_size: int, seed: int) -> dict:
    """What a cached mean must match to be reused: the sample and the crop geometry it used."""
    return {"sample_size": sample_size, "seed": seed, "train_short_side": TRAIN_SHORT_SIDE, "crop": CROP}


def _compute_mean_image(train_dir: Path, sample_size: int, seed: int,
                        workers: int) -> tuple[torch.Tensor, int]:
    folder = ImageFolder(str(train_dir), loader=open_image)
    dataset = SeededDataset(folder, T.Compose(train_geometry()), seed)
    chosen = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))[:sample_size]
    loader = DataLoader(dataset, batch_size=64, sampler=[(0, i) for i in chosen.tolist()],
                        num_workers=workers)
    total = torch.zeros(3, CROP, CROP, dtype=torch.float64)
    for images, _ in loader:
        total += images.sum(0, dtype=torch.float64)
    return (total / len(chosen)).float(), len(chosen)


def mean_image(train_dir: str | Path, sample_size: int = MEAN_SAMPLE_SIZE, seed: int = 0,
               cache_dir: str | Path | None = None, workers: int = 0) -> torch.Tensor:
    """The per-pixel mean [3, 224, 224] of `sample_size` random training crops (train_geometry),
    read from the cache when one with the same sample size, seed and geometry exists, otherwise
    computed and cached: in cache_dir if given, else in <root>/.repro-cache/, else (read-only
    data folder) in the user cache (see user_cache_dir)."""
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
    mean, used = _compute_mean_image(train_dir, sample_size, seed, workers)
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


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclass
class ImageNetData:
    train: SeededDataset        # training augmentation (Sec. 3.4)
    val: SeededDataset          # center crop: per-epoch validation error (Figure 4)
    val_ten_crop: SeededDataset  # 10-crop: final errors (Tables 2 and 3)
    mean: torch.Tensor           # per-pixel mean image [3, 224, 224]

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def imagenet_datasets(root: str | Path, *, seed: int, mean_sample_size: int = MEAN_SAMPLE_SIZE,
                      mean_workers: int = 0) -> ImageNetData:
    """Check the layout, get the mean image (cached) and build the datasets. Class indices are the
    sorted wnids (ImageFolder), the same in train and val."""
    train_dir, val_dir = check_imagenet_root(root)
    # One mean per data folder (sample seed 0), shared by the runs of every seed instead of recomputed.
    mean = mean_image(train_dir, mean_sample_size, seed=0, workers=mean_workers)
    train = ImageFolder(str(train_dir), loader=open_image)
    val = ImageFolder(str(val_dir), loader=open_image)
    return ImageNetData(train=SeededDataset(train, train_transform(mean), seed),
                        val=SeededDataset(val, val_transform(mean), seed),
                        val_ten_crop=SeededDataset(val, ten_crop_transform(mean), seed),
                        mean=mean)


# ---------------------------------------------------------------------------------------------
# A generated stand-in with ImageNet's on-disk layout, for tests and benchmarks

SHAPES = ("disc", "square", "triangle", "ring", "diamond", "bar")  # one per class, cycling
SPECIAL_MODES = {3: "L", 13: "CMYK"}  # image j of a split is saved in this mode when j % 20 is a key


@dataclass
class _ClassLook:
    colour: np.ndarray  # RGB of the object
    shape: str
    stripe_angle: float  # radians
    stripe_period: float  # as a fraction of the object's size, so the texture scales with it


def _class_look(k: int, classes: int, rng: np.random.Generator) -> _ClassLook:
    hue = (k + rng.uniform(-0.2, 0.2)) / classes
    hsv = Image.new("HSV", (1, 1), (int(hue * 255) % 256, 230, 230))
    colour = np.array(hsv.convert("RGB").getpixel((0, 0)))
    return _ClassLook(colour, SHAPES[k % len(SHAPES)], rng.uniform(0, np.pi), rng.uniform(0.15, 0.5))


def _shape_mask(shape: str, side: int) -> Image.Image:
    mask = Image.new("L", (side, side))
    draw, s = ImageDraw.Draw(mask), side - 1
    if shape == "disc":
        draw.ellipse((0, 0, s, s), fill=255)
    elif shape == "square":
        draw.rectangle((s // 8, s // 8, s - s // 8, s - s // 8), fill=255)
    elif shape == "triangle":
        draw.polygon([(s // 2, 0), (s, s), (0, s)], fill=255)
    elif shape == "ring":
        draw.ellipse((0, 0, s, s), outline=255, width=max(side // 5, 1))
    elif shape == "diamond":
        draw.polygon([(s // 2, 0), (s, s // 2), (s // 2, s), (0, s // 2)], fill=255)
    else:  # bar
        draw.rectangle((0, s * 3 // 8, s, s - s * 3 // 8), fill=255)
    return mask


def _draw_image(look: _ClassLook, rng: np.random.Generator, short_side: tuple[int, int]) -> Image.Image:
    """A blotchy random background with the class's striped shape at a random position and scale."""
    short = int(rng.integers(short_side[0], short_side[1] + 1))
    aspect = rng.uniform(0.6, 1.8)  # width / height
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    blotches = rng.integers(-50, 51, (h // 16 + 2, w // 16 + 2, 3)) + rng.integers(40, 216, 3)
    image = Image.fromarray(np.clip(blotches, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    side = int(rng.uniform(0.3, 0.8) * min(w, h))
    yy, xx = np.mgrid[0:side, 0:side] / side
    stripes = (xx * np.cos(look.stripe_angle) + yy * np.sin(look.stripe_angle)) / look.stripe_period % 1 < 0.5
    colour = np.clip(look.colour + rng.integers(-25, 26, 3), 0, 255)
    texture = np.where(stripes[..., None], colour, colour // 3).astype(np.uint8)
    corner = (int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)))
    image.paste(Image.fromarray(texture), corner, _shape_mask(look.shape, side))
    return image


def write_imagenet(out: str | Path, classes: int = 10, n_train: int = 30, n_val: int = 10, seed: int = 0,
                   short_side: tuple[int, int] = (200, 500)) -> Path:
    """Write a GENERATED dataset in ImageNet's layout, out/{train,val}/n0xxxxxxx/*.JPEG, with n_train
    and n_val images per class: varied sizes (shorter side in `short_side`) and aspect ratios
    (0.6-1.8), a tenth of the images grayscale or CMYK as some real ImageNet JPEGs are, and a
    learnable class structure (each class has its own shape, colour and stripe texture, drawn at
    random positions and scales). Returns `out`."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    looks = [_class_look(k, classes, rng) for k in range(classes)]
    for split, per_class in (("train", n_train), ("val", n_val)):
        j = 0
        for k, look in enumerate(looks):
            folder = out / split / f"n{k:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = _draw_image(look, rng, short_side).convert(SPECIAL_MODES.get(j % 20, "RGB"))
                image.save(folder / f"{folder.name}_{split}_{i}.JPEG", quality=90)
                j += 1
    return out
