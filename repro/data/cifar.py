"""CIFAR-10 as the paper uses it (Sec. 4.2): the python-format batches, the per-pixel mean, and the
4-pixel-pad random crop with horizontal flip, done on whatever device holds the data.

torchvision's CIFAR10 class refuses copies whose checksums differ from the canonical download, so
the batches are read here; the canonical checksums are still verified unless told otherwise.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from repro.errors import DataError

CIFAR_DIRNAME = "cifar-10-batches-py"
# md5 of the canonical files (torchvision/datasets/cifar.py)
CHECKSUMS = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PAD = 4  # "4 pixels are padded on each side" (Sec. 4.2)
SIZE = 32
HOW_TO_GET = ("Download the python version of CIFAR-10 from the University of Toronto's CIFAR page and "
              "unpack it there, set data.download: true on a machine with network access, or write a "
              "generated stand-in with `repro make-data cifar10 --out DIR` (then data.verify_checksums: false).")


@dataclass
class CifarArrays:
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _batches_dir(root: Path) -> Path:
    return root if root.name == CIFAR_DIRNAME else root / CIFAR_DIRNAME


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, SIZE, SIZE)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def load_cifar10(root: str | Path, *, verify_checksums: bool = True, download: bool = False) -> CifarArrays:
    """The 50k training and 10k test images of `root` (the folder holding `cifar-10-batches-py/`, or
    that folder itself)."""
    root = Path(root).expanduser()
    if download:
        import torchvision

        torchvision.datasets.CIFAR10(str(root if root.name != CIFAR_DIRNAME else root.parent), download=True)
    folder = _batches_dir(root)
    missing = [name for name in CHECKSUMS if not (folder / name).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. {HOW_TO_GET}")
    if verify_checksums:
        for name, expected in CHECKSUMS.items():
            if _md5(folder / name) != expected:
                raise DataError(f"{folder / name} differs from the canonical CIFAR-10 download (md5 mismatch). "
                                "To use another copy, such as generated data, set data.verify_checksums: false.")
    train = [_read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(folder / "test_batch")
    return CifarArrays(torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train]), test_images, test_labels)


def split_validation(arrays: CifarArrays, val_size: int = 5000, seed: int = 0) -> CifarArrays:
    """The 45k/5k train/val split on which the paper chose its schedule (Sec. 4.2): the test fields
    then hold the held-out training images."""
    order = torch.randperm(len(arrays.train_labels), generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size], order[val_size:]
    return CifarArrays(arrays.train_images[train], arrays.train_labels[train],
                       arrays.train_images[val], arrays.train_labels[val])


def pixel_mean(images: torch.Tensor) -> torch.Tensor:
    """The per-pixel mean image [3, 32, 32] of uint8 images, on the [0, 1] scale."""
    return images.double().mean(0).div(255).float()


def normalize(images: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The test-time input: the original image minus the per-pixel mean, no crop, no flip."""
    return images.float().div(255) - mean.to(images.device)


def crop_flip_params(n: int, generator: torch.Generator, device: torch.device | str = "cpu"):
    """For each of n images, independently: the offset (dx, dy) in 0..8 of its 32x32 crop inside the
    40x40 padded image, and whether it is flipped (p = 1/2)."""
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=generator, device=device)
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=generator, device=device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    return dx, dy, flip


def augment(images: torch.Tensor, mean: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
            flip: torch.Tensor) -> torch.Tensor:
    """Normalise, zero-pad 4 pixels, crop 32x32 at (dy, dx), and flip where asked, as one gather.

    The padding is zero in the mean-subtracted image, i.e. padded pixels equal the mean: the network
    sees zeros there, which is how we read "4 pixels are padded on each side". The flip is folded
    into the column index, so no step loops over images."""
    steps = torch.arange(SIZE, device=images.device)
    rows = dy[:, None] + steps - PAD  # [B, 32], rows of the unpadded image
    cols = torch.where(flip[:, None], dx[:, None] + (SIZE - 1 - steps), dx[:, None] + steps) - PAD
    inside = ((rows >= 0) & (rows < SIZE))[:, :, None] & ((cols >= 0) & (cols < SIZE))[:, None, :]
    rows, cols = rows.clamp(0, SIZE - 1), cols.clamp(0, SIZE - 1)
    batch = torch.arange(len(images), device=images.device)[:, None, None, None]
    channel = torch.arange(3, device=images.device)[None, :, None, None]
    pixels = images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    means = mean.to(images.device)[channel[0], rows[:, None, :, None], cols[:, None, None, :]]
    return (pixels.float().div(255) - means) * inside[:, None]


def _generator(device: torch.device, *seeds: int) -> torch.Generator:
    # a fixed, platform-independent mix of the seeds; the same on every process and every resume
    seed = int.from_bytes(hashlib.blake2b(repr(seeds).encode(), digest_size=8).digest(), "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


class CifarBatches:
    """Mini-batches from images held on one device, with no DataLoader and no host sync.

    Training: the order of epoch e is a permutation seeded by (seed, e), and the epoch's crop and flip
    parameters for every image are drawn up front from a generator seeded the same way, so batch k
    of epoch e is the same whichever batch the epoch started from (exact mid-epoch resume). The last
    partial batch is dropped: every step has exactly `batch_size` images, the paper's fixed mini-batch.
    Evaluation: the images in order, unaugmented, the last batch kept."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, batch_size: int, *,
                 train: bool, device: torch.device | str, seed: int = 0, channels_last: bool = False):
        self.device = torch.device(device)
        pin = self.device.type == "cpu" and torch.cuda.is_available()  # fast copies to a GPU later
        self.images = images.pin_memory() if pin else images.to(self.device)
        self.labels = labels.pin_memory() if pin else labels.to(self.device)
        self.mean = mean.to(self.device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if train and len(labels) < batch_size:
            raise DataError(f"{len(labels)} training images are fewer than one batch of {batch_size}")

    def __len__(self) -> int:
        if self.train:
            return len(self.labels) // self.batch_size
        return -(-len(self.labels) // self.batch_size)

    def batches(self, epoch: int, start: int = 0):
        n = len(self.labels)
        if self.train:
            generator = _generator(self.device, self.seed, epoch)
            order = torch.randperm(n, generator=generator, device=self.device)
            dx, dy, flip = crop_flip_params(n, generator, self.device)
        for k in range(start, len(self)):
            if self.train:
                chosen = order[k * self.batch_size:(k + 1) * self.batch_size]
                x = augment(self.images[chosen], self.mean, dx[chosen], dy[chosen], flip[chosen])
                y = self.labels[chosen]
            else:
                x = normalize(self.images[k * self.batch_size:(k + 1) * self.batch_size], self.mean)
                y = self.labels[k * self.batch_size:(k + 1) * self.batch_size]
            yield x.contiguous(memory_format=self.memory_format), y


def _class_patterns(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images whose class is a texture (stripes of a class-typical orientation and frequency) and a
    class-typical colour, at random phase, contrast and brightness, plus noise: learnable, not trivial."""
    n = len(labels)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    angle = labels * (np.pi / 10) + rng.normal(0, 0.2, n)
    frequency = 0.25 + 0.06 * (labels % 5) + rng.normal(0, 0.01, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    projection = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    texture = np.sin(frequency[:, None, None] * projection + phase[:, None, None])
    # a blob at a random place carries half the colour signal, so crops and flips matter
    cx, cy = rng.uniform(6, 26, n), rng.uniform(6, 26, n)
    blob = np.exp(-((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2) / 40.0)
    hues = np.stack([np.cos(2 * np.pi * labels / 10 + shift) for shift in (0, 2.1, 4.2)], 1)  # [n, 3]
    colour = 0.5 + 0.1 * hues[:, :, None, None] * (0.3 + blob[:, None])
    image = colour + 0.2 * rng.uniform(0.5, 1.0, (n, 1, 1, 1)) * texture[:, None]
    image += rng.normal(0, 0.2, image.shape) + rng.normal(0, 0.1, (n, 1, 1, 1))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_cifar10(out: str | Path, n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Path:
    """A generated dataset in the exact CIFAR-10 python format, for tests and the smoke suite.
    Returns the `cifar-10-batches-py` folder."""
    folder = Path(out) / CIFAR_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_labels = rng.integers(0, 10, n_train)
    test_labels = rng.integers(0, 10, n_test)
    splits = np.array_split(np.arange(n_train), len(TRAIN_FILES))
    train_images = _class_patterns(train_labels, rng)
    test_images = _class_patterns(test_labels, rng)

    def dump(name: str, label: str, images: np.ndarray, labels: np.ndarray) -> None:
        batch = {b"batch_label": label.encode(), b"labels": labels.tolist(),
                 b"data": images.reshape(len(images), -1),
                 b"filenames": [f"generated_{name}_{i:05d}.png".encode() for i in range(len(images))]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)

    for i, (name, index) in enumerate(zip(TRAIN_FILES, splits)):
        dump(name, f"training batch {i + 1} of 5 (generated)", train_images[index], train_labels[index])
    dump("test_batch", "testing batch 1 of 1 (generated)", test_images, test_labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": len(splits[0]),
                     b"num_vis": 3 * SIZE * SIZE}, handle, protocol=2)
    return folder
