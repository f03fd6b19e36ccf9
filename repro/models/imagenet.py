"""The ImageNet networks of Table 1: 18/34 layers with basic blocks, 50/101/152 with bottlenecks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repro.models.blocks import BasicBlock, Bottleneck, he_init, make_stages

# Table 1: block type and blocks per stage conv2_x..conv5_x.
STAGES = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
WIDTHS = (64, 128, 256, 512)  # conv2_x..conv5_x (x4 at the output of a bottleneck)


class ImageNetNet(nn.Module):
    """7x7/2 conv with 64 filters, 3x3/2 max pool, four stages (stride 2 at conv3_1, conv4_1, conv5_1),
    global average pooling, 1000-way FC. `shortcut=None` gives the plain net."""

    def __init__(self, depth: int, shortcut: str | None = "B", bottleneck_stride: str = "v1",
                 num_classes: int = 1000):
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"ImageNet depth must be one of {', '.join(map(str, STAGES))} (Table 1), got {depth}")
        block, blocks = STAGES[depth]
        options = {"bottleneck_stride": bottleneck_stride} if block is Bottleneck else {}
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.stages, channels = make_stages(block, 64, WIDTHS, blocks, (1, 2, 2, 2), shortcut, **options)
        self.fc = nn.Linear(channels, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, stride=2, padding=1)
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
