"""The training engine on CPU: the run folder, exact resume after SIGKILL and SIGTERM, divergence,
warm-up, and every bad input stopping before anything is written."""
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
import yaml

from repro.checkpoint import load_checkpoint
from repro.contract import EXIT_DIVERGED, EXIT_PREEMPTED, LATEST, PREVIOUS
from repro.data.generated import write_cifar10

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "cifar10" / "resnet20.yaml"
TIME_COLUMNS = ["epoch_seconds", "images_per_second"]
# ResNet-8 (n=1) on 256 generated images, batch 32: 8 iterations an epoch, a final partial epoch of 4.
SMALL = ["model.depth=8", "run.device=cpu", "run.progress=log", "data.verify_checksums=false",
         "data.eval_batch_size=64", "optim.batch_size=32", "optim.max_iters=28", "optim.lr_milestones=[16,24]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=256, n_test=64)


def train(results: Path, data: Path, *extra: str, spec: Path = SPEC, wait: bool = True):
    command = [sys.executable, "-m", "repro", "train", str(spec), "--data", str(data), "--results", str(results)]
    for assignment in SMALL + list(extra):
        command += ["--set", assignment]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in every process: bitwise repeatable
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def run_dir(results: Path) -> Path:
    return results / "runs" / "cifar_resnet20" / "seed0"


def metrics(results: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir(results) / "metrics.csv")


def final_weights(results: Path) -> dict:
    return load_checkpoint(run_dir(results) / "checkpoints")["model"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run, the yardstick of every resume test."""
    results = tmp_path_factory.mktemp("reference")
    done = train(results, data)
    assert done.returncode == 0, done.stdout + done.stderr
    return results


def wait_for_rows(results: Path, process: subprocess.Popen, rows: int) -> None:
    deadline = time.time() + 120
    path = run_dir(results) / "metrics.csv"
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > rows:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended early: {process.stdout.read()}")
        time.sleep(0.05)
    pytest.fail("no metrics row appeared")


def test_run_folder_holds_spec_env_metrics_checkpoints_and_final(reference):
    folder = run_dir(reference)
    assert {p.name for p in folder.iterdir()} >= {"config.yaml", "env.json", "metrics.csv", "log.txt",
                                                  "checkpoints", "final.json"}
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["depth"] == 8 and config["optim"]["max_iters"] == 28
    frame = metrics(reference)
    assert list(frame.columns) == ["epoch", "iteration", "lr", "train_images", "partial", "train_loss",
                                   "train_error", "test_loss", "test_error", "epoch_seconds", "images_per_second"]
    assert frame.epoch.tolist() == [1, 2, 3, 4] and frame.iteration.tolist() == [8, 16, 24, 28]
    assert frame.train_images.tolist() == [256, 256, 256, 128] and frame.partial.tolist() == [0, 0, 0, 1]
    assert frame.lr.tolist() == [0.1, 0.1, 0.01, 0.001]  # the lr of each epoch's last iteration
    assert frame.train_error.between(0, 100).all() and frame.test_error.between(0, 100).all()
    final = json.loads((folder / "final.json").read_text())
    assert final["status"] == "finished" and final["iterations"] == 28
    assert final["moving_bn"]["final_test_error"] == frame.test_error.iloc[-1]  # the moving averages' test
    assert final["bn_stats"] == "precise" and final["final_test_error"] == final["precise_bn"]["final_test_error"]
    assert "best_test_error" not in final  # no epoch is chosen on the test set
    env = json.loads((folder / "env.json").read_text())["starts"]
    assert len(env) == 1 and env[0]["device"] == "cpu" and env[0]["torch"] == torch.__version__
    assert env[0]["switches"]["precision"] == "fp32"  # the resolved switches of this start
    assert (folder / "checkpoints" / LATEST).exists() and (folder / "checkpoints" / PREVIOUS).exists()


def test_rerunning_a_finished_run_does_nothing(reference, data):
    before = (run_dir(reference) / "metrics.csv").read_text()
    again = train(reference, data)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert (run_dir(reference) / "metrics.csv").read_text() == before


def assert_same_run(results: Path, reference: Path) -> None:
    pd.testing.assert_frame_equal(metrics(results).drop(columns=TIME_COLUMNS),
                                  metrics(reference).drop(columns=TIME_COLUMNS), check_exact=True)
    ours, theirs = final_weights(results), final_weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_sigkill_mid_epoch_then_rerun_gives_the_same_run(reference, data, tmp_path):
    process = train(tmp_path, data, wait=False)
    wait_for_rows(tmp_path, process, rows=2)  # header + epoch 1: now inside epoch 2
    process.kill()
    process.wait()
    assert not (run_dir(tmp_path) / "final.json").exists()
    resumed = train(tmp_path, data)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    assert_same_run(tmp_path, reference)
    assert len(json.loads((run_dir(tmp_path) / "env.json").read_text())["starts"]) == 2


def test_sigterm_checkpoints_mid_epoch_exits_75_and_resumes_exactly(reference, data, tmp_path):
    process = train(tmp_path, data, wait=False)
    wait_for_rows(tmp_path, process, rows=2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output
    state = load_checkpoint(run_dir(tmp_path) / "checkpoints")
    assert 0 < state["batch"] < 8 or state["iteration"] == 28  # stopped inside an epoch
    assert "stopped by signal" in output
    resumed = train(tmp_path, data)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(tmp_path, reference)


def test_truncated_latest_checkpoint_falls_back_to_the_previous(reference, data, tmp_path):
    process = train(tmp_path, data, wait=False)
    wait_for_rows(tmp_path, process, rows=3)
    process.kill()
    process.wait()
    latest = run_dir(tmp_path) / "checkpoints" / LATEST
    latest.write_bytes(latest.read_bytes()[:1000])
    resumed = train(tmp_path, data)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "unreadable" in resumed.stderr
    assert_same_run(tmp_path, reference)


def test_non_finite_loss_marks_the_run_diverged_and_keeps_the_csv(data, tmp_path):
    done = train(tmp_path, data, "optim.lr=1.0e+30", "optim.max_iters=16", "optim.lr_milestones=[]")
    assert done.returncode == EXIT_DIVERGED, done.stdout + done.stderr
    final = json.loads((run_dir(tmp_path) / "final.json").read_text())
    assert final["status"] == "diverged"
    assert len(metrics(tmp_path)) == 1 and not pd.Series(metrics(tmp_path).train_loss).notna().all()


def test_warmup_switches_back_to_the_full_rate(data, tmp_path):
    spec = ROOT / "experiments" / "cifar10" / "resnet110.yaml"  # warm-up 0.01 until error < 80%
    done = train(tmp_path, data, "optim.warmup_window=4", "optim.warmup_until_train_error=95",
                 "optim.max_iters=16", "optim.lr_milestones=[]", spec=spec)
    assert done.returncode == 0, done.stdout + done.stderr
    frame = pd.read_csv(tmp_path / "runs" / "cifar_resnet110" / "seed0" / "metrics.csv")
    assert "warm-up ends at iteration" in done.stdout
    assert frame.lr.iloc[-1] == 0.1


def test_warmup_that_never_reaches_the_threshold_keeps_0_01(data, tmp_path):
    spec = ROOT / "experiments" / "cifar10" / "resnet110.yaml"
    done = train(tmp_path, data, "optim.warmup_window=4", "optim.warmup_until_train_error=0",
                 "optim.max_iters=16", "optim.lr_milestones=[]", spec=spec)
    assert done.returncode == 0, done.stdout + done.stderr
    frame = pd.read_csv(tmp_path / "runs" / "cifar_resnet110" / "seed0" / "metrics.csv")
    assert (frame.lr == 0.01).all()


@pytest.mark.parametrize("extra, message", [
    (["optim.lrr=1"], "optim.lrr: unknown key"),
    (["model.depth=21"], "6n+2"),
    (["run.device=cuda"], "no CUDA device"),
])
def test_bad_input_stops_with_a_message_and_writes_nothing(data, tmp_path, extra, message):
    if "cuda" in extra[0] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = train(tmp_path, data, *extra)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.csv"))


def test_missing_data_names_the_path_and_writes_nothing(tmp_path):
    done = train(tmp_path / "results", tmp_path / "nowhere")
    assert done.returncode == 2 and str(tmp_path / "nowhere") in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


def test_a_different_recipe_never_touches_a_finished_run(reference, data):
    before = (run_dir(reference) / "metrics.csv").read_text()
    done = train(reference, data, "optim.lr=0.05")
    assert done.returncode == 2 and "optim.lr: 0.1 there, 0.05 now" in done.stderr
    assert (run_dir(reference) / "metrics.csv").read_text() == before


def test_resuming_with_a_different_recipe_is_refused(data, tmp_path):
    process = train(tmp_path, data, wait=False)
    wait_for_rows(tmp_path, process, rows=2)
    process.kill()
    process.wait()
    done = train(tmp_path, data, "optim.lr=0.05")
    assert done.returncode == 2 and "optim.lr: 0.1 there, 0.05 now" in done.stderr


def test_a_checkpoint_of_another_recipe_is_refused_even_without_config_yaml(data, tmp_path):
    process = train(tmp_path, data, wait=False)
    wait_for_rows(tmp_path, process, rows=2)
    process.kill()
    process.wait()
    (run_dir(tmp_path) / "config.yaml").unlink()
    done = train(tmp_path, data, "optim.max_iters=20", "optim.lr_milestones=[16]")
    assert done.returncode == 2 and "optim.max_iters: 28 there, 20 now" in done.stderr


def test_a_warmup_that_never_reaches_the_threshold_ends_at_its_cap(data, tmp_path):
    spec = ROOT / "experiments" / "cifar10" / "resnet110.yaml"
    done = train(tmp_path, data, "optim.warmup_window=4", "optim.warmup_until_train_error=0",
                 "optim.warmup_max_iters=8", "optim.max_iters=16", "optim.lr_milestones=[]", spec=spec)
    assert done.returncode == 0, done.stdout + done.stderr
    folder = tmp_path / "runs" / "cifar_resnet110" / "seed0"
    frame = pd.read_csv(folder / "metrics.csv")
    assert "warm-up ends at iteration 8: it reached its cap of 8 iterations" in done.stdout
    assert frame.lr.tolist() == [0.01, 0.1]
    final = json.loads((folder / "final.json").read_text())
    assert final["warmup_capped"] is True and final["warmup_ended_at"] == 8
