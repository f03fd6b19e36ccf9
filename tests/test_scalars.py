"""run.tensorboard: the event files hold metrics.csv's numbers and each iteration's loss and rate; they
are rebuilt from the CSV when missing; without the extra the key is a one-line error."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from repro.cli import main
from repro.contract import EVENTS, EXIT_USAGE, FINAL
from repro.data.generated import write_cifar10
from repro.errors import ReproError
from repro.suite.run_all import add_arguments, run_all

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "cifar10" / "resnet20.yaml"
# ResNet-8 on 128 generated images, batch 32: an epoch of 4 iterations, then a partial one of 2.
TINY = ["model.depth=8", "run.device=cpu", "run.progress=log", "data.verify_checksums=false",
        "data.eval_batch_size=64", "optim.batch_size=32", "optim.max_iters=6", "optim.lr_milestones=[3,5]"]
SCALAR_COLUMNS = ["lr", "train_images", "partial", "train_loss", "train_error", "test_loss", "test_error",
                  "epoch_seconds", "images_per_second"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=128, n_test=64)


def train(results: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "repro", "train", str(SPEC), "--data", str(data), "--results", str(results)]
    for assignment in TINY + list(extra):
        command += ["--set", assignment]
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


def events(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_csv_in_events(run: Path, found: dict) -> None:
    rows = pd.read_csv(run / "metrics.csv")
    assert len(rows) == 2  # a whole epoch and a partial one
    for column in SCALAR_COLUMNS:
        assert [step for step, _ in found[f"epoch/{column}"]] == rows["iteration"].tolist()
        assert [value for _, value in found[f"epoch/{column}"]] == pytest.approx(rows[column].tolist(), rel=1e-6)


@pytest.mark.slow
def test_events_hold_the_csv_numbers_and_every_iteration(data, tmp_path):
    pytest.importorskip("tensorboard")
    result = train(tmp_path, data, "run.tensorboard=true")
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "cifar_resnet20" / "seed0"
    assert list(run.glob(f"{EVENTS}*"))
    found = events(run)
    assert_csv_in_events(run, found)
    assert [step for step, _ in found["iteration/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [lr for _, lr in found["iteration/lr"]] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001])
    # the mean of an epoch's iteration losses is its CSV row's training loss (equal batches of 32)
    losses = [loss for _, loss in found["iteration/loss"]]
    assert sum(losses[:4]) / 4 == pytest.approx(pd.read_csv(run / "metrics.csv")["train_loss"][0], rel=1e-5)


@pytest.mark.slow
def test_missing_events_are_rebuilt_from_the_csv_on_resume(data, tmp_path):
    pytest.importorskip("tensorboard")
    assert train(tmp_path, data).returncode == 0  # without events
    run = tmp_path / "runs" / "cifar_resnet20" / "seed0"
    assert not list(run.glob(f"{EVENTS}*"))
    (run / FINAL).unlink()  # at max_iters without final.json: the next start only finishes the run
    result = train(tmp_path, data, "run.tensorboard=true")
    assert result.returncode == 0, result.stdout + result.stderr
    found = events(run)
    assert_csv_in_events(run, found)
    assert "iteration/loss" not in found  # earlier starts' iterations are not in the CSV


def test_without_the_extra_the_key_is_a_one_line_error_and_nothing_is_written(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: importing it fails
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    arguments = ["train", str(SPEC), "--data", str(data), "--results", str(tmp_path / "results")]
    for assignment in TINY + ["run.tensorboard=true"]:
        arguments += ["--set", assignment]
    assert main(arguments) == EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "run.tensorboard" in error and "repro[tensorboard]" in error, error
    assert not (tmp_path / "results").exists()


def test_run_all_tensorboard_sets_the_key_on_every_run(capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    suite = str(SPEC.parents[1] / "suite.yaml")
    assert run_all(parser.parse_args(["--smoke", "--dry-run", "--tensorboard", "--suite", suite])) == 0
    trains = [line for line in capsys.readouterr().out.splitlines() if " train " in line]
    assert trains and all("--set run.tensorboard=true" in line for line in trains)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed: refused before anything runs
    with pytest.raises(ReproError, match=r"--tensorboard needs the optional extra `tensorboard`"):
        run_all(parser.parse_args(["--smoke", "--dry-run", "--tensorboard", "--suite", suite]))
