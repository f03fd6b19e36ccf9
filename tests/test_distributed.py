"""DDP with torchrun on CPU (gloo): two processes train the same run as one process with the same
global batch, and a run whose rank is killed resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from repro.checkpoint import load_checkpoint
from repro.data.generated import write_cifar10

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "cifar10" / "resnet20.yaml"
# sync_bn makes BN statistics cover the global batch, as in the one-process run; fp32 keeps the
# comparison tight (the default fp32 precision).
SETTINGS = ["model.depth=8", "model.sync_bn=true", "run.device=cpu", "run.progress=log",
            "data.verify_checksums=false", "data.eval_batch_size=64", "optim.batch_size=32",
            "optim.max_iters=28", "optim.lr_milestones=[16,24]",
            "optim.lr=0.02"]  # a gentler rate than 0.1 keeps float rounding from being amplified
TIME_COLUMNS = ["epoch_seconds", "images_per_second"]


def command(results: Path, data: Path, processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    args = ["-m", "repro", "train", str(SPEC), "--data", str(data), "--results", str(results)]
    args += [item for setting in SETTINGS for item in ("--set", setting)]
    return (launcher if processes > 1 else [sys.executable]) + args


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(results: Path, data: Path, processes: int) -> subprocess.CompletedProcess:
    done = subprocess.run(command(results, data, processes), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def folder(results: Path) -> Path:
    return results / "runs" / "cifar_resnet20" / "seed0"


def assert_close_runs(a: Path, b: Path) -> None:
    rows_a = pd.read_csv(folder(a) / "metrics.csv").drop(columns=TIME_COLUMNS)
    rows_b = pd.read_csv(folder(b) / "metrics.csv").drop(columns=TIME_COLUMNS)
    assert list(rows_a.columns) == list(rows_b.columns) and len(rows_a) == len(rows_b) == 4
    assert rows_a[["epoch", "iteration", "lr"]].equals(rows_b[["epoch", "iteration", "lr"]])
    np.testing.assert_allclose(rows_a[["train_loss", "test_loss"]], rows_b[["train_loss", "test_loss"]], rtol=2e-3)
    # errors agree to within one image (the final partial epoch has 4 x 32 = 128 training images)
    assert (abs(rows_a.train_error - rows_b.train_error) <= 100 / 128).all()
    assert (abs(rows_a.test_error - rows_b.test_error) <= 100 / 64).all()
    weights_a = load_checkpoint(folder(a) / "checkpoints")["model"]
    weights_b = load_checkpoint(folder(b) / "checkpoints")["model"]
    assert weights_a.keys() == weights_b.keys()
    # float rounding differs between one batch of 32 and two of 16, and 28 SGD steps amplify it a little:
    # the weights as one vector agree to 0.1%
    flat_a = torch.cat([v.double().flatten() for v in weights_a.values()])
    flat_b = torch.cat([weights_b[k].double().flatten() for k in weights_a])
    assert (flat_a - flat_b).norm() <= 1e-3 * flat_b.norm()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=256, n_test=64)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    results = tmp_path_factory.mktemp("one")
    run(results, data, 1)
    return results


def test_two_processes_match_one_process_with_the_same_global_batch(one_process, data, tmp_path):
    done = run(tmp_path, data, 2)
    assert "on cpu x2" in done.stdout + done.stderr
    assert_close_runs(tmp_path, one_process)


def worker_pids(launcher_pid: int) -> list[int]:
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def test_killing_one_rank_then_rerunning_resumes(one_process, data, tmp_path):
    launcher = subprocess.Popen(command(tmp_path, data, 2), env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    metrics = folder(tmp_path) / "metrics.csv"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and launcher.poll() is None, "no epoch was written"
        time.sleep(0.05)
    workers = worker_pids(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # rank 1 dies; torchrun stops the rest
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert not (folder(tmp_path) / "final.json").exists()
    done = run(tmp_path, data, 2)
    assert "resuming" in done.stdout + done.stderr
    assert_close_runs(tmp_path, one_process)
