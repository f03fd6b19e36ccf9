"""CIFAR-10 reading, the generated stand-in, and the augmentation of Sec. 4.2 with its statistics."""
import hashlib
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repro.data import cifar
from repro.data.cifar import (CIFAR_DIRNAME, CifarArrays, CifarBatches, augment, crop_flip_params, load_cifar10,
                              normalize, pixel_mean, split_validation)
from repro.data.generated import write_cifar10
from repro.errors import DataError

N_TRAIN, N_TEST = 503, 100  # 503 does not split evenly over five batches


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are small: extra intra-op threads only wait for each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=N_TRAIN, n_test=N_TEST, seed=3)


@pytest.fixture(scope="module")
def arrays(folder):
    return load_cifar10(folder, verify_checksums=False)


def unpickle(path):
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")  # how the CIFAR page says to read its files


# ---- files and loading -----------------------------------------------------------------------

def test_generated_files_have_the_real_layout(folder):
    assert folder.name == CIFAR_DIRNAME
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])
    sizes = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = unpickle(folder / name)
        assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert isinstance(batch[b"batch_label"], bytes)
        assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (len(batch[b"labels"]), 3072)
        assert all(isinstance(label, int) and 0 <= label <= 9 for label in batch[b"labels"])
        assert len(batch[b"filenames"]) == len(batch[b"labels"]) and isinstance(batch[b"filenames"][0], bytes)
        sizes.append(len(batch[b"labels"]))
    assert sizes == [101, 101, 101, 100, 100, N_TEST]
    meta = unpickle(folder / "batches.meta")
    assert len(meta[b"label_names"]) == 10 and meta[b"num_vis"] == 3072 and meta[b"num_cases_per_batch"] == 101


def test_round_trip_from_either_folder(folder, arrays):
    assert arrays.train_images.shape == (N_TRAIN, 3, 32, 32) and arrays.train_images.dtype == torch.uint8
    assert arrays.test_images.shape == (N_TEST, 3, 32, 32) and arrays.test_images.dtype == torch.uint8
    assert arrays.train_labels.dtype == arrays.test_labels.dtype == torch.int64
    assert torch.bincount(arrays.test_labels).tolist() == [10] * 10  # balanced, like CIFAR-10
    first = unpickle(folder / "data_batch_1")
    last = unpickle(folder / "data_batch_5")
    assert arrays.train_labels[:101].tolist() == first[b"labels"]
    assert arrays.train_labels[-100:].tolist() == last[b"labels"]
    # each row holds the R, G and B planes, each row-major, as in the real files
    assert torch.equal(arrays.train_images[0].flatten(), torch.from_numpy(first[b"data"][0]))
    assert torch.equal(arrays.train_images[0, 1, 2, 3], torch.tensor(first[b"data"][0][1024 + 2 * 32 + 3]))
    from_parent = load_cifar10(folder.parent, verify_checksums=False)
    assert torch.equal(from_parent.train_images, arrays.train_images)


def test_write_cifar10_is_seeded(folder, tmp_path):
    again = write_cifar10(tmp_path / "again", n_train=N_TRAIN, n_test=N_TEST, seed=3)
    other = write_cifar10(tmp_path / "other", n_train=N_TRAIN, n_test=N_TEST, seed=4)
    assert (again / "data_batch_3").read_bytes() == (folder / "data_batch_3").read_bytes()
    assert (other / "data_batch_3").read_bytes() != (folder / "data_batch_3").read_bytes()


def test_checksums_reject_a_non_canonical_copy(folder):
    with pytest.raises(DataError, match=r"data_batch_1 differs .* set data\.verify_checksums: false"):
        load_cifar10(folder)


def test_matching_checksums_are_accepted(folder, monkeypatch):
    for name in cifar.CHECKSUMS:
        monkeypatch.setitem(cifar.CHECKSUMS, name, hashlib.md5((folder / name).read_bytes()).hexdigest())
    assert len(load_cifar10(folder).train_labels) == N_TRAIN


def test_missing_data_names_the_paths_and_how_to_get_it(folder, tmp_path):
    with pytest.raises(DataError, match="no folder") as error:
        load_cifar10(tmp_path / "nowhere", verify_checksums=False)
    message = str(error.value)
    assert str(tmp_path / "nowhere" / CIFAR_DIRNAME) in message and "python version" in message
    assert "data.download: true" in message and "repro make-data cifar10 --out DIR" in message

    copy = tmp_path / CIFAR_DIRNAME
    copy.mkdir()
    (copy / "data_batch_1").write_bytes((folder / "data_batch_1").read_bytes())
    with pytest.raises(DataError, match=f"{copy} lacks data_batch_2, .*test_batch"):
        load_cifar10(copy, verify_checksums=False)


def a_copy(folder, tmp_path):
    copy = tmp_path / CIFAR_DIRNAME
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def test_a_corrupt_batch_is_a_data_error(folder, tmp_path):
    copy = a_copy(folder, tmp_path)
    (copy / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch is not a CIFAR-10 python batch"):
        load_cifar10(copy, verify_checksums=False)


def rewrite_batch(path, key, change):
    batch = unpickle(path)
    batch[key] = change(batch[key])
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)


@pytest.mark.parametrize("key, change, message", [
    (b"data", lambda data: data / 255, "b'data' holds float64 values"),  # a rescaled copy
    (b"data", lambda data: data.astype(np.int16) + 100, "b'data' holds values from 100 to 355"),
    (b"labels", lambda labels: [label + 0.5 for label in labels], "b'labels' holds float64 values"),
    (b"labels", lambda labels: [label + 10 for label in labels], "b'labels' holds values from 10 to 19"),
], ids=["float_pixels", "pixels_over_255", "float_labels", "labels_over_9"])
def test_values_a_cast_would_change_are_refused(folder, tmp_path, key, change, message):
    copy = a_copy(folder, tmp_path)
    rewrite_batch(copy / "data_batch_2", key, change)
    with pytest.raises(DataError, match=re.escape(f"{copy / 'data_batch_2'}: {message}; a CIFAR-10 batch holds")):
        load_cifar10(copy, verify_checksums=False)


def test_wider_integers_in_range_load_as_the_same_images(folder, arrays, tmp_path):
    copy = a_copy(folder, tmp_path)
    rewrite_batch(copy / "data_batch_2", b"data", lambda data: data.astype(np.int64))
    assert torch.equal(load_cifar10(copy, verify_checksums=False).train_images, arrays.train_images)


def test_validation_split_is_45k_5k_disjoint_and_seeded():
    ids = torch.arange(50_000)  # images identified by their index
    arrays = CifarArrays(ids[:, None], ids, ids[:10, None], ids[:10])
    split = split_validation(arrays)
    assert len(split.train_labels) == 45_000 and len(split.test_labels) == 5_000
    assert torch.equal(split.train_images[:, 0], split.train_labels)  # images stay with their labels
    assert torch.equal(torch.cat([split.train_labels, split.test_labels]).sort().values, ids)
    assert torch.equal(split_validation(arrays).test_labels, split.test_labels)
    assert not torch.equal(split_validation(arrays, seed=1).test_labels, split.test_labels)
    with pytest.raises(DataError, match="validation split of 50000"):
        split_validation(arrays, val_size=50_000)


# ---- normalisation and augmentation ---------------------------------------------------------

def test_pixel_mean_is_the_mean_image_on_the_unit_scale(arrays):
    mean = pixel_mean(arrays.train_images)
    assert mean.shape == (3, 32, 32) and mean.dtype == torch.float32
    assert torch.allclose(mean, arrays.train_images.double().mean(0).div(255).float())
    assert torch.equal(normalize(arrays.train_images[:2], mean), arrays.train_images[:2] / 255 - mean)


def reference_augment(images, mean, dx, dy, flip):
    """Pad the normalised images with zeros, slice each crop, flip: the definition, step by step."""
    padded = F.pad(normalize(images, mean), (4, 4, 4, 4))
    crops = [padded[i, :, y:y + 32, x:x + 32] for i, (x, y) in enumerate(zip(dx.tolist(), dy.tolist()))]
    return torch.stack([torch.flip(crop, [2]) if f else crop for crop, f in zip(crops, flip.tolist())])


def all_crops():
    """The 162 (dx, dy, flip) triples."""
    dx, dy, flip = (t.flatten() for t in torch.meshgrid(torch.arange(9), torch.arange(9), torch.arange(2),
                                                         indexing="ij"))
    return dx, dy, flip.bool()


def test_augment_equals_pad_crop_flip(arrays):
    mean = pixel_mean(arrays.train_images)
    # every offset and flip once, then random ones
    dx, dy, flip = all_crops()
    images = arrays.train_images[torch.arange(162) % N_TRAIN]
    assert torch.equal(augment(images, mean, dx, dy, flip), reference_augment(images, mean, dx, dy, flip))
    dx, dy, flip = crop_flip_params(64, torch.Generator().manual_seed(0))
    images = arrays.train_images[:64]
    assert torch.equal(augment(images, mean, dx, dy, flip), reference_augment(images, mean, dx, dy, flip))
    # the centre crop unflipped is the normalised image; a corner crop has 4 rows of padding (zeros)
    assert torch.equal(augment(images, mean, torch.full((64,), 4), torch.full((64,), 4), torch.zeros(64, dtype=bool)),
                       normalize(images, mean))
    corner = augment(images[:1], mean, torch.tensor([0]), torch.tensor([0]), torch.tensor([True]))
    assert torch.equal(corner[0, :, :4, :], torch.zeros(3, 4, 32)) and corner[0, :, 4:, :28].abs().sum() > 0


def chi_square_p(counts: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test that all cells of `counts` are equally likely."""
    counts = counts.double().flatten()
    expected = counts.sum() / counts.numel()
    statistic = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((counts.numel() - 1) / 2.0), statistic / 2).item()


P = 1e-3  # reject "equally likely" below this p; the seeds are fixed, so each test is deterministic
SAMPLES = 81 * 2 * 200  # 200 expected per (dx, dy, flip) cell


def cells(dx, dy, flip):
    return (dx * 9 + dy) * 2 + flip.long()


def test_every_offset_and_flip_is_equally_likely_and_independent():
    dx, dy, flip = crop_flip_params(SAMPLES, torch.Generator().manual_seed(1))
    assert int(dx.min()) == int(dy.min()) == 0 and int(dx.max()) == int(dy.max()) == 8
    assert chi_square_p(torch.bincount(dx, minlength=9)) > P
    assert chi_square_p(torch.bincount(dy, minlength=9)) > P
    assert chi_square_p(torch.bincount(flip.long(), minlength=2)) > P
    # the joint law is uniform on the 162 cells: the marginals are uniform and independent
    assert chi_square_p(torch.bincount(cells(dx, dy, flip), minlength=162)) > P


def test_consecutive_samples_are_independent():
    dx, dy, flip = crop_flip_params(SAMPLES, torch.Generator().manual_seed(2))
    for values, k in ((dx, 9), (dy, 9), (flip.long(), 2)):
        pairs = values[:-1] * k + values[1:]
        assert chi_square_p(torch.bincount(pairs, minlength=k * k)) > P
    for values in (dx, dy, flip):
        series = values.double()
        assert abs(torch.corrcoef(torch.stack([series[:-1], series[1:]]))[0, 1].item()) < 4 / SAMPLES ** 0.5


def test_the_chi_square_check_catches_a_biased_sampler():
    generator = torch.Generator().manual_seed(1)
    never_eight = torch.randint(0, 8, (SAMPLES,), generator=generator)  # an off-by-one in the offset range
    assert chi_square_p(torch.bincount(never_eight, minlength=9)) < P
    dx, dy, _ = crop_flip_params(SAMPLES, generator)
    assert chi_square_p(torch.bincount(cells(dx, dy, dx % 2 == 0), minlength=162)) < P  # flip tied to dx


# ---- the loader ------------------------------------------------------------------------------

def test_training_epochs_are_seeded_permutations(arrays):
    mean = pixel_mean(arrays.train_images)
    ids = torch.arange(N_TRAIN)  # labels that name each image, to see the order
    loader = CifarBatches(arrays.train_images, ids, mean, 64, train=True, device="cpu", seed=5)
    assert len(loader) == 7  # 503 // 64: the partial batch is dropped
    epoch0 = list(loader.batches(0))
    assert [len(y) for _, y in epoch0] == [64] * 7 and all(x.shape == (64, 3, 32, 32) for x, _ in epoch0)
    order0 = torch.cat([y for _, y in epoch0])
    assert len(set(order0.tolist())) == 448  # each image at most once; 55 dropped this epoch
    order1 = torch.cat([y for _, y in loader.batches(1)])
    assert len(set(order1.tolist())) == 448 and not torch.equal(order0, order1)
    same_seed = CifarBatches(arrays.train_images, ids, mean, 64, train=True, device="cpu", seed=5)
    assert torch.equal(torch.cat([y for _, y in same_seed.batches(0)]), order0)
    other_seed = CifarBatches(arrays.train_images, ids, mean, 64, train=True, device="cpu", seed=6)
    assert not torch.equal(torch.cat([y for _, y in other_seed.batches(0)]), order0)
    # a full permutation when the batch divides the set
    whole = CifarBatches(arrays.train_images[:500], ids[:500], mean, 50, train=True, device="cpu", seed=5)
    assert torch.equal(torch.cat([y for _, y in whole.batches(3)]).sort().values, ids[:500])


def test_a_resumed_epoch_yields_exactly_the_remaining_batches(arrays):
    mean = pixel_mean(arrays.train_images)
    loader = CifarBatches(arrays.train_images, arrays.train_labels, mean, 64, train=True, device="cpu", seed=5)
    full = list(loader.batches(2))
    resumed = CifarBatches(arrays.train_images, arrays.train_labels, mean, 64, train=True, device="cpu", seed=5)
    tail = list(resumed.batches(2, start=4))
    assert len(tail) == 3
    for (x, y), (x_full, y_full) in zip(tail, full[4:]):
        assert torch.equal(x, x_full) and torch.equal(y, y_full)
    assert list(loader.batches(2, start=len(loader))) == []


def test_training_images_are_pad_crop_flips_of_their_source(arrays):
    mean = pixel_mean(arrays.train_images)
    ids = torch.arange(N_TRAIN)
    loader = CifarBatches(arrays.train_images, ids, mean, 32, train=True, device="cpu", seed=0)
    x, y = next(iter(loader.batches(0)))
    dx, dy, flip = all_crops()
    used = set()
    for sample, index in zip(x, y.tolist()):
        candidates = augment(arrays.train_images[index].expand(162, -1, -1, -1), mean, dx, dy, flip)
        matches = (candidates == sample).flatten(1).all(1).nonzero().flatten().tolist()
        assert matches, f"training sample of image {index} is no crop/flip of it"
        used.add(matches[0])
    assert len(used) > 16  # 32 draws from 162 crops: the crops vary
    x_next_epoch = next(iter(loader.batches(1)))[0]
    assert not torch.equal(x, x_next_epoch)


def test_evaluation_batches_are_the_plain_images_in_order(arrays):
    mean = pixel_mean(arrays.train_images)
    loader = CifarBatches(arrays.test_images, arrays.test_labels, mean, 30, train=False, device="cpu",
                          channels_last=True)
    batches = list(loader.batches(0))
    assert len(loader) == len(batches) == 4 and len(batches[-1][1]) == 10  # the partial batch kept
    assert torch.equal(torch.cat([x for x, _ in batches]), normalize(arrays.test_images, mean))
    assert torch.equal(torch.cat([y for _, y in batches]), arrays.test_labels)
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(torch.cat([x for x, _ in loader.batches(7)]), torch.cat([x for x, _ in batches]))


def test_a_batch_larger_than_the_training_set_is_a_data_error(arrays):
    mean = pixel_mean(arrays.train_images)
    with pytest.raises(DataError, match="batch size of 1000"):
        CifarBatches(arrays.train_images, arrays.train_labels, mean, 1000, train=True, device="cpu")


# ---- repro make-data -------------------------------------------------------------------------

def make_data(*arguments: str) -> int:
    """`repro make-data ...` in this process: its exit code, argparse's refusals included."""
    from repro.cli import main

    try:
        return main(["make-data", *arguments])
    except SystemExit as stop:
        return stop.code


def test_make_data_never_overwrites_a_dataset_without_force(tmp_path, capsys):
    batch = tmp_path / CIFAR_DIRNAME / "data_batch_1"
    assert make_data("cifar10", "--out", str(tmp_path), "--train", "20", "--test", "10") == 0
    before = batch.read_bytes()
    assert make_data("cifar10", "--out", str(tmp_path), "--train", "20", "--test", "10", "--seed", "1") == 2
    assert f"{tmp_path / CIFAR_DIRNAME} already exists" in capsys.readouterr().err
    assert batch.read_bytes() == before
    assert make_data("cifar10", "--out", str(tmp_path), "--train", "20", "--test", "10", "--seed", "1", "--force") == 0
    assert batch.read_bytes() != before


@pytest.mark.parametrize("arguments, message", [
    (["cifar10", "--train", "-5"], "argument --train: expected a whole number of at least 1, got '-5'"),
    (["cifar10", "--test", "0"], "argument --test: expected a whole number of at least 1"),
    (["imagenet", "--classes", "0"], "argument --classes: expected a whole number of at least 1"),
    (["imagenet", "--val", "2.5"], "argument --val: expected a whole number of at least 1"),
    (["cifar10", "--classes", "3"], "--classes does not apply to cifar10, which takes --train, --test"),
], ids=["negative", "zero", "no_classes", "fraction", "not_an_option"])
def test_make_data_refuses_impossible_counts_and_writes_nothing(tmp_path, capsys, arguments, message):
    assert make_data(*arguments, "--out", str(tmp_path / "out")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
