"""From a model spec to its network: one entry per (arch, block), with the rules that say which specs it
builds. Every architecture rule is written here or in the family module it names (6n+2 in cifar.py,
Table 1 in imagenet.py) and is checked when a spec is validated; `repro.spec.ModelSpec` is the one way
to a network, and the names of `repro models` stand for specs.

A new block type is a class (blocks.py, or a module of its own), an entry below, and a spec naming it
with `model.block`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from torch import nn

from repro.models import cifar, imagenet
from repro.models.blocks import SHORTCUT_OPTIONS, BasicBlock, Bottleneck

# The `spec` of the functions below is a repro.spec.ModelSpec. It is not imported: the spec imports this
# module to check and build itself, and the package's imports form no cycle (tests/test_imports.py).


@dataclass(frozen=True)
class Network:
    """The networks of one (arch, block) entry: how they are built and which specs they accept."""

    net: Callable[..., nn.Module]  # net(block, blocks per stage, shortcut or None, **block options)
    block: type[nn.Module]  # the unit stacked in every stage
    blocks_per_stage: Callable[[int], tuple[int, ...]]  # depth -> blocks of each stage; ValueError if none
    shortcuts: tuple[str, ...]  # the options its residual nets take
    block_options: tuple[str, ...] = ()  # fields of the model spec handed to every block


NETWORKS: dict[tuple[str, str], Network] = {
    # Sec. 4.2: the paper's CIFAR ResNets all use option A
    ("cifar", "basic"): Network(cifar.CifarNet, BasicBlock, cifar.blocks_per_stage, shortcuts=("A",)),
    # Table 1, with the shortcut options of Sec. 3.3
    ("imagenet", "basic"): Network(imagenet.ImageNetNet, BasicBlock, partial(imagenet.blocks_per_stage, "basic"),
                                   shortcuts=SHORTCUT_OPTIONS),
    ("imagenet", "bottleneck"): Network(imagenet.ImageNetNet, Bottleneck,
                                        partial(imagenet.blocks_per_stage, "bottleneck"),
                                        shortcuts=SHORTCUT_OPTIONS, block_options=("bottleneck_stride",)),
}


def paper_block(arch: str, depth: int) -> str:
    """The block of a spec that names none: the paper's, basic on CIFAR (Sec. 4.2), Table 1's on ImageNet."""
    return imagenet.table1_block(depth) if arch == "imagenet" else "basic"


def check(spec: ModelSpec) -> tuple[Network, tuple[int, ...]]:
    """The entry that builds `spec` and its blocks per stage; a ValueError that starts with the key of
    the first rule the spec breaks and lists what is valid."""
    if spec.shortcut not in SHORTCUT_OPTIONS:
        raise ValueError(f"shortcut: must be one of {', '.join(SHORTCUT_OPTIONS)}, got {spec.shortcut!r}")
    block = spec.block or paper_block(spec.arch, spec.depth)
    network = NETWORKS.get((spec.arch, block))
    if network is None:
        valid = [name for arch, name in NETWORKS if arch == spec.arch]
        raise ValueError(f"block: {spec.arch} networks are built of {' or '.join(valid)} blocks, got {block!r}")
    stages = network.blocks_per_stage(spec.depth)
    if not spec.residual and spec.shortcut != "A":  # the default, which a plain net ignores
        raise ValueError(f"shortcut: a plain net has no shortcuts; leave shortcut at its default A, "
                         f"got {spec.shortcut}")
    if spec.residual and spec.shortcut not in network.shortcuts:
        raise ValueError(f"shortcut: {spec.arch} ResNets of {block} blocks take option "
                         f"{' or '.join(network.shortcuts)}, got {spec.shortcut}")
    return network, stages


def build(spec: ModelSpec) -> nn.Module:
    """The He-initialised network that `spec` describes."""
    network, stages = check(spec)
    options = {name: getattr(spec, name) for name in network.block_options}
    return network.net(network.block, stages, spec.shortcut if spec.residual else None, **options)
