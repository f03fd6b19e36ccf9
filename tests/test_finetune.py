"""`repro finetune` on generated class folders, from a smoke-size ImageNet run and from torchvision weights
on disk: each strategy trains exactly the weights it names, frozen BN stays bit-identical, a stopped run
resumes exactly, and a wrong source or dataset is refused before anything is written."""
from __future__ import annotations

import copy
import os
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
import yaml
from torch import nn

import repro.engine
import repro.run_network
from repro.checkpoint import load_checkpoint
from repro.cli import main
from repro.contract import EXIT_PREEMPTED, EXIT_USAGE
from repro.engine import train
from repro.reuse.finetune import FINETUNE_SPECS
from repro.reuse.networks import torchvision_network
from repro.run_network import FinetuneNet, read_torchvision, torchvision_state
from repro.spec import ModelSpec, load_spec, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
# One iteration of one image at 224 pixels: a ResNet-18 step takes seconds on a 2-core CPU.
SMALL = ["run.device=cpu", "run.progress=log", "data.workers=0", "data.mean_sample_size=4",
         "data.eval_batch_size=4", "optim.batch_size=1", "optim.max_iters=1", "optim.lr_milestones=[]",
         "eval.final=[]"]
TIME_COLUMNS = ["epoch_seconds", "images_per_second"]


def make_data(out: Path, classes: int, seed: int) -> Path:
    # through the CLI, wherever the generator lives
    assert main(["make-data", "imagenet", "--out", str(out), "--classes", str(classes), "--train", "2",
                 "--val", "1", "--seed", str(seed)]) == 0
    return out


@pytest.fixture(scope="module")
def source_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("imagenet"), classes=2, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The dataset to fine-tune on: 2 classes of 2 training images and 1 validation image."""
    return make_data(tmp_path_factory.mktemp("flowers"), classes=2, seed=1)


@pytest.fixture(scope="module")
def source(source_data, tmp_path_factory):
    """A finished smoke-size ImageNet run: ResNet-18 (option A) after one iteration."""
    spec = load_spec(ROOT / "experiments" / "imagenet" / "resnet18.yaml",
                     parse_overrides(SMALL + [f"data.root={source_data}"]))
    results = tmp_path_factory.mktemp("source")
    assert train(spec, results) == 0
    return results / "runs" / "imagenet_resnet18" / "seed0"


def finetune(results: Path, source: Path, data: Path, *extra: str, settings=SMALL) -> tuple[int, Path]:
    args = ["finetune", "--from", str(source), "--data", str(data), "--results", str(results), *extra]
    for assignment in settings:
        args += ["--set", assignment]
    code = main(args)
    runs = sorted(results.glob("runs/*/seed0"))
    return code, runs[0] if runs else None


@pytest.fixture
def built(monkeypatch):
    """The network the trainer builds, recorded as it starts: its weights and which of them train."""
    record = {}
    build = repro.run_network.build_network

    def recording(spec, **kwargs):
        network = build(spec, **kwargs)
        record["state"] = copy.deepcopy(network.state_dict())
        record["trained"] = {name for name, p in network.named_parameters() if p.requires_grad}
        record["network"] = network
        return network

    monkeypatch.setattr(repro.engine, "build_network", recording)  # the trainer's own reference
    return record


def trained_names(network: nn.Module, strategy: str) -> set[str]:
    """What each strategy promises to train, by parameter name."""
    prefixes = {"head": ("network.fc.",), "last_stage": ("network.fc.", "network.stages.3."), "all": ("",)}[strategy]
    return {name for name, _ in network.named_parameters() if name.startswith(prefixes)}


def check_strategy(run: Path, built: dict, source_state: dict, data: Path, strategy: str, freeze_bn: bool) -> None:
    """The network trained exactly what `strategy` names, from the source's weights (`source_state`, in our
    names), and with --freeze-bn left every BN layer's statistics and affine parameters as the source had
    them, bit for bit."""
    network, start = built["network"], built["state"]
    assert built["trained"] == trained_names(network, strategy)
    assert network.network.fc.out_features == 2  # the new head has one output per class folder

    for key, value in start.items():  # the backbone starts from the source's weights, bit for bit
        if key.startswith("network.") and not key.startswith("network.fc."):
            assert torch.equal(value, source_state[key.removeprefix("network.")]), key

    final = load_checkpoint(run / "checkpoints")["model"]
    changed = {key for key, value in final.items() if not torch.equal(value, start[key])}
    parameters = dict(network.named_parameters())
    assert {key for key in changed if key in parameters} == built["trained"]

    batchnorm_buffers = [key for key in final if key.endswith(("running_mean", "running_var"))]
    assert batchnorm_buffers
    if freeze_bn:
        assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
        layers = [key.removesuffix("running_mean") for key in batchnorm_buffers if key.endswith("running_mean")]
        for key in (layer + part for layer in layers for part in ("weight", "bias", "running_mean", "running_var")):
            assert torch.equal(final[key], source_state[key.removeprefix("network.")]), key
    else:  # documented: without --freeze-bn, BN statistics keep updating, even under frozen weights
        assert set(batchnorm_buffers) <= changed

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["finetune"]["strategy"] == strategy and config["finetune"]["freeze_bn"] == freeze_bn
    assert config["finetune"]["classes"] == sorted(p.name for p in (data / "train").iterdir())
    assert (run / "final.json").is_file() and len(pd.read_csv(run / "metrics.csv")) == 1


# Each strategy is checked once: head below (with resume), last_stage with --freeze-bn from torchvision's
# weights, all here.
def test_strategy_all_trains_every_weight(source, data, built, tmp_path):
    code, run = finetune(tmp_path, source, data, "--strategy", "all")
    assert code == 0
    check_strategy(run, built, load_checkpoint(source / "checkpoints")["model"], data, "all", freeze_bn=False)


def test_head_strategy_and_a_stopped_finetuning_resumes_exactly(source, data, built, tmp_path, monkeypatch):
    settings = SMALL[:-3] + ["optim.max_iters=2", "optim.lr_milestones=[1]", "eval.final=[]"]
    code, reference = finetune(tmp_path / "reference", source, data, settings=settings)
    assert code == 0
    check_strategy(reference, built, load_checkpoint(source / "checkpoints")["model"], data, "head", freeze_bn=False)

    def stop_at_the_first_step(mode, total, is_main):
        def wrap(batches, epoch):
            for batch in batches:
                os.kill(os.getpid(), signal.SIGTERM)  # as Slurm preempts; the step in flight finishes
                yield batch
        return wrap

    with monkeypatch.context() as patch:
        patch.setattr(repro.engine, "progress_display", stop_at_the_first_step)
        code, run = finetune(tmp_path / "stopped", source, data, settings=settings)
    assert code == EXIT_PREEMPTED and not (run / "final.json").exists()
    assert load_checkpoint(run / "checkpoints")["iteration"] == 1
    code, run = finetune(tmp_path / "stopped", source, data, settings=settings)
    assert code == 0

    expected, resumed = (load_checkpoint(r / "checkpoints")["model"] for r in (reference, run))
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    rows = [pd.read_csv(r / "metrics.csv").drop(columns=TIME_COLUMNS) for r in (reference, run)]
    pd.testing.assert_frame_equal(*rows)


def randomized_torchvision(name: str) -> nn.Module:
    """A torchvision ResNet with random weights and BN statistics (no weights are downloaded)."""
    torch.manual_seed(0)
    network = getattr(torchvision.models, name)(weights=None)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.2, 0.2)
    return network.eval()


def test_torchvision_bottleneck_resnets_map_onto_ours_exactly():
    theirs = randomized_torchvision("resnet50")
    model, state = torchvision_state(theirs.state_dict(), "resnet50")
    assert (model["depth"], model["shortcut"], model["bottleneck_stride"]) == (50, "B", "v1.5")
    ours = ModelSpec(**model).build().eval()
    ours.load_state_dict(state)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_finetuning_from_torchvision_weights_on_disk(data, built, tmp_path):
    theirs = randomized_torchvision("resnet18")
    weights = tmp_path / "resnet18-f37072fd.pth"
    torch.save(theirs.state_dict(), weights)
    ours, model = torchvision_network(weights)
    assert (model.depth, model.shortcut) == (18, "B")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs(x))

    code, run = finetune(tmp_path / "results", weights, data, "--strategy", "last_stage", "--freeze-bn")
    assert code == 0 and run.parent.name == f"ft-torchvision-resnet18-{data.name}-last_stage-frozenbn"
    check_strategy(run, built, torchvision_state(theirs.state_dict(), "resnet18")[1], data, "last_stage",
                   freeze_bn=True)
    network: FinetuneNet = built["network"]
    assert torch.equal(network.source_std.flatten(), torch.tensor((0.229, 0.224, 0.225)))
    # Given what the pipeline gives (pixels minus the dataset's mean image), the network it wraps sees
    # torchvision's normalization, (pixels - mean) / std per channel, on which its weights were trained.
    pixels = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        ours = network.eval()(pixels - network.data_mean)
        expected = network.network((pixels - torch.tensor((0.485, 0.456, 0.406))[:, None, None])
                                   / torch.tensor((0.229, 0.224, 0.225))[:, None, None])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_the_strategies_recipes_are_commented_and_all_uses_a_lower_rate():
    rates = {}
    for strategy in ("head", "last_stage", "all"):
        path = FINETUNE_SPECS / f"{strategy}.yaml"
        assert "#" in path.read_text()
        spec = load_spec(path, {"name": "x", "model": {"arch": "imagenet", "depth": 18},
                                "finetune": {"source": "/s", "classes": ["a", "b"]}})
        assert spec.finetune.strategy == strategy and not spec.finetune.freeze_bn
        rates[strategy] = spec.optim.lr
    assert rates["all"] < rates["head"] and rates["all"] < rates["last_stage"]
    base = (FINETUNE_SPECS / "base.yaml").read_text().splitlines()
    assert all("#" in line for line in base if ":" in line and not line.endswith(":"))  # every default says why


def test_class_folders_that_differ_between_train_and_val_are_refused(source, data, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(data, broken, ignore=shutil.ignore_patterns(".repro-cache"))
    first = sorted((broken / "val").iterdir())[0]
    first.rename(first.with_name("tulips"))
    code, run = finetune(tmp_path / "results", source, broken)
    assert code == EXIT_USAGE and run is None
    message = capsys.readouterr().err
    assert "differ" in message and "only in train: ['n00000000']" in message and "tulips" in message


def test_a_checkpoint_of_another_architecture_is_refused(source, data, tmp_path, capsys):
    other = tmp_path / "imagenet_resnet18" / "seed0"
    shutil.copytree(source, other)
    state = torch.load(other / "checkpoints" / "last.pt", weights_only=True)
    state["model"] = load_spec(ROOT / "experiments" / "imagenet" / "resnet34.yaml").model.build().state_dict()
    torch.save(state, other / "checkpoints" / "last.pt")
    code, _ = finetune(tmp_path / "results", other, data)
    assert code == EXIT_USAGE
    message = capsys.readouterr().err
    assert "does not hold the imagenet ResNet-18 A" in message and "architectures differ" in message
    assert "unexpected: stages.0.2.conv1.weight" in message
    assert not (tmp_path / "results" / "runs").exists() or not any((tmp_path / "results").rglob("metrics.csv"))


def test_weights_that_are_not_a_table1_torchvision_resnet_are_refused(data, tmp_path, capsys):
    state = randomized_torchvision("resnet18").state_dict()
    third = {k.replace("layer1.1.", "layer1.2."): v for k, v in state.items() if k.startswith("layer1.1.")}
    deeper = {**state, **third}  # three blocks in conv2_x: no ResNet of Table 1
    torch.save(deeper, tmp_path / "deeper.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "vgg.pth")
    assert finetune(tmp_path / "results", tmp_path / "deeper.pth", data)[0] == EXIT_USAGE
    assert "basic blocks (3, 2, 2, 2) per stage, not one of Table 1's" in capsys.readouterr().err
    assert finetune(tmp_path / "results", tmp_path / "vgg.pth", data)[0] == EXIT_USAGE
    assert "is not a torchvision ResNet state_dict" in capsys.readouterr().err
    with pytest.raises(Exception, match="not a torchvision ResNet"):
        read_torchvision(tmp_path / "vgg.pth")


def test_a_cifar_run_is_refused_as_a_source(data, tmp_path, capsys):
    run = tmp_path / "cifar_resnet20" / "seed0"
    run.mkdir(parents=True)
    spec = load_spec(ROOT / "experiments" / "cifar10" / "resnet20.yaml")
    (run / "config.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    assert finetune(tmp_path / "results", run, data)[0] == EXIT_USAGE
    assert "trained a cifar network; fine-tuning starts from an ImageNet network" in capsys.readouterr().err
