"""Building blocks shared by the CIFAR and ImageNet networks (Sections 3.3, 4.1, 4.2).

A block is residual when it has a shortcut and plain when it has none: a plain net is exactly the
same stack of layers without the additions, so both have the same parameters under option A.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUT_OPTIONS = ("A", "B", "C")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BN, whose shift makes a bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A (Sec. 3.3): identity, subsampled by the stride, with the extra channels zero-padded.
    It has no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x


def make_shortcut(option: str | None, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The shortcut of one block: None for a plain block, else option A, B or C of Sec. 3.3/4.1.
    A: zero-padding identity. B: projection (1x1 conv + BN) only where the shape changes, identity
    elsewhere. C: projection everywhere."""
    if option is None:
        return None
    shape_changes = stride != 1 or in_channels != out_channels
    # whether it projects; another option is a KeyError (specs are checked in repro/models/networks.py)
    if {"A": False, "B": shape_changes, "C": True}[option]:
        return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    if shape_changes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 2 left), BN after each conv and before ReLU; the second ReLU comes after
    the addition (Sec. 3.3)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: str | None):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            # In place into BN's output, which BN's backward does not read (it reads its input and
            # statistics): one allocation and one memory pass fewer than `out + shortcut`, same bits.
            out += self.shortcut(x)
        return F.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (Fig. 5 right, Sec. 4.1). The original model strides the first
    1x1 conv ("v1"); torchvision's "v1.5" strides the 3x3 instead."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: str | None,
                 bottleneck_stride: str = "v1"):
        super().__init__()
        out_channels = width * self.expansion
        stride_1x1, stride_3x3 = {"v1": (stride, 1), "v1.5": (1, stride)}[bottleneck_stride]  # else KeyError
        self.conv1 = conv1x1(in_channels, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            out += self.shortcut(x)  # in place, as in BasicBlock
        return F.relu(out)


def make_stages(block: type[nn.Module], in_channels: int, widths: tuple[int, ...],
                blocks_per_stage: tuple[int, ...], first_strides: tuple[int, ...],
                shortcut: str | None, **block_options) -> tuple[nn.Sequential, int]:
    """Stack the stages; only the first block of a stage changes the stride. Returns the stages and
    their output channels."""
    stages = []
    for width, blocks, stride in zip(widths, blocks_per_stage, first_strides):
        layers = []
        for i in range(blocks):
            layers.append(block(in_channels, width, stride if i == 0 else 1, shortcut, **block_options))
            in_channels = width * block.expansion
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages), in_channels


def he_init(model: nn.Module) -> None:
    """He et al. 2015 (arXiv:1502.01852) initialisation of every conv, std = sqrt(2 / (k*k*c_in)): the
    forward case of its Eq. 10, Caffe's "msra" filler used by the original models. BN starts at
    scale 1, shift 0; the FC layer keeps PyTorch's default (the paper does not say)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def response_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BN that follows each 3x3 conv, in network order. Its output is what Fig. 7 calls a layer's
    response: after BN, before the ReLU and before the addition."""
    layers, last_conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = module
        elif isinstance(module, nn.BatchNorm2d) and last_conv is not None and last_conv.kernel_size == (3, 3):
            layers.append((name, module))
            last_conv = None
    return layers
