"""Parameters and multiply-adds of the paper's networks beside VGG (Table 1, Sec. 3.3, Table 6),
counted with fvcore."""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # fvcore uses torch.jit, deprecated in torch 2.x
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import conv_flop_jit, linear_flop_jit

from repro import paper
from repro.models import build_model
from repro.tables import write_table

# The paper's FLOPs are the multiply-adds of conv and FC layers: fvcore's handles for exactly those
# (it counts one multiply-add as one flop). The other ops carry no multiply-adds, or ones the paper
# does not count (BN folds into the conv at inference), and are ignored on purpose.
COUNTED = {"aten::_convolution": conv_flop_jit, "aten::linear": linear_flop_jit}
NOT_COUNTED = (
    "aten::add", "aten::add_",  # residual additions
    "aten::pad",  # option-A zero-padding shortcut
    "aten::max_pool2d", "aten::adaptive_avg_pool2d",
    "aten::batch_norm",  # folded into the conv at inference; the paper does not count it
    "aten::relu", "aten::relu_", "aten::dropout", "aten::dropout_", "aten::flatten",
)

# (row label, registry name, build options, input side): the rows of the complexity table.
ROWS = (
    [(f"cifar_{kind}{d}", f"cifar_{kind}{d}", {}, 32)
     for kind in ("plain", "resnet") for d in paper.CIFAR_DEPTHS if (kind, d) != ("plain", 1202)]
    + [(f"imagenet_{kind}{d}_A" if kind == "resnet" else f"imagenet_{kind}{d}",
        f"imagenet_{kind}{d}", {"shortcut": "A"} if kind == "resnet" else {}, 224)
       for d in (18, 34) for kind in ("plain", "resnet")]
    + [(f"imagenet_resnet34_{s}", "imagenet_resnet34", {"shortcut": s}, 224) for s in ("B", "C")]
    + [(f"imagenet_resnet{d}_B", f"imagenet_resnet{d}", {"shortcut": "B"}, 224) for d in (50, 101, 152)]
    + [("vgg16", "vgg16", {}, 224), ("vgg19", "vgg19", {}, 224)]
)

NOTE = ("FLOPs are multiply-adds of the convolutional and fully connected layers, counted by fvcore "
        "(one fused multiply-add = one flop, the paper's convention) on one image (batch 1). "
        "Additions, pooling, BN, ReLU and the option-A zero-padding shortcut are not counted. "
        "ImageNet ResNets with 50 or more layers use the original (v1) bottleneck with the stride on "
        "the first 1x1 conv. Paper values: Table 1, Sec. 3.3, Sec. 4.1 and Table 6.")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, side: int) -> int:
    """Multiply-adds of conv and FC layers for one side x side image."""
    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, side, side))
    analysis.clear_op_handles().set_op_handle(**COUNTED, **{op: None for op in NOT_COUNTED})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        total = analysis.total()
        unexpected = analysis.unsupported_ops()
    if unexpected:  # an op we have not classified: decide whether it carries multiply-adds
        raise RuntimeError(f"fvcore met ops that are neither counted nor ignored: {dict(unexpected)}")
    return total


def paper_values(label: str) -> tuple[float | None, float | None, str]:
    """(params, FLOPs, where the paper prints them) for a row, None where the paper has none."""
    name = label.removesuffix("_A").removesuffix("_B")
    params = paper.TABLE6_PARAMS.get(name)
    flops, flops_source = paper.IMAGENET_FLOPS.get(name, (None, ""))
    if label == "imagenet_resnet34_C":  # Table 1 gives one cost per depth; C adds projections
        flops, flops_source = None, ""
    source = "Table 6" if params is not None else flops_source
    return params, flops, source


def complexity_frame() -> pd.DataFrame:
    records = []
    for label, name, options, side in ROWS:
        model = build_model(name, **options)
        paper_params, paper_flops, source = paper_values(label)
        records.append({
            "model": label, "input": f"{side}x{side}", "params": count_parameters(model),
            "flops": count_flops(model, side), "paper_params": paper_params,
            "paper_flops": paper_flops, "source": source,
        })
    return pd.DataFrame.from_records(records)


def _millions_or_billions(value: float | None) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{value / 1e9:.2f}G" if value >= 1e9 else f"{value / 1e6:.2f}M"


def write_complexity(out_dir: str | Path) -> list[Path]:
    data = complexity_frame()
    shown = data.assign(**{col: data[col].map(_millions_or_billions)
                           for col in ("flops", "paper_params", "paper_flops")})
    shown["params"] = data["params"].map("{:,}".format)
    shown.columns = ["Model", "Input", "Params", "FLOPs", "Paper params", "Paper FLOPs", "Source"]
    return write_table(out_dir, "complexity", data, shown=shown, note=NOTE,
                       caption="Parameters and multiply-adds of the plain, residual and VGG networks")
