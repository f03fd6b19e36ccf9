"""The ImageNet pipeline of Sec. 3.4 on small generated JPEG folders in ImageNet's layout."""
import io
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as F

from repro.bench_imagenet import (ReferenceSamples, ResizeShorterSide, TorchvisionSamples, available_paths,
                                  reference_train_transform, torchvision_decode, write_imagenet_bench)
from repro.data import imagenet as inet
from repro.data import imagenet_sets
from repro.data.generated import write_imagenet
from repro.data.imagenet import (CROP, IMAGENET_EIGVAL, IMAGENET_EIGVEC, LIGHTING_STD, MEAN_FILE, EpochSampler,
                                 ImageNetSamples, UnreadableImage, UnreadableImageWarning, center_plan,
                                 check_imagenet_root, decode, derived_seed, make_loader, mean_image, normalize,
                                 read_header, resample, ten_crop_plan, train_plan)
from repro.errors import DataError

SMALL = {"classes": 3, "n_train": 7, "n_val": 5, "short_side": (40, 80)}  # 36 small JPEGs, with L and CMYK


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("imagenet"), **SMALL)


@pytest.fixture
def root_copy(small_root, tmp_path):
    """A private copy to break or write caches into."""
    return shutil.copytree(small_root, tmp_path / "imagenet")


def _decode_file(path, resized, draft=False):
    data = path.read_bytes()
    return decode(data, read_header(data), resized, draft)


def _samples(root, split="train", plan=train_plan, mean=None, seed=0, keep_batch_size=True):
    return ImageNetSamples(ImageFolder(str(root / split)), plan, mean, seed, keep_batch_size)


def _batch(dataset, keys):
    """(images, targets, unreadable) of the samples of `keys`, as the training process gets them."""
    return dataset.finish_batch(dataset.collate([dataset[key] for key in keys]))


# ---- generated data --------------------------------------------------------------------------

def test_write_imagenet_makes_jpeg_class_folders_with_gray_and_cmyk(small_root):
    folder = ImageFolder(str(small_root / "train"))
    assert folder.classes == ["n00000000", "n00000001", "n00000002"]
    assert Counter(folder.targets) == {0: 7, 1: 7, 2: 7}
    assert len(ImageFolder(str(small_root / "val"))) == 15
    modes = Counter()
    for path in sorted(small_root.rglob("*.JPEG")):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            modes[image.mode] += 1
            assert min(image.size) >= 40 and max(image.size) <= 80 * 1.8 + 1
    assert modes["L"] >= 1 and modes["CMYK"] >= 1 and modes["RGB"] > modes["L"] + modes["CMYK"]


def test_every_image_decodes_to_rgb_as_pillow_sees_it(small_root):
    """Grayscale and CMYK JPEGs too: libjpeg-turbo's RGB is Pillow's, within rounding."""
    for path in small_root.rglob("*.JPEG"):
        with Image.open(path) as image:
            expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        pixels = _decode_file(path, (256, 256))  # an enlargement: the full-size decoder
        assert pixels.dtype == torch.uint8 and pixels.shape == expected.shape
        assert (pixels.float() - expected.float()).abs().mean() < 1.5  # grey levels


def test_write_imagenet_is_seeded(tmp_path):
    a = write_imagenet(tmp_path / "a", classes=2, n_train=2, n_val=1, short_side=(30, 40), seed=1)
    b = write_imagenet(tmp_path / "b", classes=2, n_train=2, n_val=1, short_side=(30, 40), seed=1)
    for path in a.rglob("*.JPEG"):
        assert path.read_bytes() == (b / path.relative_to(a)).read_bytes()


# ---- layout checks ---------------------------------------------------------------------------

def test_good_layout_returns_train_and_val(small_root):
    assert check_imagenet_root(small_root) == (small_root / "train", small_root / "val")


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"ImageNet root not found: .*nowhere.*image-net.org"):
        check_imagenet_root(tmp_path / "nowhere")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder(root_copy, split):
    shutil.rmtree(root_copy / split)
    with pytest.raises(DataError, match=rf"ImageNet {split} folder not found: .*{split}.*<wnid>"):
        check_imagenet_root(root_copy)


def test_empty_class_folder(root_copy):
    for path in (root_copy / "train" / "n00000001").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"class folder .*train/n00000001 holds no images"):
        check_imagenet_root(root_copy)


def test_flat_val_folder_is_the_raw_download(root_copy):
    val = root_copy / "val"
    for i, path in enumerate(sorted(val.rglob("*.JPEG"))):
        path.rename(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    for folder in val.iterdir():
        if folder.is_dir():
            folder.rmdir()
    raw_layout = r"holds 15 images directly .*raw ILSVRC2012 validation layout.*valprep.sh"
    with pytest.raises(DataError, match=raw_layout):
        check_imagenet_root(root_copy)


def test_train_folder_of_class_tars(root_copy):
    train = root_copy / "train"
    shutil.rmtree(train)
    train.mkdir()
    (train / "n00000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"no class folders.*1 .tar files.*extract"):
        check_imagenet_root(root_copy)


def test_train_and_val_classes_differ(root_copy):
    (root_copy / "val" / "n00000002").rename(root_copy / "val" / "n00000009")
    with pytest.raises(DataError, match=r"only in train: \['n00000002'\], only in val: \['n00000009'\]"):
        check_imagenet_root(root_copy)


# ---- decoding ----------------------------------------------------------------------------------

def _noise_image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_reduces_the_jpeg_scale_only_when_asked_and_where_the_resize_halves_it(tmp_path, mode):
    path = tmp_path / "big.JPEG"
    _noise_image(1200, 900).convert(mode).save(path)
    # (height, width) of the resize -> decoded (height, width): scales 1/8, 1/2, 1/2, then full size
    for resized, expected in [((100, 133), (113, 150)), ((256, 341), (450, 600)), ((450, 600), (450, 600)),
                              ((451, 601), (900, 1200))]:
        assert _decode_file(path, resized, draft=True).shape == (3, *expected)
        assert _decode_file(path, resized).shape == (3, 900, 1200)  # data.draft_decode is off by default


def test_a_png_named_jpeg_decodes_exactly(tmp_path):
    path = tmp_path / "n02105855_2933.JPEG"  # ImageNet's own PNG in disguise has this name
    image = _noise_image(64, 48)
    image.save(path, format="PNG")
    assert torch.equal(_decode_file(path, (256, 341)), torch.from_numpy(np.array(image)).permute(2, 0, 1))


def test_pillow_decodes_what_torchcodec_refuses(small_root, monkeypatch):
    """Each decoder is the other's second try (each reads some damaged files the other refuses)."""
    path = next((small_root / "train").rglob("*.JPEG"))
    expected = _decode_file(path, (256, 256))

    def refuse(*args, **kwargs):
        raise RuntimeError("decode_jpeg: simulated refusal")

    monkeypatch.setattr(inet, "decode_jpeg", refuse)
    torch.testing.assert_close(_decode_file(path, (256, 256)).float(), expected.float(), atol=2, rtol=0)


def test_torchcodec_decodes_the_pixels_torchvision_decoded(small_root):
    """The move off torchvision's deprecated decoder (issue 22) changes no pixel: both run libjpeg-turbo
    with the same colour conversions, for colour, grayscale and CMYK JPEGs alike."""
    modes = set()
    for path in sorted(small_root.rglob("*.JPEG")):
        data = path.read_bytes()
        header = read_header(data)
        modes.add(header.mode)
        assert torch.equal(inet._torchcodec_decode(data, header, (256, 256)),
                           torchvision_decode(data, header, (256, 256))), path
    assert modes == {"RGB", "L", "CMYK"}


def test_the_cpu_path_makes_the_batches_it_made_with_torchvisions_decoder(small_root):
    keys = [(epoch, index) for epoch in (0, 1) for index in range(21)]
    for plan, keep_batch_size in [(train_plan, True), (ten_crop_plan, False)]:
        old = TorchvisionSamples(ImageFolder(str(small_root / "train")), plan, None, 0, keep_batch_size)
        new = _samples(small_root, plan=plan, keep_batch_size=keep_batch_size)
        expected, got = _batch(old, keys), _batch(new, keys)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_neither_decoder_warns_of_torchvisions_deprecation(small_root):
    """torchvision 0.29 deprecates its decoders: the pipeline's JPEGs go to TorchCodec's, and the
    benchmark's torchvision baseline silences its warning where it calls it."""
    path = next((small_root / "train").rglob("*.JPEG"))
    data = path.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode(data, read_header(data), (256, 256))
        torchvision_decode(data, read_header(data), (256, 256))
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]


def _jpeg_bytes(size=(48, 32)):
    buffer = io.BytesIO()
    _noise_image(*size).save(buffer, format="JPEG")
    return buffer.getvalue()


def _declaring(width, height):
    """A small JPEG whose header (SOF0) claims width x height pixels."""
    data = bytearray(_jpeg_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


# What issue 10.7 and issue 12 list, plus a corrupt header; each decodes to nothing.
BROKEN_FILES = {
    "empty": (lambda: b"", "empty file"),
    "truncated": (lambda: _jpeg_bytes()[:1000], "torchcodec: Image is incomplete or truncated; pillow: image file "
                                                 "is truncated"),
    "random_bytes": (lambda: np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
                     "not an image"),
    "bomb_header": (lambda: _declaring(10_000, 10_000), "declares 10000 x 10000 pixels"),
    "huge_header": (lambda: _declaring(65_000, 65_000), "DecompressionBombError"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_a_broken_file_is_unreadable_with_a_reason(case):
    make, reason = BROKEN_FILES[case]
    data = make()
    with pytest.raises(UnreadableImage, match=reason):
        decode(data, read_header(data), (256, 256))


# ---- plans: the random draws and the crops -------------------------------------------------------

def test_scale_augmentation_shorter_side_in_256_480():
    sides = []
    for seed in range(200):
        width, height = (30, 20) if seed % 2 else (20, 30)
        rows, cols = train_plan(width, height, seed).resized
        sides.append(min(rows, cols))
        assert max(rows, cols) == int(min(rows, cols) * 1.5)  # aspect ratio kept, rounded down
    assert 256 <= min(sides) < 280 and 456 < max(sides) <= 480  # the whole range is drawn


def test_training_crops_lie_inside_the_resize_and_flip_half_the_time():
    plans = [train_plan(500, 375, seed) for seed in range(400)]
    for plan in plans:
        (top, left, _), = plan.crops
        assert 0 <= top <= plan.resized[0] - CROP and 0 <= left <= plan.resized[1] - CROP
    assert 160 < sum(plan.crops[0][2] for plan in plans) < 240
    assert torch.tensor([plan.alpha for plan in plans]).std(0) == pytest.approx([LIGHTING_STD] * 3, abs=0.02)


def test_resample_of_a_same_size_plan_is_the_exact_crop():
    image = torch.from_numpy(np.array(_noise_image(384, 256))).permute(2, 0, 1)
    plan = center_plan(384, 256)  # shorter side already 256: the resize keeps it unchanged
    assert plan.resized == (256, 384) and plan.crops == ((16, 80, False),)
    assert torch.equal(resample(image, plan)[0], image[:, 16:16 + CROP, 80:80 + CROP])


def test_ten_crop_is_corners_center_and_their_flips():
    image = torch.from_numpy(np.array(_noise_image(300, 256))).permute(2, 0, 1)
    boxes = [(0, 0), (0, 76), (32, 0), (32, 76), (16, 38)]  # (top, left): TL, TR, BL, BR, center
    crops = [image[:, top:top + CROP, left:left + CROP] for top, left in boxes]
    expected = torch.stack(crops + [c.flip(-1) for c in crops])
    assert torch.equal(resample(image, ten_crop_plan(300, 256)), expected)


def test_center_square_ten_crop_takes_the_corners_of_the_central_square():
    image = torch.from_numpy(np.array(_noise_image(400, 256))).permute(2, 0, 1)
    # the central 256 x 256 square starts at column 72; its corners, then the image's center
    boxes = [(0, 72), (0, 104), (32, 72), (32, 104), (16, 88)]
    crops = [image[:, top:top + CROP, left:left + CROP] for top, left in boxes]
    expected = torch.stack(crops + [c.flip(-1) for c in crops])
    assert torch.equal(resample(image, ten_crop_plan(400, 256, geometry="center_square")), expected)
    assert ten_crop_plan(256, 256, geometry="center_square") == ten_crop_plan(256, 256)  # a square: the same


def test_resample_is_close_to_cropping_the_full_resize():
    """Only the crop's source region is resampled, rounded to whole source pixels: on a smooth image
    it stays within 2.5 grey levels of cropping Pillow's full resize on average, where a crop
    misplaced by 3 pixels is off by more."""
    rows, cols = np.mgrid[0:300, 0:450]
    waves = [128 + 100 * np.sin(2 * np.pi * (cols / 97 + c / 3)) * np.cos(2 * np.pi * rows / 71) for c in range(3)]
    image = Image.fromarray(np.stack(waves, -1).round().astype(np.uint8))
    source = F.pil_to_tensor(image)
    for seed in range(20):
        plan = train_plan(450, 300, seed)
        (top, left, flip), = plan.crops
        full = F.pil_to_tensor(image.resize(plan.resized[::-1], Image.BILINEAR)).float()
        ours = resample(source, plan)[0].float()
        ours = ours.flip(-1) if flip else ours
        assert (ours - full[:, top:top + CROP, left:left + CROP]).abs().mean() < 2.5
        misplaced = top + 3 if top + 3 <= plan.resized[0] - CROP else top - 3
        assert (ours - full[:, misplaced:misplaced + CROP, left:left + CROP]).abs().mean() > 2.5


def test_lighting_adds_one_colour_along_the_eigenvectors():
    crops = torch.randint(0, 256, (1, 3, CROP, CROP), dtype=torch.uint8)
    eigvec, eigval = torch.tensor(IMAGENET_EIGVEC), torch.tensor(IMAGENET_EIGVAL)
    for seed in range(50):
        alpha = torch.randn(3, generator=torch.Generator().manual_seed(seed)) * LIGHTING_STD
        offset = normalize(crops, None, alpha) - normalize(crops, None, None)
        torch.testing.assert_close(offset, offset[..., :1, :1].expand_as(offset))  # one colour per image
        weights = torch.linalg.solve(eigvec, offset[0, :, 0, 0])  # coordinates in the eigenvector basis
        torch.testing.assert_close(weights / eigval, alpha, atol=1e-4, rtol=1e-3)


def test_normalize_makes_no_tensor_per_batch(monkeypatch):
    """Issue 18: the eigenvalues and eigenvectors built on the device for every training batch were two
    host-to-device copies a step, each a host sync on a GPU; they are made once per device."""
    crops = torch.randint(0, 256, (4, 3, CROP, CROP), dtype=torch.uint8)
    alpha = torch.randn(4, 3) * LIGHTING_STD
    first = normalize(crops, torch.zeros(3, CROP, CROP), alpha)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: made.append(args) or real(*args, **kwargs))
    again = normalize(crops, torch.zeros(3, CROP, CROP), alpha)
    assert made == [] and torch.equal(again, first)


def test_normalize_subtracts_the_mean_on_the_unit_scale():
    crops = torch.full((2, 3, CROP, CROP), 255, dtype=torch.uint8)
    mean = torch.full((3, CROP, CROP), 0.25)
    assert torch.equal(normalize(crops, mean, None), torch.full((2, 3, CROP, CROP), 0.75))


# ---- same keys, same draws as the reference pipeline ---------------------------------------------

def _reference_draws(path, sample_seed, mean):
    """The reference pipeline's draws for one sample (repro/bench_imagenet.py), replayed step by step
    under the same seed, and checked to be the ones its transform makes: the replay rebuilds the
    transform's output exactly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed)
        resized = ResizeShorterSide(256, 480)(Image.open(path))  # draws the side
        top, left, _, _ = T.RandomCrop.get_params(resized, (CROP, CROP))  # RandomCrop.forward's draw
        flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip.forward's coin
        alpha = torch.randn(3) * LIGHTING_STD  # MeanAndLighting's weights
        torch.manual_seed(sample_seed)
        output = reference_train_transform(mean)(Image.open(path))
    crop = F.to_tensor(F.crop(resized, top, left, CROP, CROP))
    offset = (torch.tensor(IMAGENET_EIGVEC) @ (alpha * torch.tensor(IMAGENET_EIGVAL))).view(3, 1, 1)
    assert torch.equal(output, (crop.flip(-1) if flip else crop) - mean + offset)
    return (resized.height, resized.width), (top, left, flip), alpha


def test_the_cpu_path_draws_what_the_reference_draws(small_root):
    """Same (seed, epoch, index), same scale, crop box, flip and lighting; and pixels that differ only by
    the resampling's rounding, magnified here by enlarging 40-80 pixel images 3 to 12 times. (Images
    under twice the drawn side, where the reference decodes at full size too: otherwise it sized the
    resize from a reduced-size decode.)"""
    folder = ImageFolder(str(small_root / "train"))
    mean = torch.rand(3, CROP, CROP)
    reference = ReferenceSamples(folder, mean, seed=11)
    ours = ImageNetSamples(folder, train_plan, mean, seed=11, keep_batch_size=True)
    modes = Counter()
    for epoch in range(3):
        for index, (path, _) in enumerate(folder.samples):
            sample_seed = derived_seed("sample", 11, epoch, index)
            resized, crop, alpha = _reference_draws(path, sample_seed, mean)
            with Image.open(path) as image:
                plan = train_plan(*image.size, sample_seed)
                modes[image.mode] += 1
            assert plan.resized == resized and plan.crops == (crop,)
            assert plan.alpha == tuple(alpha.tolist())
            difference = (_batch(ours, [(epoch, index)])[0] - reference[(epoch, index)][0]).abs()
            assert difference.mean() < 0.05
    assert modes.keys() == {"RGB", "L", "CMYK"}


def test_draws_depend_only_on_the_key(small_root):
    assert train_plan(500, 375, 7) == train_plan(500, 375, 7) != train_plan(500, 375, 8)
    samples = _samples(small_root, mean=torch.zeros(3, CROP, CROP), seed=3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = _batch(samples, [(0, 4)])[0]
    assert torch.equal(torch.rand(3), expected)  # the global RNG is neither used nor moved
    assert torch.equal(_batch(samples, [(0, 4)])[0], first) and not torch.equal(_batch(samples, [(1, 4)])[0], first)


def test_workers_send_uint8_crops_and_the_batch_is_normalized_on_the_device(small_root):
    samples = _samples(small_root, mean=torch.full((3, CROP, CROP), 0.5))
    cropped, target = samples[(0, 0)]
    assert cropped.crops.shape == (3, CROP, CROP) and cropped.crops.dtype == torch.uint8 and target == 0
    images, targets, _ = _batch(samples, [(0, 0), (0, 1)])
    assert images.shape == (2, 3, CROP, CROP) and images.dtype == torch.float32 and targets.tolist() == [0, 0]
    lighting = torch.tensor(cropped.alpha) @ torch.tensor(IMAGENET_EIGVAL).diag() @ torch.tensor(IMAGENET_EIGVEC).T
    expected = cropped.crops / 255 - 0.5 + lighting[:, None, None]
    torch.testing.assert_close(images[0], expected)
    assert pickle.loads(pickle.dumps(samples))._device_mean is None  # what a spawned worker gets


# ---- mean image ------------------------------------------------------------------------------

def test_mean_image_is_cached_and_records_its_sample(root_copy):
    train = root_copy / "train"
    mean = mean_image(train, sample_size=4, seed=0)
    assert mean.shape == (3, CROP, CROP) and 0.1 < mean.mean() < 0.9
    cache = root_copy / ".repro-cache" / MEAN_FILE
    record = torch.load(cache, weights_only=True)
    assert record["sample_size"] == 4 and record["seed"] == 0 and record["images_used"] == 4
    torch.testing.assert_close(record["mean"], mean)

    record["mean"] = torch.full((3, CROP, CROP), 0.125)  # a marker: a second call must read the file
    torch.save(record, cache)
    assert torch.equal(mean_image(train, sample_size=4, seed=0), record["mean"])

    other = mean_image(train, sample_size=6, seed=0)  # a different sample: recomputed, not reused
    assert not torch.equal(other, record["mean"]) and not torch.equal(other, mean)
    assert torch.load(cache, weights_only=True)["sample_size"] == 6


def _assert_falls_back_to_user_cache(root, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    mean = mean_image(root / "train", sample_size=3, seed=0)
    cached = inet.user_cache_dir(root) / MEAN_FILE
    assert cached.parent.parent == tmp_path / "xdg" / "repro" and cached.is_file()
    torch.testing.assert_close(torch.load(cached, weights_only=True)["mean"], mean)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_data_folder_falls_back_to_user_cache(root_copy, monkeypatch, tmp_path):
    root_copy.chmod(0o555)
    try:
        _assert_falls_back_to_user_cache(root_copy, monkeypatch, tmp_path)
    finally:
        root_copy.chmod(0o755)


def test_unwritable_data_cache_falls_back_to_user_cache(root_copy, monkeypatch, tmp_path):
    (root_copy / ".repro-cache").write_text("a file where the cache folder would go")
    _assert_falls_back_to_user_cache(root_copy, monkeypatch, tmp_path)


# ---- sampling --------------------------------------------------------------------------------

def _indices(sampler):
    return [index for batch in sampler for _, index in batch]


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    sampler = EpochSampler(50, shuffle=True, seed=3, batch_size=10)
    first = _indices(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert {epoch for batch in sampler for epoch, _ in batch} == {0}
    assert _indices(EpochSampler(50, shuffle=True, seed=3, batch_size=10)) == first
    assert _indices(EpochSampler(50, shuffle=True, seed=4, batch_size=10)) != first
    sampler.set_epoch(1)
    second = _indices(sampler)
    assert sorted(second) == list(range(50)) and second != first
    assert _indices(EpochSampler(50, shuffle=True, seed=3, batch_size=10, epoch=1)) == second


def test_training_drops_the_partial_global_batch_and_evaluation_keeps_all():
    train = EpochSampler(53, shuffle=True, seed=0, batch_size=10)
    assert len(train) == 5 and len(set(_indices(train))) == 50 and train.num_batches == 5
    evaluation = EpochSampler(53, shuffle=False, seed=0, batch_size=10)
    assert _indices(evaluation) == list(range(53)) and evaluation.num_batches == len(evaluation) == 6


def test_start_batch_gives_the_tail_of_the_epoch():
    full = _indices(EpochSampler(60, shuffle=True, seed=1, batch_size=8, epoch=2))
    resumed = EpochSampler(60, shuffle=True, seed=1, batch_size=8, epoch=2, start_batch=3)
    assert _indices(resumed) == full[24:56] and len(resumed) == 4
    resumed.set_epoch(3)  # the next epoch starts at its beginning
    assert len(_indices(resumed)) == 56


@pytest.mark.parametrize("shuffle", [True, False])
def test_global_batches_do_not_depend_on_world_size(shuffle):
    n, batch = 53, 8
    single = _indices(EpochSampler(n, shuffle=shuffle, seed=5, batch_size=batch, epoch=1))
    ranks = [_indices(EpochSampler(n, shuffle=shuffle, seed=5, batch_size=batch, epoch=1, rank=r,
                                   world_size=2)) for r in range(2)]
    full = n // batch
    for b in range(full):
        union = ranks[0][4 * b:4 * b + 4] + ranks[1][4 * b:4 * b + 4]
        assert union == single[batch * b:batch * (b + 1)]  # rank 0 holds the first half, rank 1 the second
    if shuffle:
        assert len(single) == full * batch
    else:  # evaluation: the ranks split the last partial batch and cover all n, disjointly
        assert sorted(ranks[0] + ranks[1]) == list(range(n))
        assert len(ranks[0]) == 4 * full + 3 and len(ranks[1]) == 4 * full + 2


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_evaluation_counts_every_image_once_at_any_world_size(world_size):
    # the shipped ImageNet eval_batch_size 250 divides by neither 4 nor 8 (issue 18); 520 images leave
    # a last batch of 20, and 5 images a batch where some ranks get nothing at world size 8
    for n in (520, 5):
        single = [_indices_of(b) for b in EpochSampler(n, shuffle=False, seed=0, batch_size=250)]
        ranks = [[_indices_of(b) for b in EpochSampler(n, shuffle=False, seed=0, batch_size=250, rank=r,
                                                       world_size=world_size)] for r in range(world_size)]
        assert sorted(i for batches in ranks for batch in batches for i in batch) == list(range(n))
        assert all(batch for batches in ranks for batch in batches)  # a rank's empty part is no batch
        for b, batch in enumerate(single):  # each global batch is the ranks' parts, in rank order
            parts = [batches[b] for batches in ranks if b < len(batches)]
            assert [i for part in parts for i in part] == batch
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _indices_of(batch):
    return [index for _, index in batch]


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="not divisible by world_size"):
        EpochSampler(10, shuffle=True, seed=0, batch_size=5, world_size=2)
    with pytest.raises(ValueError, match="start_batch 6"):
        EpochSampler(10, shuffle=True, seed=0, batch_size=2, start_batch=6)


def test_augmentation_depends_only_on_seed_epoch_and_index(small_root):
    dataset = _samples(small_root, mean=torch.zeros(3, CROP, CROP), seed=7)

    def epoch_batches(workers, start_batch, world_size=1, rank=0):
        sampler = EpochSampler(len(dataset), shuffle=True, seed=7, batch_size=4, epoch=1,
                               start_batch=start_batch, world_size=world_size, rank=rank)
        loader = make_loader(dataset, sampler, workers, pin_memory=False,
                             persistent_workers=False)
        return torch.cat([images for images, _ in loader])

    single = epoch_batches(workers=0, start_batch=0)  # 5 batches of 4
    assert single.shape == (20, 3, CROP, CROP)
    torch.testing.assert_close(epoch_batches(workers=2, start_batch=2), single[8:], rtol=0, atol=0)
    rank1 = epoch_batches(workers=1, start_batch=0, world_size=2, rank=1)
    torch.testing.assert_close(rank1, single.view(5, 4, 3, CROP, CROP)[:, 2:].flatten(0, 1), rtol=0, atol=0)


# ---- unreadable files ----------------------------------------------------------------------------

def _plant_broken_files(root, split, folder="n00000001"):
    """One of each BROKEN_FILES case in root/split/folder; returns their paths."""
    paths = []
    for case, (make, _) in sorted(BROKEN_FILES.items()):
        path = root / split / folder / f"broken_{case}.JPEG"
        path.write_bytes(make())
        paths.append(str(path))
    return paths


def _loader(dataset, batch_size, workers=0):
    sampler = EpochSampler(len(dataset), shuffle=dataset.keep_batch_size, seed=0, batch_size=batch_size)
    return sampler, make_loader(dataset, sampler, workers, pin_memory=False, persistent_workers=True)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_skips_broken_files_with_one_warning_each_and_keeps_every_batch_full(root_copy, workers):
    broken = _plant_broken_files(root_copy, "train")  # 21 + 5 images
    dataset = _samples(root_copy, mean=torch.zeros(3, CROP, CROP))
    sampler, loader = _loader(dataset, batch_size=2, workers=workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):  # the second epoch meets them again, silently
            sampler.set_epoch(epoch)
            sizes = [len(targets) for images, targets in loader]
            assert sizes == [2] * 13  # 26 // 2 batches, none short
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert len(messages) == len(broken) and sorted(loader.unreadable.files) == sorted(broken)
    for path, message in zip(sorted(broken), sorted(messages)):
        assert message.startswith(f"skipped unreadable image {path}: ")


def test_a_refilled_slot_repeats_the_batchs_next_readable_sample(root_copy):
    [empty] = [p for p in _plant_broken_files(root_copy, "train") if p.endswith("empty.JPEG")]
    dataset = _samples(root_copy, mean=torch.zeros(3, CROP, CROP))
    index = [path for path, _ in dataset.folder.samples].index(empty)
    keys = [(0, index), (0, 0), (0, 1)]
    images, targets, unreadable = _batch(dataset, keys)
    assert torch.equal(images[0], images[1]) and targets[0] == targets[1] == 0
    assert unreadable == ((empty, "empty file"),)
    assert inet.batch_slots([False, True, True, False], keep_batch_size=True) == [0, 3, 3, 3]
    assert inet.batch_slots([True, False, True], keep_batch_size=True) == [1, 1, 1]
    assert inet.batch_slots([True, False, True], keep_batch_size=False) == [1]


def test_evaluation_drops_broken_files_and_counts_them_once(root_copy):
    broken = _plant_broken_files(root_copy, "val")  # 15 + 5 images
    data = imagenet_sets.imagenet_datasets(root_copy, seed=0, mean_sample_size=3)
    loaders = [_loader(dataset, batch_size=4)[1] for dataset in (data.val, data.val_ten_crop)]
    for loader in loaders:
        loader.unreadable = data.unreadable  # as the pipeline shares it
    with pytest.warns(UnreadableImageWarning) as caught:
        counts = [sum(len(targets) for _, targets in loader) for loader in loaders]
    assert counts == [15, 15] and len(caught) == len(broken) == len(data.unreadable)


def test_a_training_batch_of_broken_files_only_is_a_clear_error(root_copy):
    for path in (root_copy / "train").rglob("*.JPEG"):
        path.write_bytes(b"")
    dataset = _samples(root_copy, mean=torch.zeros(3, CROP, CROP))
    message = r"no image of a training batch is readable \(4 files, e.g. .*: empty file\)"
    with pytest.warns(UnreadableImageWarning), pytest.raises(DataError, match=message):
        next(iter(_loader(dataset, batch_size=4)[1]))


def test_computing_the_mean_image_leaves_the_global_rng_alone(root_copy):
    """A run that computes the mean must start from the same initial weights as one that reads it."""
    state = torch.get_rng_state()
    mean_image(root_copy / "train", sample_size=4, seed=0, cache_dir=root_copy / "cache")
    assert torch.equal(torch.get_rng_state(), state)


def test_the_mean_image_leaves_broken_files_out(root_copy):
    broken = _plant_broken_files(root_copy, "train")
    unreadable = inet.UnreadableImages()
    unreadable.report = lambda message: None
    mean_image(root_copy / "train", sample_size=26, seed=0, unreadable=unreadable)
    assert sorted(unreadable.files) == sorted(broken)
    record = torch.load(root_copy / ".repro-cache" / MEAN_FILE, weights_only=True)
    assert record["images_used"] == 21


def test_decode_path_keeps_auto_on_the_cpu_and_refuses_gpu_without_cuda():
    assert imagenet_sets.decode_path("auto", torch.device("cpu")) == "cpu"
    assert imagenet_sets.decode_path("auto", torch.device("cuda")) == "cpu"  # until measured on a GPU
    assert imagenet_sets.decode_path("cpu", torch.device("cuda")) == "cpu"
    assert imagenet_sets.decode_path("gpu", torch.device("cuda")) == "gpu"
    with pytest.raises(DataError, match="data.decode=gpu .* CUDA device, but this run's device is cpu"):
        imagenet_sets.decode_path("gpu", torch.device("cpu"))
    with pytest.raises(DataError, match="data.decode must be one of auto, cpu, gpu, got 'nvjpeg'"):
        imagenet_sets.decode_path("nvjpeg", None)


# ---- datasets and benchmark ------------------------------------------------------------------

def test_imagenet_datasets(root_copy):
    data = imagenet_sets.imagenet_datasets(root_copy, seed=0, mean_sample_size=3)
    assert data.classes == ["n00000000", "n00000001", "n00000002"] == data.val.classes
    assert len(data.train) == 21 and len(data.val) == len(data.val_ten_crop) == 15
    images, targets, _ = _batch(data.val_ten_crop, [(0, 14)])
    assert images.shape == (1, 10, 3, CROP, CROP) and targets.tolist() == [2]
    assert _batch(data.train, [(0, 0)])[0].shape == _batch(data.val, [(0, 0)])[0].shape == (1, 3, CROP, CROP)
    assert len(data.unreadable) == 0


def test_bench_times_each_path_per_worker_count(small_root, tmp_path):
    path = write_imagenet_bench(small_root, tmp_path, workers=(0, 1), batches=2, batch_size=4, rounds=2,
                                warmup_batches=1)
    frame = pd.read_csv(path)
    assert path.name.startswith("imagenet_data_")
    assert "cpu-torchvision" in available_paths() and "cpu" in available_paths()  # the old and new decoders
    assert list(zip(frame.path, frame.workers)) == [(name, workers) for workers in (0, 1) for name in available_paths()]
    assert (frame.images_per_round == 8).all() and (frame.images_per_s > 0).all()
    assert (frame[frame.path == "reference"].speedup_vs_reference == 1).all()
    assert (frame.workers_for_target >= 1).all()


def test_a_process_that_exits_with_its_persistent_workers_alive_does_not_hang(small_root):
    """Workers ignore stop signals while training runs (Slurm signals every process of a job), yet
    multiprocessing's exit hook stops leftover workers with SIGTERM and waits for them."""
    script = f"""
import torch
from torchvision.datasets import ImageFolder
from repro.data.imagenet import EpochSampler, ImageNetSamples, make_loader, train_plan
dataset = ImageNetSamples(ImageFolder({str(small_root / "train")!r}), train_plan, None, 0, True)
sampler = EpochSampler(len(dataset), shuffle=True, seed=0, batch_size=4)
loader = make_loader(dataset, sampler, workers=2, pin_memory=False, persistent_workers=True)
batches = iter(loader)
next(batches)  # the iterator and its workers are still alive when the interpreter exits
print("exiting", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr


def test_workers_leave_stop_signals_to_the_trainer(small_root):
    sampler, loader = _loader(_samples(small_root), batch_size=3, workers=2)
    batches = iter(loader)
    next(batches)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.kill(worker.pid, sig)
    assert len(list(batches)) == 6  # the rest of the epoch's 21 // 3 batches
    assert all(worker.is_alive() for worker in workers)
