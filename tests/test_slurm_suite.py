"""`repro run-all --smoke --slurm` on a real one-node Slurm cluster (tests/slurm_cluster.py): a small
smoke suite is submitted, one of its training jobs is requeued in the middle of an epoch, every run
finishes with the metrics of the same run trained locally, and the report job runs after all of them.
A job script written for a results folder whose path holds spaces, quotes, # and % runs as written.

Needs root and Debian's slurm-wlm and munge (`sudo .ci/install-slurm.sh`); skipped otherwise.
"""
import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from repro.suite import slurm
from repro.suite.plan import REPRO, make_plan
from repro.suite.run_all import add_arguments as add_run_all_arguments, run_all

pytestmark = pytest.mark.slurm

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TIMEOUT_S = 400  # the whole suite takes 2-3 minutes on 2 cores, most of it the report job
# ResNet-20 for two seeds, three epochs of 20 batches: long enough to requeue one run mid-epoch.
SUITE = {
    "seeds": {"cifar10": 2},
    "figures": {"fig6_middle": ["cifar_resnet20"], "fig7": ["cifar_resnet20"]},
    "tables": {"table6": ["cifar_resnet20"]},
    "smoke": {
        "seeds": {"cifar10": 2},
        "data": {"cifar10": {"train": 640, "test": 100}},
        "overrides": {"cifar10": {"run.device": "cpu", "data.verify_checksums": False, "data.eval_batch_size": 100,
                                  "optim.batch_size": 32, "optim.max_iters": 60, "optim.lr_milestones": [30, 45]}},
    },
}
TIME_COLUMNS = {"epoch_seconds", "images_per_second"}  # the only columns a resume may change




def wait_until(condition, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(handle)]


def stamps(log: Path, event: str) -> list[datetime]:
    """When the job script logged `event` ("start", "end"): its lines begin with a timestamp."""
    pattern = re.compile(rf"^(\S+ \S+) job \d+[^:]*: {event}\b")
    return [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
            for line in text(log).splitlines() if (m := pattern.match(line))]


def test_smoke_suite_on_slurm_survives_a_requeue_and_matches_local_runs(cluster, tmp_path, capsys):
    suite = tmp_path / "experiments" / "suite.yaml"
    (suite.parent / "cifar10").mkdir(parents=True)
    for spec in ("base.yaml", "resnet20.yaml"):
        shutil.copy(EXPERIMENTS / "cifar10" / spec, suite.parent / "cifar10" / spec)
    suite.write_text(yaml.safe_dump(SUITE))
    results = tmp_path / "results"
    parser = argparse.ArgumentParser()
    add_run_all_arguments(parser)
    args = parser.parse_args(["--smoke", "--slurm", "--suite", str(suite), "--results", str(results)])
    plan = make_plan(args)
    assert run_all(args) == 0
    out = capsys.readouterr().out
    array = re.search(r"submitted job array (\d+)", out).group(1)
    report = re.search(r"submitted job (\d+): the reports", out).group(1)

    # Requeue seed 0 half-way through its second epoch: Slurm sends SIGTERM, the engine checkpoints
    # mid-epoch, and Slurm starts the job again, which resumes the run.
    requeued = plan.runs[0]
    task = [line.split("\t")[0] for line in text(results / "slurm" / "cifar10_runs.txt").splitlines()].index(
        str(requeued.log))
    wait_until(lambda: "starting cifar_resnet20 seed 0" in text(requeued.folder / "log.txt"), "seed 0 to train")
    started = time.monotonic()
    wait_until(lambda: (requeued.folder / "metrics.csv").exists(), "seed 0's first epoch")
    time.sleep((time.monotonic() - started) / 2)
    subprocess.run(["scontrol", "requeue", f"{array}_{task}"], check=True)

    # Train the same runs locally, with one thread as the jobs had, while the report job runs.
    wait_until(lambda: all((run.folder / "final.json").exists() for run in plan.runs), "the runs to finish")
    reference = tmp_path / "reference"
    local_runs = [subprocess.Popen(REPRO + [str(reference) if a == str(results) else a for a in plan.train_arguments(run)],
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT) for run in plan.runs]
    wait_until(lambda: not subprocess.run(["squeue", "--noheader"], capture_output=True, text=True).stdout.strip(),
               "every job to end")
    assert [run.wait(timeout=TIMEOUT_S) for run in local_runs] == [0] * len(local_runs)

    for run in plan.runs:
        assert json.loads((run.folder / "final.json").read_text())["status"] == "finished"
        local_folder = reference / run.folder.relative_to(results)
        assert metrics(run.folder) == metrics(local_folder), f"{run.label}: rows differ from the local run"
        starts = json.loads((run.folder / "env.json").read_text())["starts"]
        assert len(starts) == (2 if run == requeued else 1)
    log = text(requeued.folder / "log.txt")
    resumed = re.search(r"resuming cifar_resnet20 seed 0 at iteration (\d+)", log)
    assert "stopped by signal SIGTERM" in log and resumed and int(resumed.group(1)) % 20, \
        f"seed 0 was not stopped and resumed mid-epoch:\n{log}"

    logs = results / "slurm" / "logs"
    training_ends = [stamp for path in logs.glob(f"repro-cifar10_{array}_*.out") for stamp in stamps(path, "end")]
    # each task's last start ends with a stamp; the SIGTERM'd first start of seed 0 may not write one
    assert len(training_ends) >= 2
    report_log = logs / f"repro-report_{report}.out"
    assert stamps(report_log, "start")[0] > max(training_ends)
    assert "end: exit code 0" in text(report_log), text(report_log)
    assert (results / "REPORT.md").exists()


# Characters that mean something to bash, to sbatch's reading of #SBATCH lines, or to Slurm's file
# name patterns (%).
AWKWARD = "my results #1 (50% \"done\") 'x' $HOME"
ARGUMENTS_TRAINER = """#!/bin/bash
# Stands in for `python -m repro train`: writes its arguments, each ended by a NUL, and ends.
printf '%s\\0' "$@" > "$ARGUMENTS"
"""


def test_a_job_script_for_an_awkward_results_path_runs_as_written(cluster, tmp_path, monkeypatch):
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    (cifar / "data_batch_1").touch()
    trainer = tmp_path / "trainer"
    trainer.write_text(ARGUMENTS_TRAINER)
    trainer.chmod(0o755)
    monkeypatch.setattr(slurm, "PYTHON", str(trainer))
    arguments = tmp_path / "arguments"
    monkeypatch.setenv("ARGUMENTS", str(arguments))  # sbatch passes its environment on to the job
    parser = argparse.ArgumentParser()
    add_run_all_arguments(parser)
    results = tmp_path / AWKWARD
    options = parser.parse_args(["--slurm", "--only", "cifar_resnet20", "--seeds", "1", "--results", str(results),
                                 "--data-cifar", str(tmp_path / "cifar"), "--gpus-per-node", "0", "--cpus-per-task", "1",
                                 "--sbatch-arg=--comment=a b # c"])
    plan = make_plan(options)
    [array] = slurm.arrays(plan)
    (array.script.parent / "logs").mkdir(parents=True)
    array.runs_list.write_text(slurm.runs_list(array.runs, plan))
    array.script.write_text(slurm.array_script(array, plan, slurm.Resources.from_options(options)))
    job = slurm.sbatch(str(array.script))
    comment = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    assert "Comment=a b # c" in comment, comment  # sbatch read the quoted directive as one value
    slurm_log = results / "slurm" / "logs" / f"repro-cifar10_{job}_0.out"  # --output's pattern, expanded
    wait_until(lambda: "end: exit code 0" in text(slurm_log), "the job to end", timeout=60)
    assert arguments.read_text().split("\0")[:-1] == ["-m", "repro", *plan.train_arguments(array.runs[0])]
    assert "end: exit code 0" in text(array.runs[0].log)


@pytest.mark.slow
def test_status_shows_a_running_and_a_queued_task_of_the_suite(cluster, tmp_path, capsys):
    from repro.reports.status import read_status, render_table

    suite = tmp_path / "experiments" / "suite.yaml"
    (suite.parent / "cifar10").mkdir(parents=True)
    for spec in ("base.yaml", "resnet20.yaml"):
        shutil.copy(EXPERIMENTS / "cifar10" / spec, suite.parent / "cifar10" / spec)
    # runs long enough to be seen training; each task takes every CPU of the node, so one waits
    long = {**SUITE["smoke"]["overrides"]["cifar10"], "optim.max_iters": 100_000, "optim.lr_milestones": [50_000]}
    suite.write_text(yaml.safe_dump({**SUITE, "smoke": {**SUITE["smoke"], "overrides": {"cifar10": long}}}))
    results = tmp_path / "results"
    parser = argparse.ArgumentParser()
    add_run_all_arguments(parser)
    assert run_all(parser.parse_args(["--smoke", "--slurm", "--suite", str(suite), "--results", str(results),
                                      "--cpus-per-task", str(cluster.cpus)])) == 0

    def states() -> dict[int, tuple[str, str | None]]:
        return {r.seed: (r.state, r.slurm.state if r.slurm else None)
                for r in read_status(results, suite, smoke=True).runs}

    wait_until(lambda: sorted(states().values()) == [("queued", "PENDING"), ("training", "RUNNING")],
               "one task to run and the other to wait", timeout=120)
    status = read_status(results, suite, smoke=True)
    array = re.search(r"submitted job array (\d+)", capsys.readouterr().out).group(1)
    assert {r.slurm.job for r in status.runs} == {f"{array}_0", f"{array}_1"}
    table = render_table(status)
    assert "queued (Slurm)" in table and "RUNNING" in table and "PENDING" in table, table
