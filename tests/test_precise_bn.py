"""Precise BN statistics (repro/precise_bn.py): a true average over training images after the last
iteration, in final.json and the checkpoint beside the moving averages, and a run stopped during the
pass that resumes to the same result."""
from __future__ import annotations

import json
import os
import signal
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

import repro.engine
from repro.checkpoint import load_checkpoint
from repro.run_network import load_run_model
from repro.cli import main
from repro.contract import PRECISE_BN
from repro.data.generated import write_cifar10
from repro.distributed import Processes, group_batchnorm
from repro.precise_bn import batchnorm_layers, precise_statistics
from repro.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "cifar10" / "resnet20.yaml"
SETTINGS = ["model.depth=8", "run.device=cpu", "run.progress=log", "data.verify_checksums=false",
            "data.eval_batch_size=50", "optim.batch_size=16", "optim.max_iters=6", "optim.lr_milestones=[4]",
            "eval.precise_bn_images=48"]


def batches(count: int = 3, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 16, 16, generator=generator), torch.randint(0, 10, (size,), generator=generator))
            for _ in range(count)]


def bn_inputs(model: nn.Module, data) -> dict[str, torch.Tensor]:
    """Every BN layer's input over all batches, each batch run in training mode as the pass runs it."""
    captured: dict[str, list[torch.Tensor]] = {}
    handles = [layer.register_forward_pre_hook(lambda m, i, name=name: captured.setdefault(name, []).append(i[0]))
               for name, layer in batchnorm_layers(model).items()]
    model.train()
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(inputs) for name, inputs in captured.items()}


@pytest.mark.parametrize("group", [None, 4])
def test_precise_statistics_equal_a_direct_average_over_the_same_images(group):
    torch.manual_seed(0)
    model = ModelSpec(arch="cifar", depth=8).build()
    if group:
        model = group_batchnorm(model, group, Processes())
    with torch.no_grad():  # moving averages unlike the sample's, so that a mix-up would show
        for layer in batchnorm_layers(model).values():
            layer.running_mean.fill_(3.0)
            layer.running_var.fill_(7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    data = batches()
    statistics, images = precise_statistics(model, data, Processes(), nullcontext())
    assert images == 24
    # the model is as it was: weights, moving averages, batch counts and mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    reference = bn_inputs(__import__("copy").deepcopy(model), data)
    # the first BN layer's input, computed directly: the first conv of every image
    direct_first = model.conv(torch.cat([x for x, _ in data]))
    torch.testing.assert_close(reference["bn"], direct_first.detach())
    assert len(statistics) == 2 * len(reference)
    for name, inputs in reference.items():
        var, mean = torch.var_mean(inputs.double(), dim=(0, 2, 3), correction=1)
        torch.testing.assert_close(statistics[f"{name}.running_mean"], mean.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(statistics[f"{name}.running_var"], var.float(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=50)


def train(results: Path, data: Path) -> int:
    args = ["train", str(SPEC), "--data", str(data), "--results", str(results)]
    return main(args + [item for setting in SETTINGS for item in ("--set", setting)])


def run_dir(results: Path) -> Path:
    return results / "runs" / "cifar_resnet20" / "seed0"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    results = tmp_path_factory.mktemp("reference")
    assert train(results, data) == 0
    return results


def test_final_json_holds_both_test_errors_and_the_checkpoint_both_statistics(reference):
    final = json.loads((run_dir(reference) / "final.json").read_text())
    rows = (run_dir(reference) / "metrics.csv").read_text().splitlines()
    assert final["bn_stats"] == "precise"  # CIFAR's base spec
    assert final["moving_bn"]["final_test_error"] == float(rows[-1].split(",")[8])  # the last row's test
    assert final["precise_bn"]["images"] == 48
    assert final["final_test_error"] == final["precise_bn"]["final_test_error"]
    state = load_checkpoint(run_dir(reference) / "checkpoints")
    precise = state[PRECISE_BN]["statistics"]
    assert precise.keys() == {k for k in state["model"] if k.endswith(("running_mean", "running_var"))}
    assert not torch.equal(precise["bn.running_mean"], state["model"]["bn.running_mean"])
    model, _ = load_run_model(run_dir(reference))  # what `repro responses` reads: the chosen statistics
    assert torch.equal(model.bn.running_var, precise["bn.running_var"])


@pytest.mark.slow
def test_a_stop_during_the_precise_pass_resumes_to_the_same_result(reference, data, tmp_path, monkeypatch):
    real = repro.engine.precise_statistics

    def stopped_at_once(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler remembers it: the pass stops first
        return real(*args, **kwargs)

    monkeypatch.setattr(repro.engine, "precise_statistics", stopped_at_once)
    assert train(tmp_path, data) == 75
    assert not (run_dir(tmp_path) / "final.json").exists()
    monkeypatch.setattr(repro.engine, "precise_statistics", real)
    assert train(tmp_path, data) == 0
    assert (run_dir(tmp_path) / "metrics.csv").read_text().split("\n")[0] == \
        (run_dir(reference) / "metrics.csv").read_text().split("\n")[0]
    ours, theirs = (json.loads((run_dir(r) / "final.json").read_text()) for r in (tmp_path, reference))
    for key in ("final_test_error", "moving_bn", "precise_bn", "bn_stats"):
        assert ours[key] == theirs[key]
    a, b = (load_checkpoint(run_dir(r) / "checkpoints")[PRECISE_BN]["statistics"] for r in (tmp_path, reference))
    assert all(torch.equal(a[k], b[k]) for k in a)
