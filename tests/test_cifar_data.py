"""CIFAR-10 reading, the generated stand-in, and the augmentation of Sec. 4.2 with its statistics."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repro.data.cifar import (CIFAR_DIRNAME, CifarBatches, augment, crop_flip_params, load_cifar10, normalize,
                              pixel_mean, split_validation, write_cifar10)
from repro.errors import DataError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=500, n_test=100, seed=3)


def test_generated_files_have_the_real_layout(folder):
    assert folder.name == CIFAR_DIRNAME
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])
    with open(folder / "data_batch_1", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (100, 3072)
    assert isinstance(batch[b"labels"], list) and len(batch[b"labels"]) == 100
    with open(folder / "batches.meta", "rb") as handle:
        assert len(pickle.load(handle, encoding="bytes")[b"label_names"]) == 10


def test_round_trip(folder):
    arrays = load_cifar10(folder.parent, verify_checksums=False)
    assert arrays.train_images.shape == (500, 3, 32, 32) and arrays.train_images.dtype == torch.uint8
    assert arrays.test_images.shape == (100, 3, 32, 32) and arrays.test_labels.dtype == torch.int64
    assert set(arrays.train_labels.tolist()) == set(range(10))
    # channel planes R, G, B, each row-major, as in the real files
    with open(folder / "data_batch_1", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")[b"data"][0]
    assert torch.equal(arrays.train_images[0].flatten(), torch.from_numpy(raw))
    assert torch.equal(load_cifar10(folder, verify_checksums=False).test_labels, arrays.test_labels)


def test_checksums_reject_non_canonical_copies_and_missing_data_names_the_path(folder, tmp_path):
    with pytest.raises(DataError, match="verify_checksums: false"):
        load_cifar10(folder.parent)
    with pytest.raises(DataError, match=str(tmp_path / "nowhere" / CIFAR_DIRNAME)):
        load_cifar10(tmp_path / "nowhere", verify_checksums=False)


def test_a_corrupt_batch_is_a_data_error(folder, tmp_path):
    copy = tmp_path / CIFAR_DIRNAME
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch is not a CIFAR-10 python batch"):
        load_cifar10(copy, verify_checksums=False)


def reference_augment(images, mean, dx, dy, flip):
    padded = F.pad(normalize(images, mean), (4, 4, 4, 4))
    out = torch.stack([padded[i, :, y:y + 32, x:x + 32] for i, (x, y) in enumerate(zip(dx.tolist(), dy.tolist()))])
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def test_augment_equals_pad_crop_flip(folder):
    arrays = load_cifar10(folder, verify_checksums=False)
    mean = pixel_mean(arrays.train_images)
    images = arrays.train_images[:64]
    dx, dy, flip = crop_flip_params(64, torch.Generator().manual_seed(0))
    assert torch.equal(augment(images, mean, dx, dy, flip), reference_augment(images, mean, dx, dy, flip))
    # the extreme offsets: the padding is zero in the normalised image
    corner = augment(images[:1], mean, torch.tensor([0]), torch.tensor([0]), torch.tensor([False]))
    assert torch.equal(corner[0, :, :4, :], torch.zeros(3, 4, 32))


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_every_offset_and_flip_is_equally_likely_and_independent():
    n = 81 * 2 * 200
    dx, dy, flip = crop_flip_params(n, torch.Generator().manual_seed(1))
    cells = torch.bincount((dx * 9 + dy) * 2 + flip.long(), minlength=162).double()
    assert cells.min() > 0
    # 161 degrees of freedom: the 0.999 quantile is about 224
    assert chi_square(cells) < 224
    assert chi_square(torch.bincount(dx * 9 + dy, minlength=81).double()) < 124  # 80 dof, 0.999
    assert abs(flip.double().mean().item() - 0.5) < 0.015
    # consecutive samples are not correlated
    for values in (dx.double(), dy.double(), flip.double()):
        assert abs(torch.corrcoef(torch.stack([values[:-1], values[1:]]))[0, 1].item()) < 0.03


def test_training_batches_are_seeded_permutations_resumable_mid_epoch(folder):
    arrays = load_cifar10(folder, verify_checksums=False)
    mean = pixel_mean(arrays.train_images)
    # label each image by its index to see the order
    labels = torch.arange(500)
    loader = CifarBatches(arrays.train_images, labels, mean, 64, train=True, device="cpu", seed=5)
    assert len(loader) == 7  # 500 // 64: the partial batch is dropped
    epoch0 = list(loader.batches(0))
    seen = torch.cat([y for _, y in epoch0])
    assert len(seen) == 448 and len(set(seen.tolist())) == 448
    assert not torch.equal(seen, torch.cat([y for _, y in loader.batches(1)]))
    again = CifarBatches(arrays.train_images, labels, mean, 64, train=True, device="cpu", seed=5)
    tail = list(again.batches(0, start=4))
    assert len(tail) == 3
    for (x, y), (x_ref, y_ref) in zip(tail, epoch0[4:]):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    other_seed = CifarBatches(arrays.train_images, labels, mean, 64, train=True, device="cpu", seed=6)
    assert not torch.equal(next(iter(other_seed.batches(0)))[1], epoch0[0][1])


def test_evaluation_batches_are_the_plain_images_in_order(folder):
    arrays = load_cifar10(folder, verify_checksums=False)
    mean = pixel_mean(arrays.train_images)
    loader = CifarBatches(arrays.test_images, arrays.test_labels, mean, 30, train=False, device="cpu",
                          channels_last=True)
    batches = list(loader.batches(0))
    assert len(loader) == len(batches) == 4
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x, normalize(arrays.test_images, mean))
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_validation_split_is_45k_5k_shaped_and_disjoint(folder):
    arrays = load_cifar10(folder, verify_checksums=False)
    arrays.train_labels = torch.arange(500)  # identify images by index
    split = split_validation(arrays, val_size=50)
    assert len(split.train_labels) == 450 and len(split.test_labels) == 50
    assert not set(split.train_labels.tolist()) & set(split.test_labels.tolist())
    assert torch.equal(split_validation(arrays, val_size=50).test_labels, split.test_labels)
