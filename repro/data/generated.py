"""Generated stand-ins for the datasets, written in the real on-disk formats, for tests and smoke runs
where the real data cannot be had (`repro make-data`). Nothing here is read by a real run."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from repro.data.cifar import CIFAR_DIRNAME, SIZE, TRAIN_FILES

# ---- CIFAR-10 ----------------------------------------------------------------------------------

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


# ---- ImageNet ------------------------------------------------------------------------------------

IMAGENET_SHAPES = ("disc", "square", "triangle", "ring", "diamond", "bar")  # one per class, cycling
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
    shape = IMAGENET_SHAPES[k % len(IMAGENET_SHAPES)]
    return _ClassLook(colour, shape, rng.uniform(0, np.pi), rng.uniform(0.15, 0.5))


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
