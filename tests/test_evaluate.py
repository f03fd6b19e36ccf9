"""`repro evaluate`: a finished run's final network tested again, written beside final.json; the mechanics of
Table 4's multi-scale test (which scales, flips averaged, bounded batches at 640 pixels) with a network
that records what it sees; and Table 4 in the report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from repro import paper
from repro.cli import main
from repro.contract import EXIT_USAGE
from repro.data.imagenet import resized_size
from repro.engine import train
from repro.errors import ReproError
from repro.reports import make_report
from repro.paper import TABLE4_SCALES
from repro.reuse import evaluation_path
from repro.reuse.evaluate import MULTI_SCALE_SIDES, ScaledImages, evaluate_run, multi_scale_probabilities
from repro.run_network import fit_mean
from repro.spec import load_spec, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["run.device=cpu", "run.progress=log", "data.workers=0", "data.mean_sample_size=4",
         "data.eval_batch_size=4", "optim.batch_size=1", "optim.max_iters=1", "optim.lr_milestones=[]",
         "eval.final=[]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("imagenet")
    assert main(["make-data", "imagenet", "--out", str(out), "--classes", "2", "--train", "2", "--val", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished smoke-size ImageNet run (ResNet-18, one iteration) trained with --data, as the suite does."""
    spec = load_spec(ROOT / "experiments" / "imagenet" / "resnet18.yaml", parse_overrides(SMALL))
    results = tmp_path_factory.mktemp("results")
    assert train(spec, results, str(data)) == 0
    return results / "runs" / "imagenet_resnet18" / "seed0"


def test_the_multi_scale_test_uses_the_papers_shorter_sides():
    assert MULTI_SCALE_SIDES == paper.TABLE4_SCALES == (224, 256, 384, 480, 640)  # Sec. 3.4


def test_center_evaluation_writes_beside_final_json_and_matches_the_runs_own_test(run, data, capsys):
    final_before = (run / "final.json").read_bytes()
    checkpoints = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    code = main(["evaluate", str(run), "--protocol", "center", "--data", str(data), "--device", "cpu",
                 "--workers", "0"])
    assert code == 0 and "evaluations/center.json" in capsys.readouterr().out
    record = json.loads((run / "evaluations" / "center.json").read_text())
    last = pd.read_csv(run / "metrics.csv").iloc[-1]
    assert record["images"] == 2 and record["crops"] == 1 and record["iteration"] == 1
    assert record["loss"] == pytest.approx(last.test_loss, rel=1e-4)  # the per-epoch test of the same network
    assert record["top1_error"] == json.loads(final_before)["center_top1_error"]
    assert (run / "final.json").read_bytes() == final_before
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == checkpoints


def test_multi_scale_evaluation_of_a_final_network(run, data):
    path, record = evaluate_run(run, "multi_scale", data=str(data), workers=0, sides=(64,))
    assert path == run / "evaluations" / "multi_scale.json" and json.loads(path.read_text()) == record
    assert record["scales"] == [64] and record["flips"] and record["images"] == 2
    assert 0 <= record["top5_error"] <= record["top1_error"] <= 100


@pytest.mark.parametrize("change, message", [
    (lambda final: None, "has not finished"),
    (lambda final: {**final, "status": "diverged"}, "did not finish"),
    (lambda final: {**final, "iterations": 7}, "not the final iteration 7"),
])
def test_a_run_without_its_final_network_is_refused(run, data, tmp_path, capsys, change, message):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("evaluations"))
    final = change(json.loads((run / "final.json").read_text()))
    if final is None:
        (copy / "final.json").unlink()
    else:
        (copy / "final.json").write_text(json.dumps(final))
    assert main(["evaluate", str(copy), "--protocol", "center", "--data", str(data), "--device", "cpu"]) == EXIT_USAGE
    assert message in capsys.readouterr().err and not (copy / "evaluations").exists()


# --- the multi-scale mechanics, with a network that records its inputs ----------------------------


class Recorder(nn.Module):
    """Three class scores from the left and right halves of the first channel: an image and its mirror
    score differently, so averaging over flips shows. Records every batch it is given and its scores."""

    def __init__(self):
        super().__init__()
        self.inputs, self.scores = [], []

    def forward(self, x):
        half = x.shape[-1] // 2
        left, right = x[:, 0, :, :half].mean((1, 2)), x[:, 0, :, half:].mean((1, 2))
        scores = torch.stack([left, right, left * right], 1) * 20
        self.inputs.append(x.clone())
        self.scores.append(scores.softmax(1))
        return scores


def write_images(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """One class folder holding a random RGB image of each (width, height), as PNG (no JPEG rounding)."""
    folder = root / "val" / "n00000000"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return root / "val"


def scores_of(model, val: Path, budget: int, sides=MULTI_SCALE_SIDES):
    mean = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ScaledImages(ImageFolder(str(val)), sides), batch_size=8, collate_fn=list)
    return multi_scale_probabilities(model, loader, mean, torch.device("cpu"), budget), mean


def test_each_image_is_seen_at_the_five_shorter_sides_and_flipped(tmp_path):
    val = write_images(tmp_path, {"a": (120, 90)})
    model = Recorder()
    (probabilities, targets), mean = scores_of(model, val, budget=8 * 640 * 640)
    views = [x for batch in model.inputs for x in batch]
    assert sorted(tuple(x.shape[-2:]) for x in views) == sorted(
        resized_size(120, 90, side) for side in MULTI_SCALE_SIDES for _ in range(2))  # (224, 298) ... (640, 853)
    for batch in model.inputs:  # each pass holds views and their mirror images, each minus the mean image
        half = len(batch) // 2
        pixels = batch + fit_mean(mean, batch.shape[-2:])  # the mean image, resized to the view
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        torch.testing.assert_close(pixels[:half].flip(-1), pixels[half:])
    every_view = torch.cat(model.scores)
    assert every_view.shape[0] == 10 and targets.tolist() == [0]
    torch.testing.assert_close(probabilities[0], every_view.mean(0))  # 5 scales x 2 flips, averaged
    unflipped = torch.cat([s[:len(s) // 2] for s in model.scores]).mean(0)
    assert not torch.allclose(probabilities[0], unflipped, atol=1e-3)


def test_batches_hold_at_most_the_pixel_budget_at_640(tmp_path, capsys):
    val = write_images(tmp_path, {"a": (100, 75), "b": (100, 75), "panorama": (400, 50)})
    budget = 640 * 1920  # one view of the widest image the test keeps, 3:1 at 640
    model = Recorder()
    (probabilities, _), _ = scores_of(model, val, budget)
    pixels = [x.shape[0] * x.shape[-2] * x.shape[-1] for x in model.inputs]
    assert max(pixels) <= budget
    shapes = {tuple(x.shape) for x in model.inputs}
    assert (1, 3, 640, 1920) in shapes  # the panorama, cropped to 3:1; it and its mirror take two passes
    assert (4, 3, 224, 298) in shapes  # two images of one size and their mirror images share a pass
    assert max(x.shape[-1] for x in model.inputs) == 1920

    unbounded, _ = scores_of(Recorder(), val, budget=10 ** 9)
    torch.testing.assert_close(probabilities, unbounded[0])  # how views are batched changes no score
    with pytest.raises(ReproError, match="max_batch_pixels"):
        scores_of(Recorder(), val, budget=224 * 224)
    # the command refuses a budget below one view of 640 x 1920 before it reads anything
    assert main(["evaluate", str(tmp_path), "--protocol", "multi_scale", "--max-batch-pixels", "100"]) == EXIT_USAGE
    assert "give at least 1,228,800" in capsys.readouterr().err


# --- Table 4 in the report ---------------------------------------------------------------------------


def write_finished_run(results: Path, name: str, *, multi_scale: dict | None = None) -> Path:
    folder = results / "runs" / name / "seed0"
    folder.mkdir(parents=True)
    spec = load_spec(ROOT / "experiments" / "imagenet" / f"{name.removeprefix('imagenet_')}.yaml")
    (folder / "config.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    pd.DataFrame([{"epoch": 1, "iteration": 100, "train_error": 30.0, "test_error": 25.0, "partial": 0}]).to_csv(
        folder / "metrics.csv", index=False)
    errors = {"ten_crop_top1_error": 22.0, "ten_crop_top5_error": 6.0, "center_top1_error": 25.0,
              "center_top5_error": 8.0}
    (folder / "final.json").write_text(json.dumps({"status": "finished", "final_test_error": 25.0,
                                                   "iterations": 100, **errors}))
    if multi_scale is not None:
        (folder / "evaluations").mkdir()
        (folder / "evaluations" / "multi_scale.json").write_text(json.dumps(
            {"protocol": "multi_scale", "scales": list(MULTI_SCALE_SIDES), "flips": True, **multi_scale}))
    return folder


def test_table4_and_its_verdicts_appear_once_a_table4_network_has_finished(tmp_path):
    experiments = tmp_path / "experiments"
    shutil.copytree(ROOT / "experiments" / "imagenet", experiments / "imagenet")
    suite = experiments / "suite.yaml"
    suite.write_text(yaml.safe_dump({"seeds": {"imagenet": 1}, "figures": {}, "tables": {"table2": []},
                                     "extras": ["imagenet_resnet50", "imagenet_resnet101", "imagenet_resnet152"]}))
    (tmp_path / "empty").mkdir()
    report = make_report(tmp_path / "empty", suite).read_text()
    # nothing has finished: no Table 4 claim or table (the extras' Table 3 claims may name Table 4's test)
    assert "(Table 4)" not in report and "multi-scale test (Table 4)" not in report

    results = tmp_path / "results"
    write_finished_run(results, "imagenet_resnet50", multi_scale={"top1_error": 21.2, "top5_error": 5.5})
    write_finished_run(results, "imagenet_resnet101")  # finished, not yet tested
    other = write_finished_run(results, "imagenet_resnet152", multi_scale={"top1_error": 19.0, "top5_error": 4.0})
    (other / "evaluations" / "multi_scale.json").write_text(json.dumps(
        {"scales": [64, 96], "flips": True, "top1_error": 19.0, "top5_error": 4.0}))  # not Table 4's scales
    report = make_report(results, suite).read_text()

    claims = [line for line in report.splitlines() if line.startswith("- **") and "(Table 4)" in line]
    assert len(claims) == 3
    assert claims[0].startswith("- **PASS** ResNet-50 B multi-scale top-1 error within ±1.0 pp of the paper's 20.74")
    assert "difference +0.46 pp" in claims[0]
    assert claims[1].startswith("- **NOT RUN** ResNet-101 B")
    assert "repro evaluate RUN --protocol multi_scale" in claims[1]
    assert str(results / "runs" / "imagenet_resnet101" / "seed0") in claims[1]
    assert claims[2].startswith("- **NOT RUN** ResNet-152 B")
    table = pd.read_csv(results / "tables" / "table4.csv").set_index("model")
    assert table.loc["imagenet_resnet50", "multi_scale_top1_mean"] == 21.2
    assert table.loc["imagenet_resnet50", "paper_top5"] == 5.25
    assert table.loc["imagenet_resnet101", "not_counted"] == "seed 0: not evaluated"
    assert "**ImageNet validation error with the multi-scale test (Table 4)**" in report


def test_table4_tests_each_finished_table4_run_once(tmp_path, monkeypatch):
    import repro.reuse.evaluate as evaluate_module

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"seeds": {"imagenet": 1}, "figures": {}, "tables": {},
                                     "extras": ["imagenet_resnet50", "imagenet_resnet18"]}))
    runs = tmp_path / "runs" / "imagenet_resnet50"
    for seed, status in enumerate(["finished", "finished", None, "diverged"]):
        (runs / f"seed{seed}").mkdir(parents=True)
        if status:
            (runs / f"seed{seed}" / "final.json").write_text(json.dumps({"status": status}))
    tested = evaluation_path(runs / "seed0", "multi_scale")
    tested.parent.mkdir()
    tested.write_text(json.dumps({"scales": list(TABLE4_SCALES), "flips": True, "top1_error": 20.0, "top5_error": 5.0}))
    (tmp_path / "runs" / "imagenet_resnet18" / "seed0").mkdir(parents=True)  # not in Table 4
    (tmp_path / "runs" / "imagenet_resnet18" / "seed0" / "final.json").write_text(json.dumps({"status": "finished"}))
    calls = []
    monkeypatch.setattr(evaluate_module, "evaluate_run",
                        lambda run, protocol, **kwargs: calls.append((run, protocol)) or (None, {"top1_error": 1.0}))
    done = list(evaluate_module.evaluate_table4(tmp_path, suite, data="DATA", device="cpu"))
    assert calls == [(runs / "seed1", "multi_scale")] and [run for run, _ in done] == [runs / "seed1"]
