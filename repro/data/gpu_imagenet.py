"""The GPU path of the ImageNet pipeline (data.decode=gpu). DataLoader workers only read each file and
plan its sample, with the CPU path's plans (repro/data/imagenet.py), so a (seed, epoch, index) key
draws the same scale, crop, flip and lighting on both paths. The training process decodes each
batch's JPEGs in one call to nvJPEG (torchvision.io.decode_jpeg(device="cuda")), then resamples,
flips, subtracts the mean and adds the lighting on the GPU, with the CPU path's functions.

What nvJPEG is not given: files that are not JPEGs (ImageNet has a PNG named .JPEG) and CMYK JPEGs
(22 in ImageNet's training set; nvJPEG's handling of them is untested here) are decoded in the
workers by the CPU path's decoders. A batch nvJPEG refuses is decoded image by image; an image it
refuses goes to the CPU path's decoders, and one that they refuse too is skipped as on the CPU path.

This path has never run on a GPU: data.decode=auto keeps the CPU path (imagenet.decode_path).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from repro.data.imagenet import (ImageNetSamples, Plan, Unreadable, UnreadableImage, batch_slots, decode,
                                 read_header, resample)

# Pillow's names of the JPEG colour modes given to nvJPEG: colour (YCbCr, opened as "RGB") and grayscale.
NVJPEG_MODES = ("RGB", "L")


@dataclass
class Encoded:
    """A sample on its way to the device: the file's bytes (uint8 [n], `compressed`), or the pixels a
    worker decoded (uint8 [3, H, W]), with its plan."""
    path: str
    plan: Plan
    data: torch.Tensor
    compressed: bool


class EncodedSamples(ImageNetSamples):
    """ImageNetSamples whose workers give Encoded samples, finished into batches on the device by
    finish_batch in the training process (ImageNetLoader): the same batches, up to the decoders' and
    the resampling's rounding, with the same unreadable-file rule."""

    def __getitem__(self, key: tuple[int, int]) -> tuple[Encoded | Unreadable, int]:
        path, target = self.folder.samples[key[1]]
        try:
            data, header, plan = self._read(path, key)
            if header.format == "JPEG" and header.mode in NVJPEG_MODES:
                return Encoded(path, plan, torch.frombuffer(bytearray(data), dtype=torch.uint8), True), target
            return Encoded(path, plan, decode(data, header, plan.resized, self.draft_decode), False), target
        except UnreadableImage as error:
            return Unreadable(path, str(error)), target

    def collate(self, samples: list) -> tuple[list, list[int]]:
        return [sample for sample, _ in samples], [target for _, target in samples]  # sizes differ: no stacking

    def _nvjpeg(self, files: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The files decoded on the device in one batch, or one by one when the batch fails (None: refused)."""
        if not files:
            return []
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec's; they still work (README).
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one damaged file fails the whole call
                images = []
                for file in files:
                    try:
                        images.append(decode_jpeg(file, mode=ImageReadMode.RGB, device=self.device))
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
                data = sample.data.numpy().tobytes()
                try:
                    pixels.append(decode(data, read_header(data), sample.plan.resized, self.draft_decode).to(self.device))
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
