"""FLOPs (multiply-adds) against Table 1 and Sec. 3.3, and the complexity table files."""
import re
from pathlib import Path

import pandas as pd
import pytest

from repro import paper
from repro.complexity import count_flops, write_complexity
from repro.models import build_model

COMMITTED = Path(__file__).resolve().parents[1] / "results" / "tables"


@pytest.mark.parametrize("name, options", [
    ("imagenet_resnet18", {"shortcut": "A"}), ("imagenet_resnet34", {"shortcut": "A"}),
    ("imagenet_resnet50", {}), ("imagenet_resnet101", {}), ("imagenet_resnet152", {}), ("vgg19", {}),
])
def test_flops_within_3_percent_of_the_paper(name, options):
    expected, _ = paper.IMAGENET_FLOPS[name]
    assert count_flops(build_model(name, **options), 224) == pytest.approx(expected, rel=0.03)


def test_cifar_flops_are_conv_plus_fc_multiply_adds():
    # ResNet-20 at 32x32: 3x3 convs on 32/16/8 maps plus the 64x10 FC layer, counted by hand
    first = 32 * 32 * 16 * 3 * 9
    stage1 = 6 * 32 * 32 * 16 * 16 * 9
    stage2 = 16 * 16 * 32 * 16 * 9 + 5 * 16 * 16 * 32 * 32 * 9
    stage3 = 8 * 8 * 64 * 32 * 9 + 5 * 8 * 8 * 64 * 64 * 9
    assert count_flops(build_model("cifar_resnet20"), 32) == first + stage1 + stage2 + stage3 + 64 * 10


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    out = tmp_path_factory.mktemp("complexity")
    write_complexity(out)
    return out


def test_complexity_table_rows_and_columns(tables):
    frame = pd.read_csv(tables / "complexity.csv")
    assert list(frame.columns) == ["model", "input", "params", "flops", "paper_params", "paper_flops", "source"]
    assert len(frame) == 22
    row = frame.set_index("model").loc["imagenet_resnet34_A"]
    assert row.paper_flops == 3.6e9 and row.source == "Table 1"
    assert frame.set_index("model").loc["cifar_resnet110", "params"] == 1_727_962
    assert pd.isna(frame.set_index("model").loc["cifar_plain20", "paper_params"])


def test_complexity_latex_is_booktabs_and_escaped(tables):
    tex = (tables / "complexity.tex").read_text()
    assert all(rule in tex for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
    assert len(re.findall(r"\\begin\{(\w+)\}", tex)) == len(re.findall(r"\\end\{(\w+)\}", tex))
    assert r"cifar\_resnet56" in tex and "cifar_resnet56" not in tex


def test_committed_tables_equal_a_fresh_run(tables):
    for suffix in ("csv", "md", "tex"):
        assert (COMMITTED / f"complexity.{suffix}").read_text() == (tables / f"complexity.{suffix}").read_text()
