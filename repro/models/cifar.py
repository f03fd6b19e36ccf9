"""The CIFAR-10 networks of Section 4.2: a 3x3 conv, three stages of blocks, pooling and a 10-way FC."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repro.models.blocks import conv3x3, he_init, make_stages

WIDTHS = (16, 32, 64)  # filters of the three stages, on 32x32, 16x16 and 8x8 maps (Sec. 4.2)


def blocks_per_stage(depth: int) -> tuple[int, int, int]:
    """(n, n, n) for depth = 6n + 2: each stage has n blocks of two 3x3 layers, plus the first conv and
    the FC layer."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth: CIFAR depth should be of the format 6n+2 with n >= 1 "
                         f"(the paper's: 20, 32, 44, 56, 110, 1202), got {depth}")
    n = (depth - 2) // 6
    return n, n, n


class CifarNet(nn.Module):
    """3x3 conv with 16 filters, 3 stages of `block`s (the first of stages 2 and 3 strided), global average
    pooling, 10-way FC. `shortcut=None` gives the plain net; the paper uses option "A" for every CIFAR
    ResNet."""

    def __init__(self, block: type[nn.Module], blocks_per_stage: tuple[int, int, int], shortcut: str | None,
                 num_classes: int = 10):
        super().__init__()
        self.conv = conv3x3(3, WIDTHS[0])
        self.bn = nn.BatchNorm2d(WIDTHS[0])
        self.stages, channels = make_stages(block, WIDTHS[0], WIDTHS, blocks_per_stage, (1, 2, 2), shortcut)
        self.fc = nn.Linear(channels, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
