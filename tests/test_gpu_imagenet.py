"""The GPU path of the ImageNet pipeline (data.decode=gpu). Its code runs on the CPU too, with
device="cpu" tensors (TorchCodec's batched decode_jpeg then runs libjpeg-turbo): those tests run
everywhere; the ones that need nvJPEG skip without CUDA."""
import shutil
import warnings

import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from repro.data import gpu_imagenet
from repro.data import imagenet as inet
from repro.data import imagenet_sets
from repro.data.generated import write_imagenet
from repro.data.gpu_imagenet import Encoded, EncodedSamples, stream_safe
from repro.data.imagenet import (CROP, EpochSampler, ImageNetSamples, UnreadableImageWarning, center_plan,
                                 make_loader, ten_crop_plan, train_plan)

SMALL = {"classes": 3, "n_train": 7, "n_val": 5, "short_side": (40, 80)}  # with L and CMYK JPEGs


def needs_cuda(test):  # marked gpu: `pytest -m gpu` runs every GPU test (repro check --acceptance)
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs a CUDA device")
    return pytest.mark.gpu(skip(test))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("imagenet"), **SMALL)


def _both_paths(root, plan, keep_batch_size, device="cpu"):
    folder = ImageFolder(str(root / "train"))
    mean = torch.rand(3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    return (ImageNetSamples(folder, plan, mean, 5, keep_batch_size),
            EncodedSamples(folder, plan, mean, 5, keep_batch_size, device=torch.device(device)))


def _batch(dataset, keys):
    return dataset.finish_batch(dataset.collate([dataset[key] for key in keys]))


KEYS = [(epoch, index) for epoch in (0, 3) for index in range(21)]


@pytest.mark.parametrize("plan, keep_batch_size", [(train_plan, True), (center_plan, False),
                                                   (ten_crop_plan, False)])
def test_on_the_cpu_the_gpu_path_makes_the_cpu_paths_batches(small_root, plan, keep_batch_size):
    """The same plans (hence the same draws) and the same functions: the same batches, lighting aside
    (computed for the whole batch at once, it may round differently)."""
    cpu, gpu = _both_paths(small_root, plan, keep_batch_size)
    expected, got = _batch(cpu, KEYS), _batch(gpu, KEYS)
    assert got[0].shape == expected[0].shape and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)


def test_workers_send_jpeg_bytes_and_decode_the_rest(small_root, tmp_path):
    root = shutil.copytree(small_root, tmp_path / "imagenet")
    png = root / "train" / "n00000000" / "disguised.JPEG"
    Image.open(root / "train" / "n00000000" / "n00000000_train_0.JPEG").save(png, format="PNG")
    _, gpu = _both_paths(root, train_plan, True)
    modes = {}
    for index, (path, _) in enumerate(gpu.folder.samples):
        sample, _ = gpu[(0, index)]
        with Image.open(path) as image:
            modes.setdefault((image.format, image.mode), set()).add(sample.compressed)
        if not sample.compressed:
            assert sample.data.dim() == 3 and sample.data.dtype == torch.uint8  # decoded pixels
        else:  # the file's bytes, which a worker sends inside the batch's pickle, not as a shared-memory tensor
            assert type(sample.data) is bytes and sample.data == open(path, "rb").read()
    assert modes == {("JPEG", "RGB"): {True}, ("JPEG", "L"): {True}, ("JPEG", "CMYK"): {False},
                     ("PNG", "RGB"): {False}}


def test_the_gpu_path_does_not_warn_of_torchvisions_deprecated_decoders(small_root):
    _, gpu = _both_paths(small_root, train_plan, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _batch(gpu, KEYS)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_a_batch_nvjpeg_refuses_is_decoded_by_the_cpu_decoders(small_root, monkeypatch):
    cpu, gpu = _both_paths(small_root, center_plan, False)
    expected = _batch(cpu, KEYS[:8])

    def refuse(*args, **kwargs):
        raise RuntimeError("simulated nvJPEG failure")

    monkeypatch.setattr(gpu_imagenet, "decode_jpeg", refuse)
    got = _batch(gpu, KEYS[:8])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[2] == ()


@pytest.mark.parametrize("keep_batch_size", [True, False])
def test_broken_files_are_skipped_as_on_the_cpu_path(small_root, tmp_path, keep_batch_size):
    root = shutil.copytree(small_root, tmp_path / "imagenet")
    folder = root / "train" / "n00000002"
    broken = [folder / "empty.JPEG", folder / "random.JPEG", folder / "truncated.JPEG"]
    broken[0].write_bytes(b"")
    broken[1].write_bytes(bytes(range(256)) * 8)
    broken[2].write_bytes((folder / "n00000002_train_0.JPEG").read_bytes()[:1000])
    _, gpu = _both_paths(root, train_plan if keep_batch_size else center_plan, keep_batch_size)
    sampler = EpochSampler(len(gpu), shuffle=keep_batch_size, seed=0, batch_size=4)  # 24 images
    loader = make_loader(gpu, sampler, workers=1, pin_memory=False, persistent_workers=False)
    with pytest.warns(UnreadableImageWarning) as caught:
        sizes = [len(targets) for _, targets in loader]
    if keep_batch_size:
        assert sizes == [4] * 6  # slots refilled
    else:
        assert len(sizes) == 6 and sum(sizes) == 21  # the three left out
    assert sorted(loader.unreadable.files) == sorted(map(str, broken)) and len(caught) == 3


def test_decode_gpu_needs_cuda(small_root):
    with pytest.raises(inet.DataError, match="data.decode=gpu"):
        imagenet_sets.imagenet_datasets(small_root, seed=0, mean_sample_size=2, decode="gpu", device="cpu")


# ---- on a CUDA device ------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("plan, keep_batch_size", [(train_plan, True), (ten_crop_plan, False)])
def test_nvjpeg_batches_match_the_cpu_path(small_root, plan, keep_batch_size):
    """nvJPEG and CUDA's float resampling round differently from libjpeg-turbo and the CPU's uint8
    kernel: within 3 grey levels on average."""
    cpu, gpu = _both_paths(small_root, plan, keep_batch_size, device="cuda")
    expected, got = _batch(cpu, KEYS), _batch(gpu, KEYS)
    assert got[0].is_cuda and got[1].is_cuda and got[0].shape == expected[0].shape
    assert torch.equal(got[1].cpu(), expected[1])
    assert (got[0].cpu() - expected[0]).abs().mean() < 3 / 255


@needs_cuda
def test_imagenet_datasets_on_the_gpu_path(small_root, tmp_path):
    root = shutil.copytree(small_root, tmp_path / "imagenet")
    data = imagenet_sets.imagenet_datasets(root, seed=0, mean_sample_size=3, decode="gpu", device="cuda")
    sampler = EpochSampler(len(data.train), shuffle=True, seed=0, batch_size=4)
    loader = make_loader(data.train, sampler, workers=1, pin_memory=True, persistent_workers=False,
                         unreadable=data.unreadable)
    images, targets = next(iter(loader))
    assert images.is_cuda and images.shape == (4, 3, CROP, CROP) and targets.is_cuda
    assert isinstance(data.train[(0, 0)][0], Encoded)


# Cycles of torch.cuda._sleep that hold a reduction queued while a decode runs: about half a second on
# a GPU at 2 GHz, against the milliseconds a decode of a few small JPEGs takes.
SLEEP_CYCLES = 1_000_000_000


def _sums_queued_across(decode, files, sizes):
    """Sums of all-ones blocks of `sizes` bytes, queued behind a GPU sleep, the blocks freed (so the
    current stream's allocator hands their memory out again at once), then decode(files): the sums,
    which equal `sizes` unless the decode wrote into the memory the reduction still read, and the
    images, on the CPU."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # fresh memory for the blocks: freed, it is the best fit for the same sizes
    blocks = [torch.ones(size, dtype=torch.uint8, device="cuda") for size in sizes]
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    sums = torch.stack([block.sum() for block in blocks])
    del blocks
    images = decode(files)
    return sums.tolist(), [image.cpu() for image in images]


def _writing_from_its_own_stream(sources):
    """A decoder with the flaw of torchvision's (pytorch/vision PR 9606): its outputs come from the
    caller's stream's allocator, but it writes them (here: copies of `sources`) from a stream of its
    own that does not wait for the caller's; the caller's later work waits for it."""
    writer = torch.cuda.Stream()

    def decode(files):
        outputs = [torch.empty_like(source) for source in sources]
        with torch.cuda.stream(writer):
            for output, source in zip(outputs, sources):
                output.copy_(source)
        torch.cuda.current_stream().wait_stream(writer)
        return outputs
    return decode


def _jpegs_and_their_pixels(small_root):
    _, gpu = _both_paths(small_root, center_plan, False, device="cuda")
    files = [sample.data for sample, _ in (gpu[key] for key in KEYS[:8]) if sample.compressed]
    pixels = gpu._nvjpeg(files)  # also starts nvJPEG, before any sleep is queued
    torch.cuda.synchronize()
    return gpu, files, pixels


@needs_cuda
def test_the_check_below_catches_a_decoder_that_writes_from_its_own_stream(small_root):
    """Called as is, such a decoder overwrites memory a queued reduction still reads: the sums or the
    images come out wrong. So the stream-safety test below can fail."""
    _, files, pixels = _jpegs_and_their_pixels(small_root)
    sizes = [image.numel() for image in pixels]
    sums, images = _sums_queued_across(_writing_from_its_own_stream(pixels), files, sizes)
    assert sums != sizes or not all(torch.equal(a, b.cpu()) for a, b in zip(images, pixels))


@needs_cuda
@pytest.mark.parametrize("decoder", ["flawed", "torchcodec"])
def test_a_decode_on_the_gpu_path_leaves_a_queued_reduction_alone(small_root, decoder):
    """stream_safe makes even the flawed decoder above safe; the path decodes through it."""
    gpu, files, pixels = _jpegs_and_their_pixels(small_root)
    if decoder == "flawed":
        side = torch.cuda.Stream()
        flawed = _writing_from_its_own_stream(pixels)
        decode = lambda files: stream_safe(flawed, files, side)  # noqa: E731
    else:
        decode = gpu._nvjpeg
    sizes = [image.numel() for image in pixels]
    sums, images = _sums_queued_across(decode, files, sizes)
    assert sums == sizes
    assert all(torch.equal(a, b.cpu()) for a, b in zip(images, pixels))
