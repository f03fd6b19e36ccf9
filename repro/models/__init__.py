"""One registry of the paper's networks: `build_model("cifar_resnet56")`, `build_model("imagenet_plain34",
shortcut="A")`, `build_model("vgg19")`.

Names are `<family>_<plain|resnet><depth>`. CIFAR accepts any depth 6n+2 (the registry lists the
paper's); ImageNet accepts the depths of Table 1.
"""
from __future__ import annotations

import re

import torchvision
from torch import nn

from repro.models import cifar, imagenet
from repro.models.blocks import SHORTCUT_OPTIONS, response_layers
from repro.paper import CIFAR_DEPTHS

__all__ = ["build_model", "model_name", "registered_models", "response_layers", "SHORTCUT_OPTIONS"]

_NAME = re.compile(r"(cifar|imagenet)_(plain|resnet)(\d+)")
_VGG = {"vgg16": torchvision.models.vgg16, "vgg19": torchvision.models.vgg19}


def registered_models() -> list[str]:
    """The paper's networks, in the order of its tables."""
    names = [f"cifar_{kind}{d}" for kind in ("plain", "resnet") for d in CIFAR_DEPTHS]
    names += [f"imagenet_{kind}{d}" for kind in ("plain", "resnet") for d in imagenet.STAGES]
    return names + list(_VGG)


def model_name(arch: str, depth: int, residual: bool) -> str:
    return f"{arch}_{'resnet' if residual else 'plain'}{depth}"


def build_model(name: str, *, shortcut: str | None = None, bottleneck_stride: str = "v1",
                num_classes: int | None = None) -> nn.Module:
    """Build a registered network, He-initialised. `shortcut` (A, B or C) applies to ResNets; it
    defaults to the paper's choice: A on CIFAR (Sec. 4.2), B on ImageNet (Sec. 4.1) — Table 2 uses A,
    so its specs say so. `bottleneck_stride` is "v1" (the paper) or "v1.5" (torchvision)."""
    if name in _VGG:
        return _VGG[name](weights=None, num_classes=num_classes or 1000)
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(registered_models())} "
                         "(CIFAR also takes any depth 6n+2, e.g. cifar_resnet8)")
    family, kind, depth = match.group(1), match.group(2), int(match.group(3))
    if kind == "plain" and shortcut not in (None, "A"):
        raise ValueError(f"{name} is a plain net: it has no shortcuts, got shortcut={shortcut!r}")
    if family == "cifar":
        if shortcut not in (None, "A"):
            raise ValueError(f"the paper's CIFAR ResNets use option A shortcuts only (Sec. 4.2), got {shortcut!r}")
        return cifar.CifarNet(depth, shortcut="A" if kind == "resnet" else None, num_classes=num_classes or 10)
    return imagenet.ImageNetNet(depth, shortcut=(shortcut or "B") if kind == "resnet" else None,
                                bottleneck_stride=bottleneck_stride, num_classes=num_classes or 1000)
