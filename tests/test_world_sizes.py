"""Every world size users run (issue 18): DDP over gloo at 1, 2, 4 and 8 processes with the shipped
specs' batch sizes and evaluation batch sizes (only the data, the image counts and max_iters are
shrunk), a training batch that does not divide refused on every process, evaluation shares that differ
or are empty, and the CUDA device chosen before the process group is joined."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from repro import engine
from repro.checkpoint import load_checkpoint
from repro.contract import EXIT_USAGE
from repro.data.generated import write_cifar10, write_imagenet
from repro.distributed import Processes
from repro.errors import ReproError
from repro.spec import load_spec, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "experiments" / "cifar10" / "resnet20.yaml"
IMAGENET = ROOT / "experiments" / "imagenet" / "resnet18.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIME_COLUMNS = ["epoch_seconds", "images_per_second"]
# The shipped CIFAR batch (128) and evaluation batch (500), on 256 training images (2 iterations, one
# epoch) and 504 test images: a full evaluation batch of 500, then one of 4, in which 8 processes leave
# four with nothing. sync_bn gives every world size the BN statistics of the whole batch, so training
# is world size 1's up to float rounding, and the metrics can be compared.
CIFAR_SETTINGS = ["run.device=cpu", "run.progress=log", "data.verify_checksums=false", "model.sync_bn=true",
                  "optim.max_iters=2", "optim.lr_milestones=[]"]


def launch(processes: int, spec: Path, data: Path, results: Path, settings: list[str]) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    args = ["-m", "repro", "train", str(spec), "--data", str(data), "--results", str(results)]
    args += [item for setting in settings for item in ("--set", setting)]
    done = subprocess.run((launcher if processes > 1 else [sys.executable]) + args, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=256, n_test=504)


@pytest.fixture(scope="module")
def cifar_one_process(cifar, tmp_path_factory):
    results = tmp_path_factory.mktemp("one")
    launch(1, CIFAR, cifar, results, CIFAR_SETTINGS)
    return results / "runs" / "cifar_resnet20" / "seed0"


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4, 8])
def test_cifar_at_each_world_size_trains_and_tests_as_one_process(processes, cifar, cifar_one_process, tmp_path):
    done = launch(processes, CIFAR, cifar, tmp_path, CIFAR_SETTINGS)
    assert f"on cpu x{processes}" in done.stdout + done.stderr
    folder = tmp_path / "runs" / "cifar_resnet20" / "seed0"
    assert json.loads((folder / "final.json").read_text())["status"] == "finished"
    ours = pd.read_csv(folder / "metrics.csv").drop(columns=TIME_COLUMNS)
    one = pd.read_csv(cifar_one_process / "metrics.csv").drop(columns=TIME_COLUMNS)
    assert len(ours) == len(one) == 1
    assert ours[["epoch", "iteration", "lr", "train_images"]].equals(one[["epoch", "iteration", "lr", "train_images"]])
    np.testing.assert_allclose(ours[["train_loss", "test_loss"]], one[["train_loss", "test_loss"]], rtol=2e-3)
    # errors within one image: 256 training images, 504 test images (each counted once)
    assert (abs(ours.train_error - one.train_error) <= 100 / 256).all()
    assert (abs(ours.test_error - one.test_error) <= 100 / 504).all()
    weights = load_checkpoint(folder / "checkpoints")["model"]
    reference = load_checkpoint(cifar_one_process / "checkpoints")["model"]
    flat = torch.cat([weights[k].double().flatten() for k in reference])
    flat_one = torch.cat([v.double().flatten() for v in reference.values()])
    assert (flat - flat_one).norm() <= 1e-3 * flat_one.norm()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    # 64 training images: one global batch of 64 (the issue's); 12 validation images, which the shipped
    # evaluation batch of 250 splits into shares of 3 (4 processes) or of 2 and 1 (8)
    return write_imagenet(tmp_path_factory.mktemp("imagenet"), classes=4, n_train=16, n_val=3, short_side=(40, 80))


@pytest.mark.slow
@pytest.mark.parametrize("processes", [4, 8])
def test_imagenet_with_the_shipped_evaluation_batch_at_4_and_8_processes(processes, imagenet, tmp_path):
    """Issue 18: eval_batch_size 250 divides by neither, and every ImageNet run on 4 or 8 GPUs died at start-up.
    One data-loading process each: 8 processes with the shipped 8 workers each would not fit a CI machine."""
    launch(processes, IMAGENET, imagenet, tmp_path, ["run.device=cpu", "run.progress=log", "data.workers=0",
                                                     "optim.batch_size=64", "optim.max_iters=1"])
    folder = tmp_path / "runs" / "imagenet_resnet18" / "seed0"
    final = json.loads((folder / "final.json").read_text())
    assert final["status"] == "finished" and final["iterations"] == 1
    row = pd.read_csv(folder / "metrics.csv").iloc[-1]
    assert row.train_images == 64
    for error in (row.test_error, row.test_top5_error, final["ten_crop_top1_error"], final["ten_crop_top5_error"]):
        assert round(error * 12 / 100, 6).is_integer()  # a whole number of the 12 images, each counted once


def test_a_training_batch_that_does_not_divide_is_refused_on_every_process(cifar, tmp_path):
    """Each process as torchrun starts it (RANK, LOCAL_RANK, WORLD_SIZE): one line, exit 2, nothing
    written, before any process group is joined."""
    ranks = [subprocess.Popen([sys.executable, "-m", "repro", "train", str(CIFAR), "--data", str(cifar), "--results",
                               str(tmp_path / "results"), "--set", "run.device=cpu"],
                              env={**ENV, "WORLD_SIZE": "3", "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(3)]
    for rank in ranks:
        out, err = rank.communicate(timeout=120)
        assert rank.returncode == EXIT_USAGE, out + err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "optim.batch_size 128" in err and "3 processes" in err
    assert not (tmp_path / "results").exists()


def test_evaluation_skips_a_process_share_that_is_empty():
    """Issue 18: a process whose share of the last batch is empty crashed in .view(0, ...)."""
    torch.manual_seed(0)
    model = load_spec(CIFAR, parse_overrides(["model.depth=8"])).model.build()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    args = (nullcontext(), Processes(), torch.device("cpu"))
    with_empty_shares = engine.evaluate(model, [(x[:0], y[:0]), (x, y), (x[:0], y[:0])], *args)
    assert with_empty_shares == engine.evaluate(model, [(x, y)], *args)


def test_the_log_of_a_stop_names_its_cause_on_a_process_that_received_no_signal():
    stop = engine.StopSignals()
    assert stop.cause() == "a stop signal that another process received"
    stop._handle(signal.SIGUSR1, None)
    assert stop.cause() == "signal SIGUSR1"


def test_a_rank_takes_the_gpu_of_its_local_rank_before_joining_the_process_group(cifar, tmp_path, monkeypatch):
    """Issue 18: set_device after init_process_group (and no device_id) opened a context on GPU 0 on every
    rank. The CUDA calls are recorded, not made: the order and the device are what is checked."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))

    def init_process_group(backend, **kwargs):
        calls.append(("init_process_group", backend, kwargs.get("device_id")))
        raise RuntimeError("no rendezvous in this test")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    spec = load_spec(CIFAR, parse_overrides([f"data.root={cifar}", "data.verify_checksums=false", "run.device=cuda"]))
    with pytest.raises(ReproError, match="could not join the process group"):
        engine.train(spec, tmp_path)
    assert calls == [("set_device", torch.device("cuda", 3)), ("init_process_group", "nccl", torch.device("cuda", 3))]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across processes needs two CUDA GPUs")
def test_two_processes_train_on_their_own_gpus_over_nccl(cifar, tmp_path):
    done = launch(2, CIFAR, cifar, tmp_path, ["run.device=cuda", "run.progress=log", "data.verify_checksums=false",
                                                "model.depth=8", "optim.max_iters=4", "optim.lr_milestones=[2]"])
    assert "on cuda:0 x2" in done.stdout + done.stderr
    final = json.loads((tmp_path / "runs" / "cifar_resnet20" / "seed0" / "final.json").read_text())
    assert final["status"] == "finished"
