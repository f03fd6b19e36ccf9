"""Specs are data validated at load: every typo or impossible value names the file and the key."""
from pathlib import Path

import pytest
import torch

from repro.errors import SpecError
from repro.spec import load_spec, parse_overrides

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(p for p in EXPERIMENTS.glob("*/*.yaml") if p.name != "base.yaml"),
                         ids=lambda p: p.stem)
def test_every_shipped_spec_loads_and_builds_its_network(path):
    spec = load_spec(path)
    assert spec.name.startswith({"cifar10": "cifar_", "imagenet": "imagenet_"}[path.parent.name])
    assert spec.data.dataset == path.parent.name
    if spec.model.depth < 1000:  # ResNet-1202's 19M parameters take a while to initialise
        assert isinstance(spec.model.build(), torch.nn.Module)


def test_cifar_specs_carry_the_papers_recipe():
    spec = load_spec(EXPERIMENTS / "cifar10" / "resnet110.yaml")
    assert (spec.optim.batch_size, spec.optim.lr, spec.optim.momentum, spec.optim.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert (spec.optim.lr_milestones, spec.optim.max_iters) == ([32000, 48000], 64000)
    assert (spec.optim.warmup_lr, spec.optim.warmup_until_train_error) == (0.01, 80.0)
    assert spec.model.shortcut == "A" and not spec.optim.nesterov
    assert load_spec(EXPERIMENTS / "cifar10" / "resnet56.yaml").optim.warmup_lr is None
    imagenet = load_spec(EXPERIMENTS / "imagenet" / "resnet34.yaml")
    assert (imagenet.optim.batch_size, imagenet.model.shortcut, imagenet.optim.lr_schedule) == (256, "A", "plateau")


def test_base_files_merge_and_overrides_apply(tmp_path):
    write(tmp_path / "base.yaml", "model: {arch: cifar, depth: 20}\noptim: {lr: 0.1, batch_size: 64}\n")
    spec_file = write(tmp_path / "s.yaml", "base: base.yaml\nname: s\noptim: {lr: 0.05}\n")
    spec = load_spec(spec_file, parse_overrides(["optim.max_iters=10", "model.depth=32"]))
    assert (spec.optim.lr, spec.optim.batch_size, spec.optim.max_iters, spec.model.depth) == (0.05, 64, 10, 32)


@pytest.mark.parametrize("text, key, message", [
    ("name: s\noptim: {lrr: 0.1}\n", "optim.lrr", "unknown key"),
    ("name: s\nmodle: {depth: 20}\n", "modle", "unknown key"),
    ("name: s\noptim: {lr: fast}\n", "optim.lr", "valid number"),
    ("name: s\nmodel: {depth: 21}\n", "model", "6n+2"),
    ("name: s\nmodel: {arch: imagenet, depth: 20}\ndata: {dataset: imagenet}\n", "model", "18, 34, 50, 101, 152"),
    ("name: s\nmodel: {shortcut: B}\n", "model", "option A"),
    ("name: s\noptim: {lr_milestones: [48000, 32000]}\n", "optim", "strictly increasing"),
    ("name: s\nrun: {device: gpu}\n", "run", "auto, cpu, cuda"),
    ("name: s\nmodel: {arch: imagenet, depth: 18}\n", "", "needs data.dataset imagenet"),
    ("optim: {lr: 0.1}\n", "name", "Field required"),
    ("name: a/b\n", "", "run folder"),
])
def test_bad_specs_name_the_file_and_the_key(tmp_path, text, key, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(SpecError) as error:
        load_spec(path)
    assert str(path) in str(error.value) and message in str(error.value)
    if key:
        assert f": {key}:" in str(error.value)


def test_missing_base_and_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(write(tmp_path / "a.yaml", "base: nowhere.yaml\nname: a\n"))
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(write(tmp_path / "b.yaml", "name: [unclosed\n"))
    with pytest.raises(SpecError, match="cycle"):
        write(tmp_path / "c.yaml", "base: d.yaml\nname: c\n")
        load_spec(write(tmp_path / "d.yaml", "base: c.yaml\n"))
    with pytest.raises(SpecError, match="KEY=VALUE"):
        parse_overrides(["optim.lr"])
    with pytest.raises(SpecError, match="optim.lrr: unknown key"):
        load_spec(write(tmp_path / "e.yaml", "name: e\n"), parse_overrides(["optim.lrr=1"]))
