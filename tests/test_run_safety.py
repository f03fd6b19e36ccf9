"""A run is never lost, corrupted or run twice (issue 10): stops on awkward steps, checkpoints that
cannot run code, one process per run folder, checks before writes, damaged files kept and reported.

Most tests call the real `repro.engine.train` in this process (so that a signal can be sent on an
exact step); the lock test uses two real processes."""
from __future__ import annotations

import errno
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

from repro import contract, engine
from repro.run_network import load_run_model
from repro.cli import main as cli_main
from repro.contract import CHECKPOINTS, DAMAGED, EXIT_LOCKED, EXIT_OK, EXIT_PREEMPTED, LATEST, PREVIOUS
from repro.data.generated import write_cifar10
from repro.errors import ReproError
from repro.spec import load_spec, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "cifar10" / "resnet20.yaml"
# ResNet-8 on 256 generated images, batch 32: 8 iterations an epoch; 16 iterations are 2 epochs.
SMALL = ["model.depth=8", "run.device=cpu", "run.progress=log", "data.verify_checksums=false",
         "data.eval_batch_size=64", "optim.batch_size=32", "optim.max_iters=16", "optim.lr_milestones=[8,12]"]
TIME_COLUMNS = ["epoch_seconds", "images_per_second"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=256, n_test=64)


def spec(data: Path, *extra: str):
    return load_spec(SPEC, parse_overrides(SMALL + [f"data.root={data}", *extra]))


def folder(results: Path) -> Path:
    return results / "runs" / "cifar_resnet20" / "seed0"


def read(results: Path) -> tuple[pd.DataFrame, dict]:
    return (pd.read_csv(folder(results) / "metrics.csv").drop(columns=TIME_COLUMNS),
            json.loads((folder(results) / "final.json").read_text()))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    results = tmp_path_factory.mktemp("reference")
    assert engine.train(spec(data), results) == EXIT_OK
    return read(results)


def signal_on_step(monkeypatch, step: int, sig: int = signal.SIGTERM) -> None:
    """Deliver `sig` to this process while training step number `step` (1-based) runs."""
    calls = {"n": 0}
    real = engine.train_step

    def step_then_signal(*args):
        stats = real(*args)
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), sig)
        return stats

    monkeypatch.setattr(engine, "train_step", step_then_signal)


@pytest.mark.parametrize("step", [16, 8], ids=["last step of the run", "last step of an epoch"])
def test_a_stop_on_the_last_step_of_the_run_or_of_an_epoch_loses_nothing(data, tmp_path, monkeypatch, reference,
                                                                          step):
    signal_on_step(monkeypatch, step)
    code = engine.train(spec(data), tmp_path)
    monkeypatch.undo()
    assert code in (EXIT_PREEMPTED, EXIT_OK)
    if code == EXIT_PREEMPTED:
        assert engine.train(spec(data), tmp_path) == EXIT_OK
    rows, final = read(tmp_path)
    pd.testing.assert_frame_equal(rows, reference[0], check_exact=True)
    assert final["status"] == "finished" and final["final_test_error"] == reference[1]["final_test_error"]


def test_a_stop_on_the_last_step_inside_the_first_epoch_finishes_on_rerun(data, tmp_path, monkeypatch):
    signal_on_step(monkeypatch, 5)
    code = engine.train(spec(data, "optim.max_iters=5", "optim.lr_milestones=[3]"), tmp_path)
    monkeypatch.undo()
    if code == EXIT_PREEMPTED:
        assert engine.train(spec(data, "optim.max_iters=5", "optim.lr_milestones=[3]"), tmp_path) == EXIT_OK
    rows, final = read(tmp_path)
    assert rows.epoch.tolist() == [1] and rows.partial.tolist() == [1] and rows.train_images.tolist() == [160]
    assert final["status"] == "finished" and final["iterations"] == 5


def test_a_stop_during_start_up_exits_75_and_the_rerun_trains_from_the_start(data, tmp_path, monkeypatch, reference):
    real = engine.build_pipeline

    def signal_while_loading(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(engine, "build_pipeline", signal_while_loading)
    assert engine.train(spec(data), tmp_path) == EXIT_PREEMPTED
    monkeypatch.undo()
    assert engine.train(spec(data), tmp_path) == EXIT_OK
    pd.testing.assert_frame_equal(read(tmp_path)[0], reference[0], check_exact=True)


class Payload:
    """A pickle that runs a command when loaded with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def stopped_run(data: Path, results: Path, monkeypatch, step: int = 10) -> Path:
    """A run stopped inside its second epoch: config, metrics (1 row), last.pt and prev.pt."""
    signal_on_step(monkeypatch, step)
    assert engine.train(spec(data), results) == EXIT_PREEMPTED
    monkeypatch.undo()
    return folder(results)


def test_a_crafted_checkpoint_does_not_run_code_and_the_error_is_clear(data, tmp_path, monkeypatch, capsys):
    run = stopped_run(data, tmp_path, monkeypatch)
    marker = tmp_path / "pwned"
    for name in (LATEST, PREVIOUS):
        torch.save({"model": Payload(marker)}, run / CHECKPOINTS / name)
    with pytest.raises(ReproError, match="damaged") as error:
        load_run_model(run)  # what `repro responses` reads: it leaves the files in place
    assert "could run code" in str(error.value) and "posix.system" in str(error.value)
    code = cli_main(["train", str(SPEC), "--results", str(tmp_path)] + [a for s in SMALL + [f"data.root={data}"]
                                                                        for a in ("--set", s)])
    assert code == 2 and "every checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_unreadable_checkpoints_stop_the_run_keep_the_files_and_restart_only_when_asked(data, tmp_path, monkeypatch,
                                                                                      reference):
    run = stopped_run(data, tmp_path, monkeypatch)
    metrics_before = (run / "metrics.csv").read_text()
    for name in (LATEST, PREVIOUS):
        (run / CHECKPOINTS / name).write_bytes(b"not a checkpoint")
    with pytest.raises(ReproError, match="every checkpoint .* damaged.*--restart"):
        engine.train(spec(data), tmp_path)
    assert (run / "metrics.csv").read_text() == metrics_before  # nothing overwritten
    assert len(list((run / CHECKPOINTS / DAMAGED).iterdir())) == 2  # moved aside, not deleted
    assert engine.train(spec(data), tmp_path, restart=True) == EXIT_OK
    kept = list(run.parent.glob("seed0.restarted-*"))
    assert len(kept) == 1 and (kept[0] / "metrics.csv").read_text() == metrics_before
    pd.testing.assert_frame_equal(read(tmp_path)[0], reference[0], check_exact=True)


def test_a_damaged_latest_checkpoint_is_moved_aside_not_rotated_over_the_previous(data, tmp_path, monkeypatch,
                                                                                reference):
    run = stopped_run(data, tmp_path, monkeypatch)
    (run / CHECKPOINTS / LATEST).write_bytes(b"\0" * 100)
    assert engine.train(spec(data), tmp_path) == EXIT_OK
    assert [p.name.split("-")[0] for p in (run / CHECKPOINTS / DAMAGED).iterdir()] == ["last"]
    pd.testing.assert_frame_equal(read(tmp_path)[0], reference[0], check_exact=True)


def test_results_without_checkpoints_are_damage_not_a_fresh_start(data, tmp_path, monkeypatch):
    run = stopped_run(data, tmp_path, monkeypatch)
    before = (run / "metrics.csv").read_text()
    for path in (run / CHECKPOINTS).iterdir():
        path.unlink()
    (run / CHECKPOINTS).rmdir()
    with pytest.raises(ReproError, match="no checkpoint to resume"):
        engine.train(spec(data), tmp_path)
    assert (run / "metrics.csv").read_text() == before


def test_a_refused_recipe_writes_nothing(data, tmp_path, monkeypatch):
    run = stopped_run(data, tmp_path, monkeypatch)
    (run / "config.yaml").unlink()
    with pytest.raises(ReproError, match="optim.lr: 0.1 there, 0.05 now"):
        engine.train(spec(data, "optim.lr=0.05"), tmp_path)
    assert not (run / "config.yaml").exists()
    assert engine.train(spec(data), tmp_path) == EXIT_OK  # the original recipe still resumes


def test_a_damaged_env_json_or_config_yaml_is_kept_aside_and_the_run_goes_on(data, tmp_path, monkeypatch, reference):
    run = stopped_run(data, tmp_path, monkeypatch)
    (run / "env.json").write_text('{"starts": [{"time"')
    (run / "config.yaml").write_text("model: [unclosed\n")
    assert engine.train(spec(data), tmp_path) == EXIT_OK
    assert len(json.loads((run / "env.json").read_text())["starts"]) == 1
    assert len(list(run.glob("env.json.damaged-*"))) == 1 and len(list(run.glob("config.yaml.damaged-*"))) == 1
    pd.testing.assert_frame_equal(read(tmp_path)[0], reference[0], check_exact=True)


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_partial_files(data, tmp_path, monkeypatch):
    run = stopped_run(data, tmp_path, monkeypatch)
    last = (run / CHECKPOINTS / LATEST).read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(contract.os, "fsync", no_space)
    with pytest.raises(ReproError, match="No space left on device.*resume"):
        engine.train(spec(data), tmp_path)
    monkeypatch.undo()
    assert (run / CHECKPOINTS / LATEST).read_bytes() == last
    assert not list(run.rglob("*.partial"))
    assert engine.train(spec(data), tmp_path) == EXIT_OK


def test_a_second_process_on_the_same_run_exits_at_once_and_writes_nothing(data, tmp_path):
    command = [sys.executable, "-m", "repro", "train", str(SPEC), "--results", str(tmp_path)]
    for assignment in SMALL[:-2] + ["optim.max_iters=100000", f"data.root={data}"]:
        command += ["--set", assignment]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = folder(tmp_path) / "metrics.csv"
        deadline = time.time() + 120
        while not metrics.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert metrics.exists(), "the first run wrote no epoch"
        first.send_signal(signal.SIGSTOP)  # hold it still while the second one tries
        before = {p: p.stat().st_mtime_ns for p in folder(tmp_path).rglob("*")}
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == EXIT_LOCKED, second.stdout + second.stderr
        assert f"pid {first.pid}" in second.stderr and "wrote nothing" in second.stderr
        assert {p: p.stat().st_mtime_ns for p in folder(tmp_path).rglob("*")} == before
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_checkpoint_resumes_under_another_map_location_than_it_was_saved_with(data, tmp_path, monkeypatch):
    """Issue 18: a resume on a GPU read the checkpoint onto the GPU, RNG states included, which torch
    cannot restore. "meta" stands in for the GPU on the loading path: the checkpoint saved on the CPU
    is resumed by a trainer whose device is "meta"."""
    from repro.checkpoint import load_checkpoint
    from repro.distributed import Processes
    from repro.hardware import probe, resolve_switches
    from repro.run_folder import RunFolder

    run = stopped_run(data, tmp_path, monkeypatch)
    saved = load_checkpoint(run / CHECKPOINTS)
    run_spec, cpu = spec(data), torch.device("cpu")
    switches = resolve_switches(run_spec.run, probe(cpu), run_spec.data.dataset)
    trainer = engine.Trainer(run_spec, RunFolder.of(tmp_path, run_spec), None, Processes(), cpu, switches)
    trainer.device = torch.device("meta")
    torch.manual_seed(12345)  # a state the resume must replace
    assert engine._resume(trainer, RunFolder.of(tmp_path, run_spec), Processes())
    assert trainer.state.iteration == saved["iteration"] == 10
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert all(torch.equal(value, saved["model"][name]) for name, value in trainer.model.state_dict().items())


def test_the_cuda_rng_state_saved_and_restored_is_the_current_devices_alone(monkeypatch):
    """Issue 18: torch.cuda.set_rng_state_all restores one state per GPU the saving process saw, and
    fails where a resume sees fewer (a DDP rank sees one)."""
    from repro.checkpoint import restore_rng_states, rng_states

    states = {0: torch.full((16,), 7, dtype=torch.uint8), 1: torch.full((16,), 9, dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the saving process sees two GPUs
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[0])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(states.values()))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda all_states: restored.extend(all_states))
    saved = rng_states()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the resuming process sees one
    restore_rng_states(saved)
    assert len(restored) == 1 and torch.equal(restored[0], states[0]) and restored[0].device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a resume onto a GPU needs a CUDA GPU")
def test_a_run_stopped_on_the_gpu_resumes_there(data, tmp_path, monkeypatch):
    signal_on_step(monkeypatch, 10)
    assert engine.train(spec(data, "run.device=cuda"), tmp_path) == EXIT_PREEMPTED
    monkeypatch.undo()
    assert engine.train(spec(data, "run.device=cuda"), tmp_path) == EXIT_OK
    assert read(tmp_path)[1]["status"] == "finished"
