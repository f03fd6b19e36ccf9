"""`repro status`: the state of every planned run, read without writing and without taking a lock: runs
in every state built by hand (one trained under a lock held by another process), an empty results folder,
metrics.csv read from its end, the plain --watch output, and a real run stopped with exit 75."""
from __future__ import annotations

import csv
import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from repro.cli import main
from repro.contract import EXIT_PREEMPTED, EXIT_USAGE, METRIC_COLUMNS
from repro.reports.runs import tail_lines
from repro.reports.status import read_status, render_table
from repro.spec import load_spec, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
MAX_ITERS = 1000
SEEDS = 8


@pytest.fixture
def suite(tmp_path) -> Path:
    """ResNet-20 with SEEDS seeds: one run per state."""
    path = tmp_path / "experiments" / "suite.yaml"
    (path.parent / "cifar10").mkdir(parents=True)
    for spec in ("base.yaml", "resnet20.yaml"):
        shutil.copy(EXPERIMENTS / "cifar10" / spec, path.parent / "cifar10" / spec)
    path.write_text(yaml.safe_dump({"seeds": {"cifar10": SEEDS}, "figures": {"fig6_middle": ["cifar_resnet20"]}}))
    return path


def run_folder(results: Path, seed: int, epochs: int = 0, final: str | None = None, checkpoint: bool = True,
               seconds: float = 10.0, rows_per_epoch: int = 100) -> Path:
    """A run folder as the trainer leaves it: config.yaml, env.json, `epochs` rows of metrics.csv (each
    epoch `seconds` long and 1,000 images/s faster than the one before), a checkpoint, final.json."""
    folder = results / "runs" / "cifar_resnet20" / f"seed{seed}"
    folder.mkdir(parents=True)
    overrides = parse_overrides([f"optim.max_iters={MAX_ITERS}", "optim.lr_milestones=[500,750]"])
    spec = load_spec(EXPERIMENTS / "cifar10" / "resnet20.yaml", overrides)
    (folder / "config.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    (folder / "env.json").write_text(json.dumps({"starts": [{"world_size": 1}]}))
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, METRIC_COLUMNS)
        writer.writeheader()
        for epoch in range(1, epochs + 1):
            writer.writerow({"epoch": epoch, "iteration": epoch * rows_per_epoch, "lr": 0.1, "train_images": 12800,
                             "partial": 0, "train_loss": 1.0, "train_error": 50.0 - epoch / 10, "test_loss": 1.1,
                             "test_error": 60.0 - epoch / 10, "epoch_seconds": seconds,
                             "images_per_second": 1000.0 * epoch})
    if checkpoint:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    if final:
        (folder / "final.json").write_text(json.dumps({"status": final, "final_test_error": 7.5,
                                                       "iterations": epochs * rows_per_epoch, "wall_seconds": 3600.0}))
    return folder


# Holds a run's lock as the trainer does (RunFolder.lock writes "host H pid P" into it) until killed.
HOLD_LOCK = """
import sys, time
from repro.run_folder import RunFolder
with RunFolder(sys.argv[1]).lock():
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def every_state(suite, tmp_path):
    results = tmp_path / "results"
    run_folder(results, 0, epochs=10, final="finished")
    run_folder(results, 1, epochs=2, final="diverged")
    (run_folder(results, 2, epochs=3) / "metrics.csv").write_text("epoch,iteration\n1,not a number\n")
    run_folder(results, 3, epochs=4)  # stopped with exit 75: epochs, a checkpoint, no lock held
    training = run_folder(results, 4, epochs=5)
    run_folder(results, 5, epochs=2, checkpoint=False)  # epochs but no checkpoint
    run_folder(results, 6)  # started, stopped before its first epoch
    # seed 7: not started
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(training)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield results, holder.pid
    finally:
        holder.kill()
        holder.wait()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_every_state_is_read_without_writing_or_locking(every_state, suite, monkeypatch, capsys):
    results, holder_pid = every_state
    before = snapshot(results)

    def no_locking(*args, **kwargs):
        raise AssertionError("repro status took a lock")

    monkeypatch.setattr(fcntl, "flock", no_locking)
    monkeypatch.setattr(fcntl, "lockf", no_locking)
    status = read_status(results, suite)
    states = {r.seed: (r.state, r.detail) for r in status.runs}
    assert states[0] == ("finished", None)
    assert states[1] == ("diverged", None)
    assert states[2][0] == "damaged" and "metrics.csv" in states[2][1]
    assert states[3] == ("stopped", None)
    assert states[4] == ("training", f"host {platform.node()} pid {holder_pid}")
    assert states[5] == ("damaged", "metrics.csv has epochs but there is no checkpoint to resume them from")
    assert states[6] == ("stopped", None)
    assert states[7] == ("not started", None)
    assert snapshot(results) == before  # nothing written, not even a lock file of a run not started

    training = next(r for r in status.runs if r.seed == 4)
    assert (training.iteration, training.max_iters) == (500, MAX_ITERS)
    assert (training.train_error, training.test_error) == (pytest.approx(49.5), pytest.approx(59.5))
    assert training.images_per_second == pytest.approx(4000.0)  # epochs 3-5
    assert training.seconds_per_iteration == pytest.approx(0.1)  # 30 s over iterations 200-500
    assert training.wall_seconds == pytest.approx(50.0) and training.eta_seconds == pytest.approx(50.0)
    # seed 7 has no config.yaml nor speed of its own: its spec file's max_iters at its spec's runs' speed
    not_started = next(r for r in status.runs if r.seed == 7)
    assert not_started.max_iters == 64000 and not_started.eta_seconds == pytest.approx(6400.0)
    summary = status.summary()
    assert (summary["planned"], summary["done"], summary["finished"], summary["diverged"], summary["damaged"],
            summary["training"]) == (SEEDS, 2, 1, 1, 2, 1)
    # the ended runs, then seeds 3, 4 and 5 (damaged, it trained all the same) at 0.1 s an iteration
    assert summary["device_hours"] == pytest.approx((3600 * 2 + (400 + 500 + 200) * 0.1) / 3600)

    table = render_table(status)
    assert f"training (host {platform.node()} pid {holder_pid})" in table
    assert "stopped (resumable)" in table and "##########.......... 500/1,000" in table
    assert table.splitlines()[-1].startswith(f"suite: 2 of {SEEDS} runs done (1 finished, 1 diverged, 2 damaged), "
                                             "1 training")
    assert main(["status", "--results", str(results), "--suite", str(suite), "--json"]) == 0
    rows = {r["seed"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert rows[4]["state"] == "training" and rows[4]["iteration"] == 500 and rows[0]["ended"]
    assert snapshot(results) == before


def test_a_lock_held_while_the_runs_slurm_task_does_not_run_is_another_process(every_state, suite, monkeypatch):
    results, holder_pid = every_state
    from repro.reports import status as module

    run = results.absolute() / "runs" / "cifar_resnet20" / "seed4"
    monkeypatch.setattr(module, "slurm_tasks", lambda results, asked: (
        {run: module.SlurmTask("12_4", "PENDING", "(Priority)")}, None))
    shown = next(r for r in read_status(results, suite).runs if r.seed == 4)
    assert shown.shown_state() == f"locked by another process (host {platform.node()} pid {holder_pid})"


def test_an_empty_results_folder_has_every_run_not_started(suite, tmp_path, capsys):
    assert main(["status", "--results", str(tmp_path), "--suite", str(suite)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + SEEDS + 1
    assert all(" not started " in line for line in lines[1:-1])
    assert lines[-1].startswith(f"suite: 0 of {SEEDS} runs done (0 finished), 0 training, 0.0 device-hours so far")
    assert list(tmp_path.iterdir()) == [suite.parents[1] / "experiments"]  # nothing written


@pytest.mark.slow
def test_run_all_status_is_repro_status(suite, tmp_path):
    script = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--status", "--json", "--results", str(tmp_path),
                             "--suite", str(suite)], capture_output=True, text=True)
    assert script.returncode == 0, script.stderr
    assert json.loads(script.stdout)["suite"]["planned"] == SEEDS


def test_a_missing_results_folder_is_a_one_line_error(suite, tmp_path, capsys):
    assert main(["status", "--results", str(tmp_path / "nowhere"), "--suite", str(suite)]) == EXIT_USAGE
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["status", "--watch", "0"])


def test_only_the_end_of_metrics_csv_is_read(suite, tmp_path):
    results = tmp_path / "results"
    folder = run_folder(results, 0, epochs=5000, rows_per_epoch=1)
    # damage the start of the file: a reader of the whole file would call the run damaged
    text = (folder / "metrics.csv").read_text().splitlines(keepends=True)
    (folder / "metrics.csv").write_text("".join(text[:2] + ["1,garbage,x,x,x,x,x,x,x,x,x\n"] + text[2:]))
    run = next(r for r in read_status(results, suite).runs if r.seed == 0)
    assert run.state == "stopped" and run.iteration == 5000 and run.images_per_second == pytest.approx(4_999_000)
    assert tail_lines(folder / "metrics.csv", 2, block=64).splitlines() == [text[0].strip(), *map(str.strip, text[-2:])]


@pytest.mark.slow
def test_watch_prints_plain_tables_until_interrupted(suite, tmp_path):
    command = [sys.executable, "-m", "repro", "status", "--results", str(tmp_path), "--suite", str(suite),
               "--watch", "0.1"]
    watching = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    while sum(line.startswith("--- ") for line in lines) < 2:
        line = watching.stdout.readline()
        assert line, watching.stderr.read()
        lines.append(line)
    watching.send_signal(signal.SIGINT)
    rest, _ = watching.communicate(timeout=60)
    assert watching.returncode == 0
    assert "\x1b[" not in "".join(lines) + rest  # not a terminal: no cursor movement
    assert sum(line.startswith("suite: ") for line in lines) >= 1


@pytest.mark.slow
def test_watch_redraws_in_place_on_a_terminal(suite, tmp_path):
    import pty

    command = [sys.executable, "-m", "repro", "status", "--results", str(tmp_path), "--suite", str(suite),
               "--watch", "0.1"]
    parent, child = pty.openpty()
    watching = subprocess.Popen(command, stdout=child, stderr=subprocess.PIPE)
    os.close(child)
    seen = b""
    while seen.count(b"\x1b[H\x1b[2J") < 2:  # the cursor home, the screen cleared: a redraw
        chunk = os.read(parent, 65536)
        assert chunk, watching.stderr.read()
        seen += chunk
    watching.send_signal(signal.SIGINT)
    assert watching.wait(timeout=60) == 0
    os.close(parent)
    assert b"suite: 0 of" in seen and b"every 0.1 s" in seen


@pytest.mark.slow
def test_a_run_stopped_with_exit_75_is_stopped_and_resumable(suite, tmp_path):
    from repro.data.generated import write_cifar10

    data = write_cifar10(tmp_path / "cifar", n_train=64, n_test=32)
    results = tmp_path / "results"
    command = [sys.executable, "-m", "repro", "train", str(suite.parent / "cifar10" / "resnet20.yaml"), "--data",
               str(data), "--results", str(results)]
    for assignment in ["model.depth=8", "run.device=cpu", "run.progress=log", "data.verify_checksums=false",
                       "data.eval_batch_size=32", "optim.batch_size=16", "optim.max_iters=100000"]:
        command += ["--set", assignment]
    trainer = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    log = results / "runs" / "cifar_resnet20" / "seed0" / "log.txt"
    while "epoch 1 " not in (log.read_text() if log.exists() else ""):
        assert trainer.poll() is None, trainer.stdout.read()
        time.sleep(0.1)
    training = next(r for r in read_status(results, suite).runs if r.seed == 0)
    assert training.state == "training" and training.detail.endswith(f"pid {trainer.pid}")
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=120) == EXIT_PREEMPTED
    stopped = next(r for r in read_status(results, suite).runs if r.seed == 0)
    assert stopped.state == "stopped" and stopped.iteration >= 4 and stopped.max_iters == 100000
    assert stopped.eta_seconds is not None and stopped.images_per_second > 0


# Holds a lock on a file the way argv[2] says and writes what RunFolder.lock writes, until killed.
HOLD = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
(fcntl.flock if sys.argv[2] == "flock" else fcntl.lockf)(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
handle.write(f"host somewhere pid {os.getpid()}\\n")
handle.flush()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("kind", ["flock", "lockf"])  # lockf: how NFS passes a flock on to the server
def test_lock_holder_sees_a_held_lock_and_none_after(tmp_path, kind, monkeypatch):
    from repro import contract
    from repro.contract import lock_holder

    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), kind], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(lock) == f"host somewhere pid {holder.pid}"
        # as from another node: no /proc/locks entry; the F_GETLK query sees the record lock only (a
        # network file system turns flock into one, a local one keeps them apart)
        monkeypatch.setattr(contract, "_local_lock_pid", lambda info: None)
        assert lock_holder(lock) == (f"host somewhere pid {holder.pid}" if kind == "lockf" else None)
        monkeypatch.undo()
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(lock) is None  # released by the OS; the file still names the last holder
    assert lock_holder(tmp_path / "no such file") is None


def test_slurm_without_squeue_is_a_one_line_error(suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["status", "--slurm", "--results", str(tmp_path), "--suite", str(suite)]) == EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "squeue" in error
