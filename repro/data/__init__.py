"""Data pipelines for the training engine: one per dataset, the same small interface.

A pipeline gives `batches_per_epoch`, `train_batches(epoch, start)` (this process's share of each
global batch, on the device, in an order fixed by the seed and the epoch, so a run resumes exactly
from any batch), `eval_batches()` (this process's share of the test or validation set) and, for
ImageNet, `ten_crop_batches()` and `unreadable` (the image files it skipped, path -> reason).
"""
from __future__ import annotations

from pathlib import Path

import torch

from repro.contract import DATA_ENV, data_root as data_root_rule
from repro.distributed import Processes
from repro.errors import DataError
from repro.hardware import Switches
from repro.spec import Spec


def resolve_data_root(spec: Spec, data_root: str | None) -> Path:
    """`--data`, else the spec's `data.root`, else $REPRO_DATA (contract.data_root)."""
    root = data_root_rule(spec.data.dataset, data_root or spec.data.root)
    if root is None:
        raise DataError(f"no data folder for {spec.name}: pass --data DIR, set data.root in the spec, "
                        f"or export {DATA_ENV}=DIR")
    return root


def _share(tensor: torch.Tensor, processes: Processes) -> torch.Tensor:
    """This process's contiguous slice of a global batch."""
    if not processes.distributed:
        return tensor
    per_process = -(-len(tensor) // processes.world_size)
    return tensor[processes.rank * per_process:(processes.rank + 1) * per_process]


class CifarPipeline:
    def __init__(self, spec: Spec, root: Path, device: torch.device, processes: Processes, switches: Switches):
        from repro.data.cifar import CifarBatches, load_cifar10, pixel_mean, split_validation

        arrays = load_cifar10(root, verify_checksums=spec.data.verify_checksums, download=spec.data.download)
        if spec.data.validation_split:
            arrays = split_validation(arrays)
        mean = pixel_mean(arrays.train_images)
        storage = device if switches.data_on_device else torch.device("cpu")
        self.device, self.processes = device, processes
        layout = {"channels_last": switches.channels_last}
        self.train = CifarBatches(arrays.train_images, arrays.train_labels, mean, spec.optim.batch_size,
                                  train=True, device=storage, seed=spec.seed, **layout)
        self.test = CifarBatches(arrays.test_images, arrays.test_labels, mean, spec.data.eval_batch_size,
                                 train=False, device=storage, seed=spec.seed, **layout)
        self.batches_per_epoch = len(self.train)

    def _on_device(self, batches):
        for x, y in batches:
            yield (_share(x, self.processes).to(self.device, non_blocking=True),
                   _share(y, self.processes).to(self.device, non_blocking=True))

    def train_batches(self, epoch: int, start: int = 0):
        return self._on_device(self.train.batches(epoch, start))

    def eval_batches(self):
        return self._on_device(self.test.batches(0))


class ImageNetPipeline:
    def __init__(self, spec: Spec, root: Path, device: torch.device, processes: Processes, switches: Switches):
        from repro.data.imagenet import EpochSampler, make_loader
        from repro.data.imagenet_sets import imagenet_datasets

        if processes.distributed and not processes.is_main:
            processes.barrier()  # rank 0 computes and caches the mean image first
        data = imagenet_datasets(root, seed=spec.seed, mean_sample_size=spec.data.mean_sample_size,
                                 mean_workers=spec.data.workers, decode=spec.data.decode,
                                 draft_decode=spec.data.draft_decode, ten_crop=spec.eval.ten_crop, device=device)
        if processes.distributed and processes.is_main:
            processes.barrier()
        if len(data.train) < spec.optim.batch_size:  # every epoch drops its partial batch: none would be left
            raise DataError(f"a batch size of {spec.optim.batch_size} does not fit {len(data.train)} training "
                            f"images in {root / 'train'}: lower optim.batch_size or add images")
        self.device, self.channels_last = device, switches.channels_last
        self.unreadable = data.unreadable  # files skipped so far; the trainer logs and counts them
        shard = {"rank": processes.rank, "world_size": processes.world_size}
        loader = {"workers": spec.data.workers, "pin_memory": device.type == "cuda", "unreadable": data.unreadable}

        def loader_for(dataset, shuffle: bool, batch_size: int):
            sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=spec.seed, batch_size=batch_size, **shard)
            return sampler, make_loader(dataset, sampler, persistent_workers=shuffle, **loader)

        self.train_sampler, self.train = loader_for(data.train, True, spec.optim.batch_size)
        self.batches_per_epoch = self.train_sampler.num_batches
        self.val = loader_for(data.val, False, spec.data.eval_batch_size)[1]
        self.ten_crop = loader_for(data.val_ten_crop, False, spec.data.eval_batch_size)[1]

    def _on_device(self, batches):
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            yield (x.contiguous(memory_format=layout) if x.dim() == 4 else x), y.to(self.device, non_blocking=True)

    def train_batches(self, epoch: int, start: int = 0):
        self.train_sampler.set_epoch(epoch, start)
        return self._on_device(self.train)

    def eval_batches(self):
        return self._on_device(self.val)

    def ten_crop_batches(self):
        return self._on_device(self.ten_crop)


def build_pipeline(spec: Spec, data_root: str | None, device: torch.device, processes: Processes,
                   switches: Switches):
    root = resolve_data_root(spec, data_root)
    pipeline = CifarPipeline if spec.data.dataset == "cifar10" else ImageNetPipeline
    return pipeline(spec, root, device, processes, switches)
