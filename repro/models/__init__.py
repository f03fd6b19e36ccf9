"""The paper's networks by name, for `repro models`, the complexity table and the tests:
`build_model("cifar_resnet56")`, `build_model("imagenet_plain34", shortcut="A")`, `build_model("vgg19")`.

A name `<cifar|imagenet>_<plain|resnet><depth>` stands for a model spec (repro/spec.py), the one way to a
network; repro/models/networks.py builds it and holds the rules. The registry lists the paper's depths;
CIFAR also takes any depth 6n+2.
"""
from __future__ import annotations

import re

import torchvision
from pydantic import ValidationError
from torch import nn

from repro.models.blocks import SHORTCUT_OPTIONS, response_layers
from repro.models.imagenet import TABLE1
from repro.paper import CIFAR_DEPTHS
from repro.spec import ModelSpec, describe

__all__ = ["build_model", "model_name", "model_spec", "registered_models", "response_layers", "SHORTCUT_OPTIONS"]

_NAME = re.compile(r"(cifar|imagenet)_(plain|resnet)(\d+)")
_VGG = {"vgg16": torchvision.models.vgg16, "vgg19": torchvision.models.vgg19}


def model_name(arch: str, depth: int, residual: bool) -> str:
    return f"{arch}_{'resnet' if residual else 'plain'}{depth}"


def registered_models() -> list[str]:
    """The paper's networks, in the order of its tables."""
    names = [model_name("cifar", depth, residual) for residual in (False, True) for depth in CIFAR_DEPTHS]
    names += [model_name("imagenet", depth, residual) for residual in (False, True) for depth in TABLE1]
    return names + list(_VGG)


def model_spec(name: str, *, shortcut: str | None = None, bottleneck_stride: str = "v1") -> ModelSpec:
    """The model spec a name stands for. `shortcut` (A, B or C) applies to ResNets; it defaults to the
    paper's choice: A on CIFAR (Sec. 4.2), B on ImageNet (Sec. 4.1) — Table 2 uses A, so its specs say
    so. `bottleneck_stride` is "v1" (the paper) or "v1.5" (torchvision)."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(registered_models())} "
                         "(CIFAR also takes any depth 6n+2, e.g. cifar_resnet8)")
    arch, kind, depth = match.groups()
    residual = kind == "resnet"
    paper_shortcut = "B" if arch == "imagenet" and residual else "A"
    try:
        return ModelSpec(arch=arch, depth=int(depth), residual=residual, shortcut=shortcut or paper_shortcut,
                         bottleneck_stride=bottleneck_stride)
    except ValidationError as error:
        raise ValueError(describe(error, name)) from None


def build_model(name: str, *, shortcut: str | None = None, bottleneck_stride: str = "v1") -> nn.Module:
    """The He-initialised network of a registered name (see `model_spec`), or torchvision's VGG."""
    if name in _VGG:
        return _VGG[name](weights=None)
    return model_spec(name, shortcut=shortcut, bottleneck_stride=bottleneck_stride).build()
