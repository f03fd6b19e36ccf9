"""The ImageNet networks of Table 1: 18/34 layers with basic blocks, 50/101/152 with bottlenecks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repro.models.blocks import he_init, make_stages

# Table 1: the block of each depth and the blocks per stage conv2_x..conv5_x.
TABLE1 = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
WIDTHS = (64, 128, 256, 512)  # conv2_x..conv5_x (x4 at the output of a bottleneck)


def table1_block(depth: int) -> str:
    """The block of Table 1's network of `depth` layers."""
    if depth not in TABLE1:
        raise ValueError(f"depth: ImageNet depth must be one of {', '.join(map(str, TABLE1))} (Table 1), got {depth}")
    return TABLE1[depth][0]


def blocks_per_stage(block: str, depth: int) -> tuple[int, int, int, int]:
    """Table 1's blocks per stage of the `depth`-layer network, which must be built of `block`s."""
    if table1_block(depth) != block:
        raise ValueError(f"block: Table 1's {depth}-layer network has {table1_block(depth)} blocks, got {block}")
    return TABLE1[depth][1]


class ImageNetNet(nn.Module):
    """7x7/2 conv with 64 filters, 3x3/2 max pool, four stages of `block`s (stride 2 at conv3_1, conv4_1,
    conv5_1), global average pooling, 1000-way FC. `shortcut=None` gives the plain net; `block_options`
    go to every block (a bottleneck's `bottleneck_stride`)."""

    def __init__(self, block: type[nn.Module], blocks_per_stage: tuple[int, int, int, int], shortcut: str | None,
                 num_classes: int = 1000, **block_options):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.stages, channels = make_stages(block, 64, WIDTHS, blocks_per_stage, (1, 2, 2, 2), shortcut,
                                            **block_options)
        self.fc = nn.Linear(channels, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, stride=2, padding=1)
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
