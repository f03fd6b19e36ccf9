"""The GPU path of the ImageNet pipeline (data.decode=gpu). DataLoader workers only read each file and
plan its sample, with the CPU path's plans (repro/data/imagenet.py), so a (seed, epoch, index) key
draws the same scale, crop, flip and lighting on both paths. The training process decodes each
batch's JPEGs in one call to nvJPEG (torchcodec.decoders.decode_jpeg(device="cuda"), on a side stream:
see stream_safe), then resamples, flips, subtracts the mean and adds the lighting on the GPU, with
the CPU path's functions.

What nvJPEG is not given: files that are not JPEGs (ImageNet has a PNG named .JPEG) and CMYK JPEGs
(22 in ImageNet's training set; nvJPEG's handling of them is untested here) are decoded in the
workers by the CPU path's decoders. A batch nvJPEG refuses is decoded image by image; an image it
refuses goes to the CPU path's decoders, and one that they refuse too is skipped as on the CPU path.

This path has never run on a GPU: data.decode=auto keeps the CPU path (imagenet.decode_path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torchcodec.decoders import decode_jpeg

from repro.data.imagenet import (ImageNetSamples, Plan, Unreadable, UnreadableImage, batch_slots, decode,
                                 read_header, resample)

# Pillow's names of the JPEG colour modes given to nvJPEG: colour (YCbCr, opened as "RGB") and grayscale.
NVJPEG_MODES = ("RGB", "L")


@dataclass
class Encoded:
    """A sample on its way to the device: the file's bytes (`compressed`), or the pixels a worker
    decoded (uint8 [3, H, W]), with its plan. Bytes, not a tensor: a worker sends each tensor of a
    batch through a shared-memory file of its own (a file descriptor for each image), bytes go inside
    the batch's one pickle."""
    path: str
    plan: Plan
    data: bytes | torch.Tensor
    compressed: bool


def stream_safe(decode_batch: Callable[[list], list], files: list, stream: torch.cuda.Stream) -> list:
    """decode_batch(files), CUDA images (or None), safe to use on the current stream while the kernels
    queued there (the previous step's) still run, whatever library decodes. A decoder may take its
    outputs from the caching allocator of the caller's stream but write them from a stream of its own
    (torchvision's does: pytorch/vision PR 9606); memory freed on the current stream is handed out at
    once, though queued kernels may still read it. Here the caller's stream is `stream`, a side stream
    whose memory only these outputs use: record_stream keeps each from being reused until the current
    stream's work on it has finished, and wait_stream orders that work after the decode. A decoder's
    results must be ready on the stream that called it: TorchCodec decodes on that stream, and
    torchvision makes it wait for its own. The side stream also keeps a decoder's stream
    synchronizations (TorchCodec's source has one) from waiting for the training stream's queue."""
    current = torch.cuda.current_stream(stream.device)
    with torch.cuda.stream(stream):
        images = decode_batch(files)
    current.wait_stream(stream)
    for image in images:
        if image is not None:
            image.record_stream(current)
    return images


class EncodedSamples(ImageNetSamples):
    """ImageNetSamples whose workers give Encoded samples, finished into batches on the device by
    finish_batch in the training process (ImageNetLoader): the same batches, up to the decoders' and
    the resampling's rounding, with the same unreadable-file rule."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._decode_stream: torch.cuda.Stream | None = None  # made on first use, in the training process

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_decode_stream": None}  # workers never touch CUDA

    def __getitem__(self, key: tuple[int, int]) -> tuple[Encoded | Unreadable, int]:
        path, target = self.folder.samples[key[1]]
        try:
            data, header, plan = self._read(path, key)
            if header.format == "JPEG" and header.mode in NVJPEG_MODES:
                return Encoded(path, plan, data, True), target
            return Encoded(path, plan, decode(data, header, plan.resized, self.draft_decode), False), target
        except UnreadableImage as error:
            return Unreadable(path, str(error)), target

    def collate(self, samples: list) -> tuple[list, list[int]]:
        return [sample for sample, _ in samples], [target for _, target in samples]  # sizes differ: no stacking

    def _nvjpeg(self, contents: list[bytes]) -> list[torch.Tensor | None]:
        """The files decoded on the device, stream-safe on a CUDA device (stream_safe)."""
        if not contents:
            return []
        files = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in contents]
        if self.device.type != "cuda":  # the CPU tests of this path
            return self._decode_all(files)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        return stream_safe(self._decode_all, files, self._decode_stream)

    def _decode_all(self, files: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The files decoded on the device in one batch, or one by one when the batch fails (None: refused)."""
        try:
            return decode_jpeg(files, mode="RGB", device=self.device)
        except RuntimeError:  # one damaged file fails the whole call
            images = []
            for file in files:
                try:
                    images.append(decode_jpeg(file, mode="RGB", device=self.device))
                except RuntimeError:
                    images.append(None)
            return images

    def _on_device(self, samples: list) -> list:
        """Each Encoded sample as its pixels on the device (uint8 [3, H, W]), or Unreadable."""
        compressed = [i for i, sample in enumerate(samples) if isinstance(sample, Encoded) and sample.compressed]
        decoded = dict(zip(compressed, self._nvjpeg([samples[i].data for i in compressed])))
        pixels = []
        for i, sample in enumerate(samples):
            if isinstance(sample, Unreadable):
                pixels.append(sample)
            elif not sample.compressed:
                pixels.append(sample.data.to(self.device, non_blocking=True))
            elif decoded[i] is not None:
                pixels.append(decoded[i])
            else:  # refused by nvJPEG: the CPU path's decoders try
                try:
                    pixels.append(decode(sample.data, read_header(sample.data), sample.plan.resized,
                                         self.draft_decode).to(self.device))
                except UnreadableImage as error:
                    pixels.append(Unreadable(sample.path, f"nvJPEG refused it; {error}"))
        return pixels

    def finish_batch(self, batch: tuple[list, list[int]]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(images, targets, unreadable) on the device, as ImageNetSamples.finish_batch gives them."""
        samples, targets = batch
        pixels = self._on_device(samples)
        flags = [isinstance(p, Unreadable) for p in pixels]
        unreadable = tuple((p.path, p.reason) for p in pixels if isinstance(p, Unreadable))
        slots = batch_slots(flags, self.keep_batch_size)
        labels = torch.tensor([targets[i] for i in slots]).to(self.device, non_blocking=True)
        if not slots:
            return torch.empty(0, device=self.device), labels, unreadable
        crops = {i: resample(pixels[i], samples[i].plan) for i in set(slots)}  # a refilled slot reuses them
        images = torch.stack([crops[i] for i in slots])
        images = images[:, 0] if images.shape[1] == 1 else images  # [B, 3, S, S], or [B, 10, 3, S, S]
        alphas = [samples[i].plan.alpha for i in slots]
        lighting = torch.tensor(alphas) if alphas[0] is not None else None
        return self.normalized(images, lighting), labels, unreadable
