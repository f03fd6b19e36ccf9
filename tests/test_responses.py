"""Fig. 7's layer responses: what the hook captures, the streaming std, and `repro responses` on real
checkpoints and a small generated CIFAR-10 set."""
import json

import pandas as pd
import pytest
import torch
import yaml

from repro.data.cifar import write_cifar10
from repro.errors import ReproError
from repro.models import build_model, response_layers
from repro.reports import make_report
from repro.reports.responses import RESPONSES_CSV, compute_responses, layer_response_stds
from repro.spec import validate


def images(count=12, seed=0):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_one_positive_std_per_3x3_layer():
    for name in ("cifar_resnet20", "cifar_plain20"):
        stds = layer_response_stds(build_model(name).eval(), [images()])
        assert len(stds) == 19  # the first conv and 18 in the three stages
        assert all(std > 0 for _, std in stds)


def test_response_is_after_bn_before_relu_and_addition():
    model = build_model("cifar_resnet20").eval()
    block = model.stages[1][1]
    torch.nn.init.zeros_(block.bn2.weight)
    torch.nn.init.constant_(block.bn2.bias, 0.5)  # the BN's output is 0.5 everywhere
    torch.nn.init.constant_(model.bn.bias, -1.0)  # most of the first response is negative
    x = images()
    stds = dict(layer_response_stds(model, [x]))
    # before the addition: the shortcut would have added the block's (varying) input
    assert stds["stages.1.1.bn2"] == pytest.approx(0.0, abs=1e-6)
    # before the ReLU: the negative values count
    with torch.no_grad():
        expected = model.bn(model.conv(x)).double().std(unbiased=False).item()
    assert stds["bn"] == pytest.approx(expected, rel=1e-5)


def test_streaming_std_equals_one_pass():
    model = build_model("cifar_plain20").eval()
    x = images(12)
    whole = layer_response_stds(model, [x])
    streamed = layer_response_stds(model, list(x.split(5)))
    assert [name for name, _ in whole] == [name for name, _ in streamed] == [n for n, _ in response_layers(model)]
    assert [s for _, s in streamed] == pytest.approx([s for _, s in whole], rel=1e-6)


def write_finished_run(results, data, name, seed):
    """A run folder with a real checkpoint of `name` (weights as initialised, BN statistics updated
    by a few training-mode passes so that they differ from the defaults)."""
    depth = int(name.removeprefix("cifar_resnet").removeprefix("cifar_plain"))
    spec = validate({"name": name, "seed": seed, "model": {"depth": depth, "residual": "resnet" in name},
                     "data": {"root": str(data), "verify_checksums": False}}, "test")
    folder = results / "runs" / name / f"seed{seed}"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    torch.manual_seed(seed)
    model = spec.model.build().train()
    with torch.no_grad():
        model(images(16, seed))
    torch.save({"model": model.state_dict(), "config": spec.to_dict()}, folder / "checkpoints" / "last.pt")
    pd.DataFrame([{"epoch": 1, "iteration": 10, "train_error": 80.0, "test_error": 85.0}]).to_csv(
        folder / "metrics.csv", index=False)
    (folder / "final.json").write_text(json.dumps({"status": "finished", "final_test_error": 85.0}))


def test_responses_csv_from_checkpoints(tmp_path):
    data, results = tmp_path / "cifar10", tmp_path / "results"
    write_cifar10(data, 200, 100)
    for name in ("cifar_plain20", "cifar_resnet20"):
        write_finished_run(results, data, name, 0)
    write_finished_run(results, data, "cifar_resnet20", 1)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"seeds": {"cifar10": 2},
                                     "figures": {"fig7": ["cifar_plain20", "cifar_resnet20", "cifar_resnet56"]}}))

    path = compute_responses(results, suite, batch_size=50)
    assert path == results / "tables" / RESPONSES_CSV
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["model", "seed", "layer_index", "layer", "std"]
    assert frame.groupby(["model", "seed"]).size().to_dict() == {
        ("cifar_plain20", 0): 19, ("cifar_resnet20", 0): 19, ("cifar_resnet20", 1): 19}
    assert (frame["std"] > 0).all()
    assert frame[frame.model == "cifar_resnet20"].groupby("seed")["std"].sum().nunique() == 2  # seeds differ

    report = make_report(results, suite).read_text()
    assert "![Figure 7](figures/fig7.png)" in report and (results / "figures" / "fig7.pdf").is_file()
    assert "ResNet-20 has smaller layer responses than plain-20 (Fig. 7): plain-20" in report


def test_no_finished_fig7_run_is_an_error_that_says_what_to_do(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"seeds": {"cifar10": 1}, "figures": {"fig7": ["cifar_resnet20"]}}))
    with pytest.raises(ReproError, match="no finished run of the Fig. 7 networks"):
        compute_responses(tmp_path / "results", suite)
