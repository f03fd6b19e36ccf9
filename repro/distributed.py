"""Several processes (torchrun): who we are, collective sums, and BN statistics across processes: synced
(`model.sync_bn`) or over groups of a fixed size (`model.bn_group`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from repro.errors import ReproError


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (in place, returned for chaining)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process when it is True on one (a host sync: call it sparingly)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def launched_processes() -> Processes:
    """Who this process is, as the launcher (torchrun) says in the environment (RANK, LOCAL_RANK,
    WORLD_SIZE); one process where it says nothing. Read before anything else, without joining the
    process group (init_processes), so that a bad setting stops every process at once."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    return Processes(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)


def init_processes(processes: Processes, device: torch.device) -> Processes:
    """Join the process group of `processes` (nothing to join for one): NCCL for a CUDA device, gloo
    otherwise. For NCCL, `device` must already be this process's current device
    (torch.cuda.set_device), and device_id binds the communicator to it: otherwise the collectives
    of init_process_group and of a first barrier run on GPU 0, where every rank would open a
    context, and they can hang where a rank's GPU is not GPU 0."""
    if not processes.distributed or dist.is_initialized():
        return processes
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    except Exception as error:  # a rendezvous that fails should say where it tried
        raise ReproError(f"could not join the process group ({backend} backend, "
                         f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                         f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {error}") from None
    return Processes(dist.get_rank(), processes.local_rank, processes.world_size)


def close_processes(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BN whose training statistics cover the batch of every process, as nn.SyncBatchNorm, which runs
    on GPUs only: this one sums per-channel moments with an autograd-aware all_reduce, so it also
    runs on CPUs (gloo). Only for `model.sync_bn`; the paper's BN is per GPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        totals = dist_fn.all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        centred = x - mean[None, :, None, None]
        # two passes, as BN computes the variance itself: sums of squares would lose precision
        var = dist_fn.all_reduce((centred * centred).sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centred * scale[None, :, None, None] + self.bias[None, :, None, None]


def sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """BN statistics over all processes: nn.SyncBatchNorm on GPUs, CrossProcessBatchNorm2d elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batchnorm(model, lambda bn: CrossProcessBatchNorm2d(bn.num_features, bn.eps, bn.momentum))


def _replace_batchnorm(model: nn.Module, make: Callable[[nn.BatchNorm2d], nn.BatchNorm2d]) -> nn.Module:
    """Every BatchNorm2d of `model` replaced, in place, by make(it) holding its buffers and the same
    parameters: what a fine-tuning strategy trains (requires_grad) stays as it chose."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = make(child)
            replacement.load_state_dict(child.state_dict())
            replacement.weight, replacement.bias = child.weight, child.bias
            setattr(model, name, replacement.to(child.weight.device))
        else:
            _replace_batchnorm(child, make)
    return model


class GroupBatchNorm2d(nn.BatchNorm2d):
    """"Ghost" BN: in training, each group of `group` consecutive images of the batch is normalised with its
    own statistics, as a process holding only that group would; evaluation uses the running statistics as
    BN does. Each step, the running statistics move (momentum) towards the mean over all groups of every
    process of the groups' means and unbiased variances: one all_reduce per layer and step under DDP, so
    that 1 process with 8 groups and 8 processes with 1 group each train the same network, and every
    process holds the same running statistics (DDP's broadcast of rank 0's buffers changes nothing)."""

    def __init__(self, num_features: int, group: int, processes: Processes, eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__(num_features, eps, momentum)
        self.group, self.processes = group, processes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        images, channels = x.shape[:2]
        if images % self.group:
            raise ReproError(f"model.bn_group: a training batch of {images} images per process does not split "
                             f"into groups of {self.group}")
        groups = images // self.group
        # the groups side by side as channels: PyTorch's own BN kernel normalises each (group, channel) alone
        side_by_side = x.reshape(groups, self.group, *x.shape[1:]).transpose(0, 1).reshape(
            self.group, groups * channels, *x.shape[2:])
        mean = torch.zeros(groups * channels, dtype=x.dtype, device=x.device)
        var = torch.ones(groups * channels, dtype=x.dtype, device=x.device)
        y = F.batch_norm(side_by_side, mean, var, self.weight.repeat(groups), self.bias.repeat(groups),
                         training=True, momentum=1.0, eps=self.eps)  # momentum 1: mean, var := the groups'
        with torch.no_grad():
            totals = self.processes.sum(torch.cat([mean.view(groups, channels).sum(0),
                                                   var.view(groups, channels).sum(0)]))
            totals /= groups * self.processes.world_size
            self.num_batches_tracked += 1
            self.running_mean.lerp_(totals[:channels].to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(totals[channels:].to(self.running_var.dtype), self.momentum)
        out = y.reshape(self.group, groups, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return out.contiguous(memory_format=layout)


def group_batchnorm(model: nn.Module, group: int, processes: Processes) -> nn.Module:
    """Every BatchNorm2d of `model` as a GroupBatchNorm2d of `group` images (`model.bn_group`), in place."""
    return _replace_batchnorm(model, lambda bn: GroupBatchNorm2d(bn.num_features, group, processes, bn.eps,
                                                                 bn.momentum))
