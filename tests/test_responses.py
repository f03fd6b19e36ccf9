"""Fig. 7's layer responses: what the hook captures, the streaming std, and `repro responses` on real
checkpoints and a small generated CIFAR-10 set."""
import json
import re

import pandas as pd
import pytest
import torch
import yaml

from repro.checkpoint import REQUIRED_KEYS, save_checkpoint
from repro.data.generated import write_cifar10
from repro.errors import ReproError
from repro.models import build_model, response_layers
from repro.reports import make_report
from repro.reports.responses import RESPONSES_CSV, compute_responses, layer_response_stds
from repro.spec import validate
from test_reports import write_suite


def images(count=12, seed=0):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_one_positive_std_per_3x3_layer():
    for name in ("cifar_resnet20", "cifar_plain20"):
        stds = layer_response_stds(build_model(name).eval(), [images()])
        assert len(stds) == 19  # the first conv and 18 in the three stages
        assert all(r.std > 0 and r.mean_channel_std > 0 for r in stds)


def test_response_is_after_bn_before_relu_and_addition():
    model = build_model("cifar_resnet20").eval()
    block = model.stages[1][1]
    torch.nn.init.zeros_(block.bn2.weight)
    torch.nn.init.constant_(block.bn2.bias, 0.5)  # the BN's output is 0.5 everywhere
    torch.nn.init.constant_(model.bn.bias, -1.0)  # most of the first response is negative
    x = images()
    stds = {r.layer: r.std for r in layer_response_stds(model, [x])}
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
    assert [r.layer for r in whole] == [r.layer for r in streamed] == [n for n, _ in response_layers(model)]
    assert [r.std for r in streamed] == pytest.approx([r.std for r in whole], rel=1e-6)
    assert [r.mean_channel_std for r in streamed] == pytest.approx([r.mean_channel_std for r in whole], rel=1e-6)


def test_both_readings_of_the_std():
    """Pooled over all channels, offsets between channels count; per channel, they do not."""
    model = build_model("cifar_plain20").eval()
    torch.nn.init.zeros_(model.bn.weight)
    with torch.no_grad():
        model.bn.bias.copy_(torch.arange(16.0))  # channel c of the first response is c everywhere
    first = layer_response_stds(model, [images()])[0]
    assert first.mean_channel_std == pytest.approx(0.0, abs=1e-6)
    assert first.std == pytest.approx(torch.arange(16.0).std(unbiased=False).item(), rel=1e-6)

    x = images()
    with torch.no_grad():
        torch.nn.init.normal_(model.bn.weight)  # channels of different spreads
        response = model.bn(model.conv(x)).double()
    expected = response.transpose(0, 1).flatten(1).std(dim=1, unbiased=False).mean().item()
    first = layer_response_stds(model, list(x.split(5)))[0]
    assert first.mean_channel_std == pytest.approx(expected, rel=1e-6)
    assert first.std == pytest.approx(response.std(unbiased=False).item(), rel=1e-6)


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
    # only the weights and the config matter here; the training state is left empty
    save_checkpoint(folder / "checkpoints", {**dict.fromkeys(REQUIRED_KEYS, {}), "model": model.state_dict(),
                                             "iteration": 10, "epoch": 1, "batch": 0, "rows": [],
                                             "config": spec.to_dict()})
    pd.DataFrame([{"epoch": 1, "iteration": 10, "train_images": 160, "partial": 0, "train_error": 80.0,
                   "test_error": 85.0}]).to_csv(
        folder / "metrics.csv", index=False)
    (folder / "final.json").write_text(json.dumps({"status": "finished", "final_test_error": 85.0}))


def test_responses_csv_from_checkpoints(tmp_path):
    data, results = tmp_path / "cifar10", tmp_path / "results"
    write_cifar10(data, 200, 100)
    for name in ("cifar_plain20", "cifar_resnet20"):
        write_finished_run(results, data, name, 0)
    write_finished_run(results, data, "cifar_resnet20", 1)
    suite = write_suite(tmp_path, {"seeds": {"cifar10": 2},
                                   "figures": {"fig7": ["cifar_plain20", "cifar_resnet20", "cifar_resnet56"]}})

    path = compute_responses(results, suite, batch_size=50)
    assert path == results / "tables" / RESPONSES_CSV
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["model", "seed", "layer_index", "layer", "std", "mean_channel_std"]
    assert frame.groupby(["model", "seed"]).size().to_dict() == {
        ("cifar_plain20", 0): 19, ("cifar_resnet20", 0): 19, ("cifar_resnet20", 1): 19}
    assert (frame["std"] > 0).all() and (frame["mean_channel_std"] > 0).all()
    assert frame[frame.model == "cifar_resnet20"].groupby("seed")["std"].sum().nunique() == 2  # seeds differ

    report = make_report(results, suite).read_text()
    assert "![Figure 7](figures/fig7.png)" in report and (results / "figures" / "fig7.pdf").is_file()
    assert "ResNet-20 has smaller layer responses than plain-20 (Fig. 7): plain-20" in report
    claim = next(line for line in report.splitlines() if "smaller layer responses than plain-20" in line)
    assert re.search(r"; mean of per-channel stds: plain-20 [\d.]+ \(n=1\) [>≤] ResNet-20 [\d.]+ \(n=2\) "
                     r"\(the order (holds too|does not hold)\)$", claim)


def test_no_finished_fig7_run_is_an_error_that_says_what_to_do(tmp_path):
    suite = write_suite(tmp_path, {"seeds": {"cifar10": 1}, "figures": {"fig7": ["cifar_resnet20"]}})
    (tmp_path / "results").mkdir()
    with pytest.raises(ReproError, match="no finished run of the Fig. 7 networks"):
        compute_responses(tmp_path / "results", suite)
