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
# md5 of the canonical files, as in torchvision/datasets/cifar.py (CIFAR10.train_list, test_list)
CHECKSUMS = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
SIZE = 32  # CIFAR images are 32x32 (Sec. 4.2)
PAD = 4  # "4 pixels are padded on each side" (Sec. 4.2)
# Short: an error is one line. README.md's "Getting the data" says the rest.
HOW_TO_GET = ("Get its python version (README.md, 'Getting the data'), set data.download: true, or make a "
              "stand-in: repro make-data cifar10 --out DIR (with data.verify_checksums: false).")


@dataclass
class CifarArrays:
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # uint8 [M, 3, 32, 32]; the validation images after split_validation
    test_labels: torch.Tensor  # int64 [M]


# ---- reading ---------------------------------------------------------------------------------

def _batches_folder(root: Path) -> Path:
    """`root` itself when it is the batches folder, else `root/cifar-10-batches-py`."""
    if root.name == CIFAR_DIRNAME or (root / TRAIN_FILES[0]).is_file():
        return root
    return root / CIFAR_DIRNAME


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")  # the files are Python 2 pickles with str keys
        pixels, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        images = pixels.reshape(-1, 3, SIZE, SIZE)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as error:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    # A cast would hide a wrong copy: float pixels (already scaled or normalised) or values out of range.
    for key, values, top in ((b"data", pixels, 255), (b"labels", labels, 9)):
        if not values.size:  # an empty batch, whatever its dtype
            continue
        if values.dtype.kind not in "iu":
            raise DataError(f"{path}: {key} holds {values.dtype} values; a CIFAR-10 batch holds integers 0..{top}")
        if values.min() < 0 or values.max() > top:
            raise DataError(f"{path}: {key} holds values from {values.min()} to {values.max()}; a CIFAR-10 batch "
                            f"holds integers 0..{top}")
    if len(labels) != len(images):
        raise DataError(f"{path}: expected one label per image, got {len(labels)} labels for {len(images)} images")
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


def _download(root: Path) -> None:
    import torchvision

    parent = root.parent if root.name == CIFAR_DIRNAME else root  # torchvision adds cifar-10-batches-py/
    try:
        torchvision.datasets.CIFAR10(str(parent), download=True)
    except (OSError, RuntimeError) as error:
        raise DataError(f"downloading CIFAR-10 into {parent} failed ({error}). Set data.download: false "
                        f"and provide the data yourself: {HOW_TO_GET}") from None


def load_cifar10(root: str | Path, *, verify_checksums: bool = True, download: bool = False) -> CifarArrays:
    """The 50k training and 10k test images under `root`: the folder holding `cifar-10-batches-py/`,
    or that folder itself. `download` fetches the canonical copy with torchvision first."""
    root = Path(root).expanduser()
    if download:
        _download(root)
    folder = _batches_folder(root)
    missing = [name for name in CHECKSUMS if not (folder / name).is_file()]
    if not folder.is_dir():
        raise DataError(f"CIFAR-10 not found: no folder {folder}. {HOW_TO_GET}")
    if missing:
        raise DataError(f"CIFAR-10 incomplete: {folder} lacks {', '.join(missing)}. {HOW_TO_GET}")
    if verify_checksums:
        for name, expected in CHECKSUMS.items():
            if _md5(folder / name) != expected:
                raise DataError(f"{folder / name} differs from the canonical CIFAR-10 download (md5 mismatch). "
                                "To accept another copy, such as generated data, set data.verify_checksums: false.")
    train = [_read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(folder / "test_batch")
    return CifarArrays(torch.cat([images for images, _ in train]), torch.cat([labels for _, labels in train]),
                       test_images, test_labels)


def split_validation(arrays: CifarArrays, val_size: int = 5000, seed: int = 0) -> CifarArrays:
    """The 45k/5k train/val split on which the paper chose its schedule (Sec. 4.2): a seeded random
    `val_size` of the training images move to the test fields; the real test set is dropped."""
    n = len(arrays.train_labels)
    if not 0 < val_size < n:
        raise DataError(f"a validation split of {val_size} images needs between 1 and {n - 1} of the {n} "
                        "training images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size], order[val_size:]
    return CifarArrays(arrays.train_images[train], arrays.train_labels[train],
                       arrays.train_images[val], arrays.train_labels[val])


# ---- normalisation and augmentation ---------------------------------------------------------

def pixel_mean(images: torch.Tensor) -> torch.Tensor:
    """The per-pixel mean image [3, 32, 32] of uint8 images on the [0, 1] scale: the paper subtracts
    it and divides by no standard deviation (Sec. 4.2)."""
    total = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
    for chunk in images.split(1024):  # exact float64 sums without a float64 copy of the whole set
        total += chunk.sum(0, dtype=torch.float64)
    return (total / (255 * len(images))).float()


def normalize(images: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The test-time input (Sec. 4.2): the original image minus the per-pixel mean, no crop, no flip."""
    return images.float().div(255) - mean.to(images.device)


def crop_flip_params(n: int, generator: torch.Generator, device: torch.device | str = "cpu"):
    """For each of n images, independently: the offset dx, dy in 0..8 of its 32x32 crop inside the
    40x40 padded image, each value equally likely, and whether it is flipped (p = 1/2). `generator`
    must live on `device`."""
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=generator, device=device)
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=generator, device=device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    return dx, dy, flip


def augment(images: torch.Tensor, mean: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
            flip: torch.Tensor) -> torch.Tensor:
    """The training input (Sec. 4.2): normalise, pad 4 pixels on each side, crop 32x32 at (dy, dx) of
    the padded image, and flip horizontally where `flip`, as one gather on the images' device.

    "4 pixels are padded on each side" is read as zero padding of the mean-subtracted image: the
    padded pixels equal the mean, and the network sees zeros there."""
    steps = torch.arange(SIZE, device=images.device)
    rows = dy[:, None] + steps - PAD  # [B, 32]: the rows of the unpadded image that the crop reads
    # a flipped crop reads its columns right to left
    cols = torch.where(flip[:, None], dx[:, None] + (SIZE - 1 - steps), dx[:, None] + steps) - PAD
    inside = ((rows >= 0) & (rows < SIZE))[:, :, None] & ((cols >= 0) & (cols < SIZE))[:, None, :]
    index = rows.clamp(0, SIZE - 1)[:, :, None] * SIZE + cols.clamp(0, SIZE - 1)[:, None, :]  # [B, 32, 32]
    pixels = normalize(images, mean).flatten(2).gather(2, index.flatten(1)[:, None].expand(-1, 3, -1))
    return torch.where(inside[:, None], pixels.view(-1, 3, SIZE, SIZE), 0.0)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # a fixed mix of (seed, epoch): the same stream in every process and after every resume
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


class CifarBatches:
    """Mini-batches from images held on one device, with no DataLoader and no per-step host sync.

    Training: the order of epoch e is a permutation seeded by (seed, e), and the crop and flip of
    every image in the epoch are drawn up front from the same generator, so batch k of epoch e is the
    same whichever batch the epoch started from (exact mid-epoch resume). Both are drawn on the CPU
    and copied once per epoch, so they do not depend on the device either. The last partial batch is
    dropped: every step has exactly `batch_size` images, the paper's fixed mini-batch (Sec. 4.2).
    Evaluation: the images in order, unaugmented, the last partial batch kept."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, batch_size: int, *,
                 train: bool, device: torch.device | str, seed: int = 0, channels_last: bool = False):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1 or (train and len(labels) < batch_size):
            raise DataError(f"a batch size of {batch_size} does not fit {len(labels)} "
                            f"{'training' if train else 'evaluation'} images")
        self.device = torch.device(device)
        self.images, self.labels, self.mean = images.to(self.device), labels.to(self.device), mean.to(self.device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        if self.train:
            return len(self.labels) // self.batch_size
        return -(-len(self.labels) // self.batch_size)

    def batches(self, epoch: int, start: int = 0):
        """(x, y) on the device for batches start..len-1 of `epoch` (ignored in evaluation)."""
        if self.train:
            generator = _epoch_generator(self.seed, epoch)
            order = torch.randperm(len(self.labels), generator=generator)
            dx, dy, flip = (t.to(self.device) for t in crop_flip_params(len(self.labels), generator))
            order = order.to(self.device)
        for k in range(start, len(self)):
            if self.train:
                chosen = order[k * self.batch_size:(k + 1) * self.batch_size]
                x = augment(self.images[chosen], self.mean, dx[chosen], dy[chosen], flip[chosen])
                y = self.labels[chosen]
            else:
                x = normalize(self.images[k * self.batch_size:(k + 1) * self.batch_size], self.mean)
                y = self.labels[k * self.batch_size:(k + 1) * self.batch_size]
            yield x.contiguous(memory_format=self.memory_format), y
