"""BN statistics as the authors computed them for their released models: after training, a true average
over a sample of training images, not PyTorch's moving averages (momentum 0.1, about the last 10 batches).

Their model README: "the provided mean and variance are strictly computed using average (not moving
average) on a sufficiently large training batch after the training procedure ... Using moving average
might lead to different results." pycls calls this "precise BN" and averages over 8192 images.

The network runs in training mode over the batches, each normalised as in training (its BN groups
included), and each BN layer's input is summed per channel: the mean and the (unbiased) variance over
every image and position of the sample, summed over processes. Its own running statistics are left as
they were: the checkpoint keeps them, so a resume stays exact, and stores these beside them.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repro.contract import PRECISE_BN
from repro.distributed import Processes

STATISTICS = ("running_mean", "running_var")  # the buffers that precise statistics replace


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The BN layers whose statistics training updates (frozen ones, FrozenBatchNorm2d, are not _BatchNorm)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _BatchNorm)}


@torch.no_grad()
def precise_statistics(model: nn.Module, batches, processes: Processes, autocast,
                       should_stop=lambda: False) -> tuple[dict[str, torch.Tensor], int] | None:
    """({'<layer>.running_mean': mean, '<layer>.running_var': unbiased variance}, images) over the images of
    `batches` (this process's share of each), or None when `should_stop()` turns true between batches
    (a collective under DDP: every process calls it). The model's parameters, buffers and mode are left as
    they were."""
    layers = batchnorm_layers(model)
    sums = {name: torch.zeros(3, layer.num_features, dtype=torch.float64, device=layer.running_mean.device)
            for name, layer in layers.items()}

    def accumulate(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().double()
            sums[name][0] += x.sum((0, 2, 3))
            sums[name][1] += (x * x).sum((0, 2, 3))
            sums[name][2] += x.numel() / x.shape[1]
        return hook

    images = 0
    with _kept_as_they_are(model, layers):
        handles = [layer.register_forward_pre_hook(accumulate(name)) for name, layer in layers.items()]
        try:
            for x, y in batches:
                if should_stop():
                    return None
                with autocast:
                    model(x)
                images += len(y)
        finally:
            for handle in handles:
                handle.remove()
    names = list(sums)
    device = next(iter(sums.values())).device if sums else torch.device("cpu")
    flat = torch.cat([sums[name].flatten() for name in names] + [torch.tensor([float(images)], dtype=torch.float64,
                                                                                device=device)])
    flat = processes.sum(flat)
    images = int(flat[-1].item())
    statistics, start = {}, 0
    for name in names:
        layer = layers[name]
        total, squares, count = flat[start:start + 3 * layer.num_features].view(3, layer.num_features)
        start += 3 * layer.num_features
        mean = total / count
        variance = (squares / count - mean * mean).clamp_min(0) * count / (count - 1)
        statistics[f"{name}.running_mean"] = mean.to(layer.running_mean.dtype)
        statistics[f"{name}.running_var"] = variance.to(layer.running_var.dtype)
    return statistics, images


@contextmanager
def _kept_as_they_are(model: nn.Module, layers: dict[str, _BatchNorm]):
    """The model in training mode, its BN buffers (and mode) restored afterwards: the forward passes
    above must not move the moving averages."""
    saved = {name: {key: buffer.clone() for key, buffer in layer.named_buffers()} for name, layer in layers.items()}
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        for name, layer in layers.items():
            for key, buffer in layer.named_buffers():
                buffer.copy_(saved[name][key])


@contextmanager
def statistics_in_use(model: nn.Module, statistics: dict[str, torch.Tensor] | None):
    """The model with `statistics` (precise_statistics' first result) in its BN layers for the duration;
    None: its own (moving) statistics."""
    if statistics is None:
        yield model
        return
    buffers = dict(model.named_buffers())
    saved = {key: buffers[key].clone() for key in statistics}
    try:
        use_statistics(model, statistics)
        yield model
    finally:
        use_statistics(model, saved)


def use_statistics(model: nn.Module, statistics: dict[str, torch.Tensor]) -> None:
    """Copy `statistics` into the model's BN buffers of the same names."""
    buffers = dict(model.named_buffers())
    missing = [key for key in statistics if key not in buffers]
    if missing:
        raise KeyError(f"the network has no BN buffers {missing[:3]}")
    for key, value in statistics.items():
        buffers[key].copy_(value)


def apply_chosen_statistics(model: nn.Module, checkpoint: dict, choice: str) -> str:
    """Put the BN statistics `choice` names (eval.bn_stats: precise or moving) into a model that holds the
    checkpoint's weights; precise ones only where the checkpoint has them (a run finished since they
    exist). Returns the statistics in use: precise or moving."""
    precise = checkpoint.get(PRECISE_BN)
    if choice != "precise" or precise is None:
        return "moving"
    use_statistics(model, precise["statistics"])
    return "precise"
