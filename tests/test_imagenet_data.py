"""The ImageNet pipeline of Sec. 3.4 on small generated JPEG folders in ImageNet's layout."""
import os
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as F

from repro.bench_imagenet import write_imagenet_bench
from repro.data import imagenet as inet
from repro.data.imagenet import (CROP, IMAGENET_EIGVAL, IMAGENET_EIGVEC, MEAN_FILE, EpochSampler, Lighting,
                                 ResizeShorterSide, SeededDataset, TenCrop, check_imagenet_root, decode_rgb,
                                 make_loader, mean_image, open_image, train_transform, val_transform,
                                 write_imagenet)
from repro.errors import DataError

SMALL = {"classes": 3, "n_train": 7, "n_val": 5, "short_side": (40, 80)}  # 36 small JPEGs, with L and CMYK


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("imagenet"), **SMALL)


@pytest.fixture
def root_copy(small_root, tmp_path):
    """A private copy to break or write caches into."""
    return shutil.copytree(small_root, tmp_path / "imagenet")


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


def test_every_decoded_image_is_rgb(small_root):
    for path in small_root.rglob("*.JPEG"):
        assert decode_rgb(open_image(path), 32).mode == "RGB"


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


# ---- decoding and transforms -----------------------------------------------------------------

def _noise_image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_uses_a_reduced_jpeg_scale_never_below_the_needed_side(tmp_path, mode):
    path = tmp_path / "big.JPEG"
    _noise_image(1200, 900).convert(mode).save(path)
    for side, expected in [(100, (150, 113)), (256, (600, 450)), (450, (600, 450)), (451, (1200, 900))]:
        image = decode_rgb(open_image(path), side)
        assert image.mode == "RGB" and image.size == expected  # scales 1/8, 1/2, 1/2, 1/1


def test_training_transform_output(small_root):
    path = next((small_root / "train").rglob("*.JPEG"))
    out = train_transform(torch.zeros(3, CROP, CROP))(open_image(path))
    assert out.shape == (3, CROP, CROP) and out.dtype == torch.float32


def test_scale_augmentation_shorter_side_in_256_480():
    resize = ResizeShorterSide(256, 480)
    torch.manual_seed(0)
    sides = []
    for width, height in [(30, 20), (20, 30)] * 100:
        out = resize(_noise_image(width, height))
        sides.append(min(out.size))
        assert max(out.size) == pytest.approx(1.5 * min(out.size), abs=1)  # aspect ratio kept
    assert 256 <= min(sides) < 280 and 456 < max(sides) <= 480  # the whole range is drawn


def test_val_transform_is_the_center_crop_of_the_256_resize():
    image = _noise_image(384, 256)  # shorter side already 256: the resize keeps it unchanged
    out = val_transform(torch.zeros(3, CROP, CROP))(image)
    expected = F.to_tensor(F.crop(image, 16, 80, CROP, CROP))
    torch.testing.assert_close(out, expected)


def test_ten_crop_is_corners_center_and_their_flips():
    image = _noise_image(300, 256)
    mean = torch.rand(3, CROP, CROP)
    out = inet.ten_crop_transform(mean)(image)
    boxes = [(0, 0), (0, 76), (32, 0), (32, 76), (16, 38)]  # (top, left): TL, TR, BL, BR, center
    crops = [F.to_tensor(F.crop(image, top, left, CROP, CROP)) for top, left in boxes]
    expected = torch.stack(crops + [c.flip(-1) for c in crops]) - mean
    assert out.shape == (10, 3, CROP, CROP)
    torch.testing.assert_close(out, expected)
    assert TenCrop(CROP)(image).shape == (10, 3, CROP, CROP)


def test_lighting_with_zero_std_is_identity():
    x = torch.rand(3, 8, 8)
    assert torch.equal(Lighting(0.0)(x), x)


def test_lighting_adds_a_constant_colour_along_the_eigenvectors():
    x = torch.rand(3, 8, 8)
    eigvec, eigval = torch.tensor(IMAGENET_EIGVEC), torch.tensor(IMAGENET_EIGVAL)
    alphas = []
    for seed in range(200):
        torch.manual_seed(seed)
        offset = Lighting(0.1)(x) - x
        torch.testing.assert_close(offset, offset[:, :1, :1].expand_as(offset))  # one colour per image
        weights = torch.linalg.solve(eigvec, offset[:, 0, 0])  # coordinates in the eigenvector basis
        alpha = weights / eigval
        torch.manual_seed(seed)
        torch.testing.assert_close(alpha, torch.randn(3) * 0.1, atol=1e-4, rtol=1e-3)
        alphas.append(alpha)
    assert torch.stack(alphas).std(0) == pytest.approx([0.1] * 3, abs=0.02)


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
    return [index for _, index in sampler]


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    sampler = EpochSampler(50, shuffle=True, seed=3, batch_size=10)
    first = _indices(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert {epoch for epoch, _ in sampler} == {0}
    assert _indices(EpochSampler(50, shuffle=True, seed=3, batch_size=10)) == first
    assert _indices(EpochSampler(50, shuffle=True, seed=4, batch_size=10)) != first
    sampler.set_epoch(1)
    second = _indices(sampler)
    assert sorted(second) == list(range(50)) and second != first
    assert _indices(EpochSampler(50, shuffle=True, seed=3, batch_size=10, epoch=1)) == second


def test_training_drops_the_partial_global_batch_and_evaluation_keeps_all():
    train = EpochSampler(53, shuffle=True, seed=0, batch_size=10)
    assert len(train) == 50 and len(set(_indices(train))) == 50 and train.num_batches == 5
    evaluation = EpochSampler(53, shuffle=False, seed=0, batch_size=10)
    assert _indices(evaluation) == list(range(53)) and evaluation.num_batches == 6


def test_start_batch_gives_the_tail_of_the_epoch():
    full = _indices(EpochSampler(60, shuffle=True, seed=1, batch_size=8, epoch=2))
    resumed = EpochSampler(60, shuffle=True, seed=1, batch_size=8, epoch=2, start_batch=3)
    assert _indices(resumed) == full[24:56] and len(resumed) == 32
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


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="not divisible by world_size"):
        EpochSampler(10, shuffle=True, seed=0, batch_size=5, world_size=2)
    with pytest.raises(ValueError, match="start_batch 6"):
        EpochSampler(10, shuffle=True, seed=0, batch_size=2, start_batch=6)
    sampler = EpochSampler(10, shuffle=True, seed=0, batch_size=4, world_size=2)
    with pytest.raises(ValueError, match="per-rank batch 2"):
        make_loader([], sampler, 4, workers=0, pin_memory=False, persistent_workers=False)


def test_augmentation_depends_only_on_seed_epoch_and_index(small_root):
    folder = ImageFolder(str(small_root / "train"), loader=open_image)
    dataset = SeededDataset(folder, train_transform(torch.zeros(3, CROP, CROP)), seed=7)

    def epoch_batches(workers, start_batch, world_size=1, rank=0):
        sampler = EpochSampler(len(dataset), shuffle=True, seed=7, batch_size=4, epoch=1,
                               start_batch=start_batch, world_size=world_size, rank=rank)
        loader = make_loader(dataset, sampler, 4 // world_size, workers, pin_memory=False,
                             persistent_workers=False)
        return torch.cat([images for images, _ in loader])

    single = epoch_batches(workers=0, start_batch=0)  # 5 batches of 4
    assert single.shape == (20, 3, CROP, CROP)
    torch.testing.assert_close(epoch_batches(workers=2, start_batch=2), single[8:], rtol=0, atol=0)
    rank1 = epoch_batches(workers=1, start_batch=0, world_size=2, rank=1)
    torch.testing.assert_close(rank1, single.view(5, 4, 3, CROP, CROP)[:, 2:].flatten(0, 1), rtol=0, atol=0)
    assert not torch.equal(dataset[(1, 0)][0], dataset[(2, 0)][0])  # a new epoch, a new augmentation


def test_seeded_dataset_leaves_the_global_rng_alone(small_root):
    folder = ImageFolder(str(small_root / "val"), loader=open_image)
    dataset = SeededDataset(folder, train_transform(torch.zeros(3, CROP, CROP)), seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dataset[(0, 0)]
    assert torch.equal(torch.rand(3), expected)


# ---- datasets and benchmark ------------------------------------------------------------------

def test_imagenet_datasets(root_copy):
    data = inet.imagenet_datasets(root_copy, seed=0, mean_sample_size=3)
    assert data.classes == ["n00000000", "n00000001", "n00000002"] == data.val.classes
    assert len(data.train) == 21 and len(data.val) == len(data.val_ten_crop) == 15
    image, target = data.val_ten_crop[(0, 14)]
    assert image.shape == (10, 3, CROP, CROP) and target == 2
    assert data.train[(0, 0)][0].shape == data.val[(0, 0)][0].shape == (3, CROP, CROP)


def test_bench_writes_images_per_second_per_worker_count(small_root, tmp_path):
    path = write_imagenet_bench(small_root, tmp_path, workers=(0, 1), batches=2, batch_size=4,
                                warmup_batches=1)
    frame = pd.read_csv(path)
    assert path.name.startswith("imagenet_data_") and list(frame.workers) == [0, 1]
    assert (frame.images == 8).all() and (frame.images_per_s > 0).all()
    assert (frame.workers_for_target >= 1).all()
