"""`repro predict`: the top-k classes of images whose class is known, from a fine-tuned network and from an
ImageNet run, the image grid, and an unreadable file reported in its row."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from torch import nn

from repro.checkpoint import save_checkpoint
from repro.cli import main
from repro.contract import EXIT_USAGE
from repro.data.imagenet import center_plan, decode, normalize, read_header, resample
from repro.reuse.networks import load_network
from repro.run_network import torchvision_state
from repro.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}
SMALL = ["run.device=cpu", "run.progress=log", "data.workers=0", "data.mean_sample_size=6",
         "data.eval_batch_size=4", "optim.batch_size=1", "optim.max_iters=1", "optim.lr_milestones=[]",
         "eval.final=[]"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Three classes anyone can tell apart: noisy images of one colour each, 2 for training, 1 to test."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 1)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.integers(-30, 31, (70, 90, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{name}_{i}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def theirs():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def crop(path: Path) -> torch.Tensor:
    """The validation pipeline's center crop of an image (repro/data/imagenet.py)."""
    data = path.read_bytes()
    header = read_header(data)
    plan = center_plan(header.width, header.height)
    return resample(decode(data, header, plan.resized), plan)[0]


@pytest.fixture(scope="module")
def run(colours, theirs, tmp_path_factory):
    """A network fine-tuned from torchvision's ResNet-18 (random weights on disk) whose head is then set to
    the nearest centroid of the training images' features: it knows the three colours."""
    tmp = tmp_path_factory.mktemp("finetune")
    torch.save(theirs.state_dict(), tmp / "resnet18.pth")
    args = ["finetune", "--from", str(tmp / "resnet18.pth"), "--data", str(colours), "--freeze-bn",
            "--results", str(tmp / "results")]
    assert main(args + [a for s in SMALL for a in ("--set", s)]) == 0
    folder = next((tmp / "results" / "runs").iterdir()) / "seed0"

    model, spec, state = load_network(folder)
    head, model.network.fc = model.network.fc, nn.Identity()
    with torch.no_grad():
        centroids = torch.stack([
            model(normalize(torch.stack([crop(p) for p in sorted((colours / "train" / name).iterdir())]),
                            model.data_mean, None)).mean(0)
            for name in spec.finetune.classes])
    state["model"]["network.fc.weight"] = centroids  # argmax of c.f - |c|^2/2 is the nearest centroid
    state["model"]["network.fc.bias"] = -0.5 * centroids.pow(2).sum(1)
    save_checkpoint(folder / "checkpoints", state)
    return folder


def test_predict_names_the_class_of_each_image_and_draws_the_grid(run, colours, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    grid = tmp_path / "grid.png"
    code = main(["predict", "--from", str(run), str(colours / "val"), str(broken), "--top", "2", "--grid", str(grid)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == ["image", "true", "rank", "class", "probability"]
    rows = [line.split() for line in out[1:7]]
    for name, (first, second) in zip(sorted(COLOURS), zip(rows[0::2], rows[1::2])):
        path, true, rank, guess, probability = first
        assert Path(path).parent.name == name and true == name and rank == "1" and guess == name
        assert second[:1] == ["2"] and second[1] != name and float(second[2]) <= float(probability) <= 1
    assert str(broken) in out[7] and "unreadable: not an image" in out[7]
    assert out[8] == "top-1 correct: 3 of the 3 images whose folder names a class"
    assert out[9] == str(grid)
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width >= 3 * 200

    # the validation pipeline of `repro evaluate` agrees: every one right
    assert main(["evaluate", str(run), "--protocol", "center", "--device", "cpu", "--workers", "0"]) == 0
    assert json.loads((run / "evaluations" / "center.json").read_text())["top1_error"] == 0


def test_an_imagenet_run_takes_its_mean_image_and_class_names_from_its_data(colours, theirs, tmp_path,
                                                                            monkeypatch, capsys):
    """A run in progress of torchvision's architecture (ResNet-18, option B) on the colours' folders."""
    spec = load_spec(ROOT / "experiments" / "imagenet" / "resnet18.yaml",
                     {"model": {"shortcut": "B", "bottleneck_stride": "v1.5"}, "data": {"mean_sample_size": 6}})
    folder = tmp_path / "runs" / spec.name / "seed0"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    save_checkpoint(folder / "checkpoints", {
        "model": torchvision_state(theirs.state_dict(), "torchvision")[1], "optimizer": {}, "schedule": {},
        "iteration": 5, "epoch": 0, "batch": 5, "rows": [], "rng": {}, "config": spec.to_dict()})
    image = str(colours / "val" / "red" / "red_0.jpg")
    monkeypatch.delenv("REPRO_DATA", raising=False)
    assert main(["predict", "--from", str(folder), image]) == EXIT_USAGE
    assert "pass --data with the root it trained on" in capsys.readouterr().err

    assert main(["predict", "--from", str(folder), image, "--data", str(colours), "--top", "3"]) == 0
    captured = capsys.readouterr()
    assert "has not finished; its checkpoint of iteration 5 predicts" in captured.err
    rows = [line.split() for line in captured.out.splitlines()[1:4]]
    assert rows[0][:3] == [image, "red", "1"] and [r[0] for r in rows[1:]] == ["2", "3"]
    names = [" ".join(rows[0][3:-1])] + [" ".join(r[1:-1]) for r in rows[1:]]
    assert all(n in COLOURS or n.startswith("class ") for n in names)  # 1000 outputs, 3 class folders
