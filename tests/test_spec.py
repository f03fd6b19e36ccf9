"""Specs are data validated at load: every typo or impossible value names the file and the key."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro.errors import SpecError
from repro.spec import load_spec, parse_overrides, validate

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# the paper's specs; experiments/finetune/ holds the defaults that `repro finetune` completes
PAPER_SPECS = sorted(p for dataset in ("cifar10", "imagenet") for p in (EXPERIMENTS / dataset).glob("*.yaml")
                     if p.name != "base.yaml")


@pytest.mark.parametrize("path", PAPER_SPECS, ids=lambda p: p.stem)
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
    spec = load_spec(spec_file, parse_overrides(["optim.max_iters=10", "optim.lr_milestones=[5]", "model.depth=32"]))
    assert (spec.optim.lr, spec.optim.batch_size, spec.optim.max_iters, spec.model.depth) == (0.05, 64, 10, 32)


@pytest.mark.parametrize("text, key, message", [
    ("name: s\noptim: {lrr: 0.1}\n", "optim.lrr", "unknown key"),
    ("name: s\nmodle: {depth: 20}\n", "modle", "unknown key"),
    ("name: s\noptim: {lr: fast}\n", "optim.lr", "valid number"),
    ("name: s\nmodel: {depth: 21}\n", "model", "6n+2"),
    ("name: s\nmodel: {arch: imagenet, depth: 20}\ndata: {dataset: imagenet}\n", "model", "18, 34, 50, 101, 152"),
    ("name: s\nmodel: {shortcut: B}\n", "model", "option A"),
    ("name: s\noptim: {lr_milestones: [48000, 32000]}\n", "optim", "strictly increasing"),
    ("name: s\noptim: {nesterov: true, momentum: 0}\n", "optim", "nesterov: Nesterov momentum needs a momentum"),
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


def run_train(argv: list[str], capsys) -> tuple[int, str]:
    """`repro train ...` in this process: its exit code and what it wrote to stderr."""
    from repro.cli import main

    code = main(["train", *argv])
    return code, capsys.readouterr().err


CIFAR = "base: base.yaml\nname: s\n"
IMAGENET_PLAIN_B = ("name: s\nmodel: {arch: imagenet, depth: 34, residual: false, shortcut: B}\n"
                    "data: {dataset: imagenet}\n")


@pytest.mark.parametrize("text, sets, where, message", [
    (b"\x80\xfe binary \x00\xff", [], "FILE", "not a text file"),
    ("base: [1]\nname: s\n", [], "FILE", "base: expected the path of a spec file"),
    ("base: 5\nname: s\n", [], "FILE", "got 5"),
    (CIFAR, ["optim.lr_milestones=[8,12"], "--set", "optim.lr_milestones: the value '[8,12' is not valid YAML"),
    (CIFAR, ["optim=5", "optim.lr=0.1"], "--set", "optim.lr: an earlier assignment set optim to 5"),
    (CIFAR, ["optim.lr=0.1", "optim=5"], "--set", "optim: 5 would replace the keys below optim"),
    (CIFAR, ["optim.momentum=-0.9"], "--set", "optim.momentum: Input should be greater than or equal to 0"),
    (CIFAR, ["optim.weight_decay=-1e-4"], "--set", "optim.weight_decay: Input should be greater than or equal to 0"),
    (CIFAR, ["optim.lr=.nan"], "--set", "optim.lr: Input should be a finite number"),
    (CIFAR, ["optim.lr=inf"], "--set", "optim.lr: Input should be a finite number"),
    (CIFAR, ["optim.warmup_lr=.inf"], "--set", "optim.warmup_lr: Input should be a finite number"),
    (CIFAR, ["optim.max_iters=100"], "--set", "optim.lr_milestones: [32000, 48000] lie at or beyond optim.max_iters"),
    (IMAGENET_PLAIN_B, [], "FILE", "model: shortcut: a plain net has no shortcuts"),
], ids=["binary", "base_list", "base_int", "set_bad_yaml", "set_key_below_scalar", "set_scalar_over_keys",
        "momentum", "weight_decay", "lr_nan", "lr_inf", "warmup_lr_inf", "milestones_late", "imagenet_plain_b"])
def test_bad_input_is_one_clean_line_naming_the_file_or_the_set_and_key(tmp_path, capsys, text, sets, where, message):
    write(tmp_path / "base.yaml", (EXPERIMENTS / "cifar10" / "base.yaml").read_text())
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = run_train([str(path), "--data", str(tmp_path / "no_data"), "--results", str(tmp_path / "results"),
                           *(a for s in sets for a in ("--set", s))], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("repro train: error: ")
    assert (str(path) if where == "FILE" else where) in err and message in err
    assert not (tmp_path / "results").exists()


def test_late_milestones_are_refused_only_in_a_milestone_schedule_about_to_train():
    spec = load_spec(EXPERIMENTS / "imagenet" / "resnet18.yaml", parse_overrides(["optim.max_iters=10"]))
    assert spec.optim.lr_schedule == "plateau" and spec.optim.max_iters == 10
    shortened = load_spec(EXPERIMENTS / "cifar10" / "resnet20.yaml",
                          parse_overrides(["optim.max_iters=10", "optim.lr_milestones=[]"]))
    assert shortened.optim.lr_milestones == []
    # a run folder's config.yaml, written before this rule, is a record and stays readable
    record = validate({"name": "s", "optim": {"max_iters": 10}}, "config.yaml")
    assert record.optim.lr_milestones == [32000, 48000]


def test_later_overrides_win_and_mappings_merge():
    assert parse_overrides(["optim.lr=0.1", "optim.lr=0.2"]) == {"optim": {"lr": 0.2}}
    assert parse_overrides(["optim.lr=0.1", "optim={momentum: 0.5}"]) == {"optim": {"lr": 0.1, "momentum": 0.5}}
    with pytest.raises(SpecError, match="dotted KEY"):
        parse_overrides(["optim..lr=1"])


def test_importing_the_spec_module_needs_no_torch():
    code = "import sys, repro.spec; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
