"""`repro check`'s data items: CIFAR-10 is present with the canonical md5 checksums; ImageNet has its
1000 class folders and every image, and a sample of its files decodes."""
from __future__ import annotations

import os
import random
from pathlib import Path

from repro.check.items import Item, fail, ok
from repro.contract import DATA_ENV
from repro.errors import DataError
from repro.suite.plan import DATA_FLAGS, GET_DATA

CIFAR10_IMAGES = {"train": 50_000, "test": 10_000}  # Krizhevsky 2009; the paper's Sec. 4.2
# ILSVRC2012 (Russakovsky et al. 2015, Table 2), the set of the paper's Sec. 3.4: 1000 classes,
# 1.28 million training images and 50k validation images. Kept here, where they are checked.
IMAGENET_CLASSES = 1000
IMAGENET_IMAGES = {"train": 1_281_167, "val": 50_000}
DECODE_SAMPLE = 32  # files per split opened and decoded: a damaged copy shows in a few dozen
SAMPLE_SEED = 0


def missing_root(dataset: str) -> Item:
    return fail("data", dataset, "no data folder given", f"pass {DATA_FLAGS[dataset]} DIR or export "
                                                          f"{DATA_ENV}=DIR (how to get the data: {GET_DATA})")


def cifar10(root: Path | None) -> Item:
    """Present, complete, with the canonical checksums and readable: load_cifar10's own checks."""
    from repro.data.cifar import CHECKSUMS, load_cifar10

    if root is None:
        return missing_root("cifar10")
    try:
        arrays = load_cifar10(root, verify_checksums=True)
    except DataError as error:
        return fail("data", "cifar10", str(error), f"pass {DATA_FLAGS['cifar10']} DIR holding the canonical "
                                                   f"download ({GET_DATA})")
    return ok("data", "cifar10", f"{root}: {len(arrays.train_labels):,} training and {len(arrays.test_labels):,} "
                                 f"test images; the md5 of all {len(CHECKSUMS)} files match")


def imagenet(root: Path | None) -> list[Item]:
    """The layout (check_imagenet_root), the class and image counts against ILSVRC2012's, and a
    seeded sample of each split's files decoded."""
    from repro.data.imagenet import check_imagenet_root

    if root is None:
        return [missing_root("imagenet")]
    try:
        check_imagenet_root(root)
    except DataError as error:
        return [fail("data", "imagenet", str(error), f"pass {DATA_FLAGS['imagenet']} DIR holding train/ and val/ "
                                                     f"({GET_DATA})")]
    items = []
    classes = sorted(entry.name for entry in os.scandir(root / "train") if entry.is_dir())
    if len(classes) == IMAGENET_CLASSES:
        items.append(ok("data", "imagenet classes", f"{root}: {len(classes)} class folders in train/ and val/"))
    else:
        items.append(fail("data", "imagenet classes", f"{root}: {len(classes)} class folders, ILSVRC2012 has "
                                                      f"{IMAGENET_CLASSES}", f"extract every class again ({GET_DATA})"))
    for split, expected in IMAGENET_IMAGES.items():
        count, sample = _count_and_sample(root / split, classes)
        name = f"imagenet {split}"
        if count == expected:
            items.append(ok("data", name, f"{count:,} images"))
        else:
            difference = f"{abs(count - expected):,} {'fewer' if count < expected else 'more'}"
            items.append(fail("data", name, f"{count:,} images: {difference} than ILSVRC2012's {expected:,}",
                              f"copy the {split} images again ({GET_DATA})"))
        items.append(_decode(sample, f"{name} decode"))
    return items


def _count_and_sample(split_dir: Path, classes: list[str]) -> tuple[int, list[Path]]:
    """The images under split_dir/<class>/, and DECODE_SAMPLE of them drawn uniformly (reservoir
    sampling: one pass, without holding 1.28 million names)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    rng = random.Random(SAMPLE_SEED)
    count, sample = 0, []
    for name in classes:
        with os.scandir(split_dir / name) as entries:
            for entry in entries:
                if not has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                    continue
                count += 1
                if len(sample) < DECODE_SAMPLE:
                    sample.append(Path(entry.path))
                elif (slot := rng.randrange(count)) < DECODE_SAMPLE:
                    sample[slot] = Path(entry.path)
    return count, sample


def _decode(paths: list[Path], name: str) -> Item:
    """Each file decoded whole by Pillow, one of the training pipeline's decoders."""
    from PIL import Image

    broken = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.convert("RGB")
        # unidentified and truncated files raise OSErrors; a header declaring a giant image, a bomb error
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            broken.append(f"{path} ({error})")
    if broken:
        return fail("data", name, f"{len(broken)} of {len(paths)} sampled files do not decode, e.g. {broken[0]}",
                    f"copy those files again from the original archive ({GET_DATA})")
    return ok("data", name, f"a sample of {len(paths)} files decodes")
