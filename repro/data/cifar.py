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
HOW_TO_GET = ("Download the CIFAR-10 python version from https://www.cs.toronto.edu/~kriz/cifar.html and unpack "
              "it there, set data.download: true on a machine with network access, or write a generated "
              "stand-in with `repro make-data cifar10 --out DIR` (and set data.verify_checksums: false).")


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
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, SIZE, SIZE)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as error:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if len(labels) != len(images) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{path}: expected one label in 0..9 per image, got {len(labels)} labels "
                        f"for {len(images)} images")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


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
        raise DataError(f"CIFAR-10 not found: no folder {folder}"
                        f"{'' if folder == root else f' and no CIFAR-10 batches in {root}'}. {HOW_TO_GET}")
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


# ---- the generated stand-in -----------------------------------------------------------------

_SQRT_HALF = float(np.sqrt(0.5))


def _plus(u, v, r):
    return np.minimum(np.maximum(np.abs(u) - 0.3 * r, np.abs(v) - r), np.maximum(np.abs(v) - 0.3 * r, np.abs(u) - r))


def _bands(t, r):
    """Negative on alternate bands across t, about 2.5 per object radius."""
    period = 0.8 * r
    return -np.sin(2 * np.pi * t / period) * period / (2 * np.pi)


# The generated classes: a shape each, as a signed distance in pixels (negative inside) of the
# object's own coordinates u (right), v (down), its radius r and `facing` (+1 or -1). Every class is
# as likely seen mirrored as not (the arrowhead and crescent face either way), as in real photos, so
# a horizontal flip keeps the class.
SHAPES = {
    "disk": lambda u, v, r, facing: np.hypot(u, v) - r,
    "ring": lambda u, v, r, facing: np.abs(np.hypot(u, v) - 0.72 * r) - 0.28 * r,
    "square": lambda u, v, r, facing: np.maximum(np.abs(u), np.abs(v)) - 0.85 * r,
    "diamond": lambda u, v, r, facing: (np.abs(u) + np.abs(v)) * _SQRT_HALF - 0.75 * r,
    "plus": lambda u, v, r, facing: _plus(u, v, r),
    "cross": lambda u, v, r, facing: _plus((u + v) * _SQRT_HALF, (u - v) * _SQRT_HALF, r),
    "arrowhead": lambda u, v, r, facing: np.maximum(-facing * u - 0.6 * r, np.abs(v) - 0.65 * (r - facing * u)),
    "crescent": lambda u, v, r, facing: np.maximum(np.hypot(u, v) - r, 0.8 * r - np.hypot(u - facing * 0.5 * r, v)),
    "striped_disk": lambda u, v, r, facing: np.maximum(np.hypot(u, v) - r, _bands(v, r)),
    "checkered_square": lambda u, v, r, facing: np.maximum(np.maximum(np.abs(u), np.abs(v)) - 0.85 * r,
                                                           _bands(u, r) * np.sign(np.sin(np.pi * v / (0.4 * r)))),
}
GENERATED_CLASSES = tuple(SHAPES)  # their names, in label order
CLASS_COLOUR_SHARE = 0.5  # how often an object has its class's typical hue; otherwise any hue


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """[m] each -> [m, 3] in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + 6 * hue[:, None]) % 6
    return value[:, None] * (1 - saturation[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))


def _draw_class(label: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """m images [m, 3, 32, 32] of one generated class, about in [0, 1] (the caller clips): an object of the
    class's shape at a random place (sometimes partly cut off), size and small tilt, usually in the
    class's typical hue, over a random background with a soft blob of another colour (clutter) and
    a light gradient, plus sensor-like noise."""
    shape = SHAPES[GENERATED_CLASSES[label]]
    grid = np.arange(SIZE, dtype=np.float32) + 0.5  # pixel centres
    columns, rows = grid[None, None, :], grid[None, :, None]

    def per_image(values):  # [m] -> [m, 1, 1] float32, to broadcast over the pixels
        return np.asarray(values, dtype=np.float32)[:, None, None]

    def per_pixel(colours):  # [m, 3] -> [m, 3, 1, 1] float32
        return colours.astype(np.float32)[:, :, None, None]

    radius = per_image(rng.uniform(5, 10, m))
    x = columns - per_image(rng.uniform(6, 26, m))  # the object's centre, sometimes near an edge
    y = rows - per_image(rng.uniform(6, 26, m))
    tilt = rng.normal(0, 0.2, m)  # radians; small, so squares and diamonds stay apart
    cos, sin = per_image(np.cos(tilt)), per_image(np.sin(tilt))
    u, v = cos * x + sin * y, cos * y - sin * x
    facing = per_image(rng.choice([-1.0, 1.0], m))
    opacity = per_image(rng.uniform(0.55, 1, m))  # below 1 the object shows its background: low contrast
    alpha = (np.clip(0.5 - shape(u, v, radius, facing), 0, 1) * opacity)[:, None]  # [m, 1, 32, 32], soft edge

    typical = rng.random(m) < CLASS_COLOUR_SHARE
    hue = np.where(typical, label / len(GENERATED_CLASSES) + rng.normal(0, 0.04, m), rng.random(m))
    colour = _hsv_to_rgb(hue % 1, rng.uniform(0.5, 1, m), rng.uniform(0.45, 1, m))
    background = _hsv_to_rgb(rng.random(m), rng.uniform(0, 0.6, m), rng.uniform(0.1, 0.9, m))
    clutter = _hsv_to_rgb(rng.random(m), rng.uniform(0, 1, m), rng.uniform(0.1, 1, m))
    width, strength = per_image(rng.uniform(2, 6, m)), per_image(rng.uniform(0, 0.8, m))
    blob_x = np.exp(-0.5 * ((columns - per_image(rng.uniform(0, SIZE, m))) / width) ** 2)
    blob_y = np.exp(-0.5 * ((rows - per_image(rng.uniform(0, SIZE, m))) / width) ** 2)
    blob = strength * blob_x * blob_y  # a Gaussian, computed separably
    light = rng.uniform(-0.3, 0.3, (2, m)) / SIZE  # brightness change per pixel, in a random direction
    shading = per_image(light[0]) * (columns - SIZE / 2) + per_image(light[1]) * (rows - SIZE / 2)
    shading += rng.standard_normal((m, SIZE, SIZE), dtype=np.float32) * 0.1  # noise, the same in R, G, B

    image = blob[:, None] * per_pixel(clutter - background)
    image += per_pixel(background)
    image += alpha * (per_pixel(colour) - image)
    image += shading[:, None]
    return image


def _generate(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 images [n, 3, 32, 32] for the given labels."""
    images = np.empty((len(labels), 3, SIZE, SIZE), dtype=np.uint8)
    for label in range(len(GENERATED_CLASSES)):  # vectorised within a class; ten iterations in all
        chosen = np.flatnonzero(labels == label)
        drawn = _draw_class(label, len(chosen), rng)
        drawn = np.clip(drawn, 0, 1, out=drawn)
        images[chosen] = np.rint(np.multiply(drawn, 255, out=drawn), out=drawn)
    return images


def write_cifar10(out: str | Path, n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Path:
    """A generated dataset in the exact CIFAR-10 python format under `out/cifar-10-batches-py/`, for
    tests and smoke runs where the real data cannot be had; returns that folder. The classes are
    balanced, like CIFAR-10's; n_train is split over the five training batches as evenly as possible.
    Its files differ from the canonical ones: load it with verify_checksums=False."""
    folder = Path(out) / CIFAR_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = len(GENERATED_CLASSES)
    train_labels = rng.permutation(np.arange(n_train) % classes)
    test_labels = rng.permutation(np.arange(n_test) % classes)
    train_images, test_images = _generate(train_labels, rng), _generate(test_labels, rng)

    def dump(name: str, batch_label: str, images: np.ndarray, labels: np.ndarray) -> None:
        batch = {b"batch_label": batch_label.encode(), b"labels": labels.tolist(),
                 b"data": images.reshape(len(images), 3 * SIZE * SIZE),  # R, G, B planes, each row-major
                 b"filenames": [f"generated_{GENERATED_CLASSES[label]}_{name}_{i:05d}.png".encode()
                                for i, label in enumerate(labels)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)

    splits = np.array_split(np.arange(n_train), len(TRAIN_FILES))
    for i, (name, index) in enumerate(zip(TRAIN_FILES, splits), start=1):
        dump(name, f"training batch {i} of {len(TRAIN_FILES)} (generated)", train_images[index], train_labels[index])
    dump("test_batch", "testing batch 1 of 1 (generated)", test_images, test_labels)
    meta = {b"label_names": [name.encode() for name in GENERATED_CLASSES], b"num_cases_per_batch": len(splits[0]),
            b"num_vis": 3 * SIZE * SIZE}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return folder

