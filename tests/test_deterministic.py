"""run.deterministic (issue 22): the process-wide numerics flags set once at a run's start and recorded
in env.json, and a stopped-and-resumed deterministic run equal bit for bit to an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from repro.checkpoint import load_checkpoint
from repro.contract import EXIT_PREEMPTED
from repro.data.generated import write_cifar10
from repro.hardware import Capabilities, resolve_switches, set_backends
from repro.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "cifar10" / "resnet20.yaml"
# ResNet-8 on 256 generated images, batch 32: 8 iterations an epoch, 28 in all
SMALL = ["model.depth=8", "run.progress=log", "run.deterministic=true",
         "data.verify_checksums=false", "data.eval_batch_size=64", "optim.batch_size=32", "optim.max_iters=28",
         "optim.lr_milestones=[16,24]"]
H100 = Capabilities("cuda", "NVIDIA H100 80GB HBM3", "AVX512", native_bf16=True)
CPU = Capabilities("cpu", "AMD EPYC", "AVX2", native_bf16=False)


def test_cudnn_benchmark_is_on_for_cuda_unless_deterministic():
    assert resolve_switches(RunSpec(), H100, "cifar10").cudnn_benchmark
    deterministic = resolve_switches(RunSpec(deterministic=True), H100, "cifar10")
    assert deterministic.deterministic and not deterministic.cudnn_benchmark
    assert not resolve_switches(RunSpec(), CPU, "cifar10").cudnn_benchmark


@pytest.fixture
def restore_backends(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[1:4]
    torch.set_float32_matmul_precision(saved[4])


def test_set_backends_sets_every_flag_whatever_was_set_before(restore_backends):
    torch.backends.cudnn.allow_tf32 = False  # inherited settings do not survive a run's start
    torch.set_float32_matmul_precision("medium")
    flags = set_backends(resolve_switches(RunSpec(deterministic=True), H100, "cifar10"))
    assert flags == {"deterministic_algorithms": True, "cudnn_deterministic": True, "cudnn_benchmark": False,
                     "cublas_workspace_config": ":4096:8", "cudnn_allow_tf32": True, "matmul_allow_tf32": False,
                     "float32_matmul_precision": "highest"}
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    flags = set_backends(resolve_switches(RunSpec(), H100, "cifar10"))
    assert not flags["deterministic_algorithms"] and not flags["cudnn_deterministic"] and flags["cudnn_benchmark"]
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def train(results: Path, data: Path, device: str, wait: bool = True):
    command = [sys.executable, "-m", "repro", "train", str(SPEC), "--data", str(data), "--results", str(results)]
    for assignment in SMALL + [f"run.device={device}"]:
        command += ["--set", assignment]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def run_dir(results: Path) -> Path:
    return results / "runs" / "cifar_resnet20" / "seed0"


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.slow),
    # on CUDA with the default switches there: CUDA graphs, channels_last, the device-resident data
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs a CUDA GPU")])])
def test_a_stopped_and_resumed_deterministic_run_equals_an_uninterrupted_one(tmp_path, device):
    data = write_cifar10(tmp_path / "data", n_train=256, n_test=64)
    whole = train(tmp_path / "whole", data, device)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    process = train(tmp_path / "stopped", data, device, wait=False)
    metrics = run_dir(tmp_path / "stopped") / "metrics.csv"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 1):  # inside epoch 2
        assert process.poll() is None and time.time() < deadline, process.stdout.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output
    resumed = train(tmp_path / "stopped", data, device)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    timing = ["epoch_seconds", "images_per_second"]
    ours, theirs = (pd.read_csv(run_dir(tmp_path / name) / "metrics.csv").drop(columns=timing)
                    for name in ("stopped", "whole"))
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    weights = [load_checkpoint(run_dir(tmp_path / name) / "checkpoints")["model"] for name in ("stopped", "whole")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    starts = json.loads((run_dir(tmp_path / "stopped") / "env.json").read_text())["starts"]
    assert len(starts) == 2
    for start in starts:  # each start sets and records the flags
        assert start["switches"]["deterministic"] is True
        assert start["backends"]["deterministic_algorithms"] is True
        assert start["backends"]["cudnn_benchmark"] is False
        assert start["backends"]["cublas_workspace_config"] == ":4096:8"
        assert start["backends"]["float32_matmul_precision"] == "highest"
