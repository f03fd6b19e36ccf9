"""`repro status`: where each planned run of the suite stands, read from the run folders while they train.

It only reads: the files the trainer writes (runs.py's readers, metrics.csv's last rows only), whether a
run's lock is held (contract.lock_holder, which never takes it) and, for a suite submitted to Slurm, its
runs lists (results/slurm/) and squeue. A run is
- finished / diverged: final.json says so;
- damaged (why): a file cannot be read, or metrics.csv has epochs but no checkpoint to resume them from;
- training: its lock is held (by the process named), or its Slurm task runs (still starting, perhaps);
- locked by another process (host, pid): its lock is held while its own Slurm task does not run;
- queued (Slurm): its task waits in squeue;
- stopped (resumable): it has started (config.yaml, a checkpoint, epochs) and nothing trains it now: run
  the suite again to resume it;
- not started.
Times are estimates from the last epochs' speed (metrics.csv's epoch_seconds, which include the test
pass): the wall time so far of a run in progress is its iterations at that speed.
"""
from __future__ import annotations

import argparse
import getpass
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from repro.contract import CHECKPOINTS, ENV, LATEST, LOCK, PREVIOUS, lock_holder
from repro.errors import ReproError
from repro.reports.runs import DAMAGED, DIVERGED, FINISHED, NOT_STARTED, Run, find_runs
from repro.suite.plan import (DATASETS, Suite, override_assignments, read_suite, run_overrides, select_names,
                              spec_index)
from repro.suite.slurm import array_files

TRAINING, STOPPED, QUEUED, LOCKED = "training", "stopped", "queued", "locked"
SHOWN = {QUEUED: "queued (Slurm)", STOPPED: "stopped (resumable)", LOCKED: "locked by another process"}
SPEED_EPOCHS = 3  # img/s and the seconds per iteration are over the last epochs (a warm-up epoch fades out)
TAIL_ROWS = SPEED_EPOCHS + 1  # metrics.csv rows read: the speed window and the row before it
BAR = 20  # characters of the progress bar
SLURM_RUNNING = "RUNNING"
SLURM_ENDING = ("COMPLETING", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")  # squeue states of a task that no longer waits to train


@dataclass(frozen=True)
class SlurmTask:
    job: str  # <array job id>_<task id>, as squeue names it
    state: str  # squeue's: PENDING, RUNNING, ...
    reason: str  # squeue's %R: why it waits (Priority, Resources, Dependency), or its node


@dataclass(frozen=True)
class RunStatus:
    name: str
    seed: int
    dataset: str
    state: str  # one of FINISHED, DIVERGED, DAMAGED, TRAINING, LOCKED, QUEUED, STOPPED, NOT_STARTED
    detail: str | None  # DAMAGED: why; TRAINING, LOCKED: the lock's holder
    iteration: int
    max_iters: int | None
    train_error: float | None  # the last full epoch's, in %
    test_error: float | None
    images_per_second: float | None  # over the last SPEED_EPOCHS epochs
    seconds_per_iteration: float | None  # the same epochs' wall time (test passes included) per iteration
    wall_seconds: float | None  # final.json's for an ended run, else iteration x seconds_per_iteration
    eta_seconds: float | None  # the iterations left at seconds_per_iteration; 0 for an ended run
    devices: int  # processes of its last start (env.json): device-hours are wall hours x devices
    slurm: SlurmTask | None

    @property
    def ended(self) -> bool:
        return self.state in (FINISHED, DIVERGED)

    def shown_state(self) -> str:
        shown = SHOWN.get(self.state, self.state)
        return f"{shown} ({self.detail})" if self.detail else shown


@dataclass(frozen=True)
class SuiteStatus:
    runs: list[RunStatus]
    time: float  # when it was read (seconds since the epoch)
    slurm_note: str | None  # why no Slurm state is shown for a suite submitted to Slurm

    def summary(self) -> dict:
        """Runs done of planned, device-hours so far and the projected finish: the unfinished runs' ETAs,
        spread over the runs training now (a run with no measured speed yet is left out and counted)."""
        ended = [r for r in self.runs if r.ended]
        left = [r for r in self.runs if not r.ended and r.state != DAMAGED]
        training = sum(r.state == TRAINING for r in self.runs)
        unmeasured = [r for r in left if r.eta_seconds is None]
        remaining = sum(r.eta_seconds for r in left if r.eta_seconds is not None)
        measured = len(unmeasured) < len(left)
        finish = self.time + remaining / training if training and measured else None
        return {
            "planned": len(self.runs), "done": len(ended),
            "finished": sum(r.state == FINISHED for r in self.runs),
            "diverged": sum(r.state == DIVERGED for r in self.runs),
            "damaged": sum(r.state == DAMAGED for r in self.runs), "training": training,
            "device_hours": sum((r.wall_seconds or 0) * r.devices for r in self.runs) / 3600,
            "projected_finish": finish, "runs_without_speed": len(unmeasured),
        }


def read_status(results: Path, suite_file: str | Path, smoke: bool = False, extras: bool = False,
                slurm: bool = False) -> SuiteStatus:
    """Every planned run (spec, seed) of the suite with its state; reads, never writes or locks."""
    results, suite = Path(results), read_suite(suite_file, smoke=smoke)
    found = find_runs(results, suite, tail=TAIL_ROWS)
    planned = set(select_names(suite, [], extras))
    runs = [run for name, runs in found.items() for run in runs
            if name in planned or run.state != NOT_STARTED]  # an extra is shown once it has started
    tasks, note = slurm_tasks(results, slurm)
    statuses = [run_status(run, tasks.get(run.path.absolute())) for run in runs]
    return SuiteStatus(_with_spec_speeds(statuses, suite, smoke), time.time(), note)


def run_status(run: Run, task: SlurmTask | None) -> RunStatus:
    rows = run.metrics
    state, detail = run.state, run.problem
    if state not in (FINISHED, DIVERGED, DAMAGED):
        checkpoints = run.path / CHECKPOINTS
        resumable = (checkpoints / LATEST).is_file() or (checkpoints / PREVIOUS).is_file()
        holder = lock_holder(run.path / LOCK)
        running = task is not None and task.state == SLURM_RUNNING
        waiting = task is not None and not running and task.state not in SLURM_ENDING
        if holder is not None:
            state, detail = (TRAINING if task is None or running else LOCKED), holder
        elif rows is not None and not rows.empty and not resumable:
            state, detail = DAMAGED, "metrics.csv has epochs but there is no checkpoint to resume them from"
        elif running:
            state = TRAINING
        elif waiting:
            state = QUEUED
        elif resumable or rows is not None or run.config is not None:  # config.yaml: it started, then stopped
            state = STOPPED
        else:
            state = NOT_STARTED
    train_error = test_error = images_per_second = per_iteration = None
    if rows is not None and not rows.empty:
        full = rows[rows["partial"] == 0] if "partial" in rows else rows
        if not full.empty:
            train_error, test_error = float(full["train_error"].iloc[-1]), float(full["test_error"].iloc[-1])
        # the tail's rows: the window, after the row it starts from (none: the file's first rows)
        window = rows.iloc[-SPEED_EPOCHS:]
        before = float(rows["iteration"].iloc[-SPEED_EPOCHS - 1]) if len(rows) > SPEED_EPOCHS else 0.0
        if "images_per_second" in window:
            images_per_second = float(window["images_per_second"].mean())
        iterations = float(window["iteration"].iloc[-1]) - before
        if iterations > 0 and "epoch_seconds" in window and window["epoch_seconds"].notna().all():
            per_iteration = float(window["epoch_seconds"].sum()) / iterations
    max_iters = run.max_iters
    if run.final is not None and "wall_seconds" in run.final:
        wall = float(run.final["wall_seconds"])
    else:
        wall = run.iterations * per_iteration if per_iteration is not None else None
    return RunStatus(run.name, run.seed, run.network.dataset, state, detail, run.iterations, max_iters, train_error,
                     test_error, images_per_second, per_iteration, wall,
                     _eta(state, run.iterations, max_iters, per_iteration), _devices(run.path), task)


def _eta(state: str, iteration: int, max_iters: int | None, per_iteration: float | None) -> float | None:
    if state in (FINISHED, DIVERGED):
        return 0.0
    if state == DAMAGED or max_iters is None or per_iteration is None:
        return None
    return max(max_iters - iteration, 0) * per_iteration


def _devices(path: Path) -> int:
    """The processes (one per device) of the run's last start, from env.json; 1 when it cannot say."""
    try:
        size = json.loads((path / ENV).read_text())["starts"][-1].get("world_size", 1)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return 1
    return size if isinstance(size, int) and size > 0 else 1


def _with_spec_speeds(statuses: list[RunStatus], suite: Suite, smoke: bool) -> list[RunStatus]:
    """A run that has no config.yaml yet takes max_iters from its spec file (with the smoke suite's
    overrides, as run-all trains it), and one with no speed of its own (not started, queued) its spec's
    other runs' (the mean), so that the suite's finish counts it."""
    speeds: dict[str, list[float]] = {}
    for status in statuses:
        if status.seconds_per_iteration is not None:
            speeds.setdefault(status.name, []).append(status.seconds_per_iteration)
    max_iters: dict[str, int] = {}
    if any(status.max_iters is None for status in statuses):
        from repro.spec import load_spec, parse_overrides  # validating a spec imports torch: only when needed

        files = spec_index(suite.path.parent)
        overrides = ({key: override_assignments(mapping) for key, mapping in suite.smoke_overrides.items()}
                     if smoke else {})
        for status in statuses:
            if status.max_iters is None and status.name in files and status.name not in max_iters:
                assignments = run_overrides(overrides, status.dataset, status.name)
                max_iters[status.name] = load_spec(files[status.name], parse_overrides(assignments)).optim.max_iters
    completed = []
    for status in statuses:
        if status.max_iters is None and status.name in max_iters:
            status = replace(status, max_iters=max_iters[status.name])
        if status.eta_seconds is None and status.state != DAMAGED and status.name in speeds:
            speed = sum(speeds[status.name]) / len(speeds[status.name])
            status = replace(status, eta_seconds=_eta(status.state, status.iteration, status.max_iters, speed))
        completed.append(status)
    return completed


# --- Slurm ---------------------------------------------------------------------------------------------

def slurm_tasks(results: Path, asked: bool) -> tuple[dict[Path, SlurmTask], str | None]:
    """The suite's array tasks in squeue, by run folder: task i of a dataset's array trains line i+1 of
    its runs list, whose first field is the run's output file, the run folder's path + .out. Asked
    for with --slurm, or looked up when the suite was submitted (a runs list exists); the note says
    why nothing is shown for a submitted suite."""
    lists = {}
    for dataset in DATASETS:
        script, runs_list = array_files(results.absolute(), dataset)
        if runs_list.is_file():
            lists[str(script)] = [line.split("\t")[0] for line in runs_list.read_text().splitlines()]
    if not asked and not lists:
        return {}, None
    if shutil.which("squeue") is None:
        if asked:
            raise ReproError("--slurm needs Slurm's squeue, which is not on PATH here: run on the cluster's "
                             "login node (or add Slurm's bin folder to PATH)")
        return {}, "squeue is not on PATH here: the Slurm jobs' states are not shown"
    # one line per array task (--array), named <array job id>_<task id> (%i; %a is empty in some versions)
    listing = subprocess.run(["squeue", "--array", "--noheader", "--user", getpass.getuser(),
                              "--format=%i|%T|%R|%o"], capture_output=True, text=True)
    if listing.returncode:
        message = f"squeue failed (exit code {listing.returncode}): {listing.stderr.strip()}"
        if asked:
            raise ReproError(message)
        return {}, message + "; the Slurm jobs' states are not shown"
    tasks = {}
    for line in listing.stdout.splitlines():
        job, _, rest = line.partition("|")
        state, _, rest = rest.partition("|")
        reason, _, script = rest.partition("|")
        task = job.partition("_")[2]
        if script.strip() in lists and task.isdigit() and int(task) < len(lists[script.strip()]):
            tasks[Path(lists[script.strip()][int(task)]).with_suffix("")] = SlurmTask(job, state, reason)
    return tasks, None


# --- showing it ----------------------------------------------------------------------------------------

def duration(seconds: float | None) -> str:
    """1d 04:05:06, 04:05:06 or 05:06 (minutes:seconds); ? when unknown."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{seconds:02d}" if hours or days else f"{minutes:02d}:{seconds:02d}"
    return f"{days}d {clock}" if days else clock


def bar(iteration: int, max_iters: int | None) -> str:
    if not max_iters:
        return f"{'?' * BAR} {iteration:,}/?"
    done = min(BAR, round(BAR * iteration / max_iters))
    return f"{'#' * done}{'.' * (BAR - done)} {iteration:,}/{max_iters:,}"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(status: SuiteStatus) -> str:
    slurm = any(r.slurm is not None for r in status.runs)
    header = ["run", "state", "iteration", "train %", "test %", "img/s", "wall", "ETA"] + (["job", "squeue"] * slurm)
    rows = []
    for r in status.runs:
        row = [f"{r.name} seed {r.seed}", r.shown_state(), bar(r.iteration, r.max_iters),
               _number(r.train_error, ".2f"), _number(r.test_error, ".2f"), _number(r.images_per_second, ",.0f"),
               duration(r.wall_seconds) if r.wall_seconds is not None else "-",
               "-" if r.ended else duration(r.eta_seconds)]
        if slurm:
            row += [r.slurm.job, f"{r.slurm.state} {r.slurm.reason}"] if r.slurm else ["-", "-"]
        rows.append(row)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    right = {"train %", "test %", "img/s", "wall", "ETA"}
    lines = ["  ".join(cell.rjust(w) if header[i] in right else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in [header, *rows]]
    return "\n".join(lines + [suite_line(status)] + ([status.slurm_note] if status.slurm_note else []))


def suite_line(status: SuiteStatus) -> str:
    s = status.summary()
    problems = ", ".join(f"{s[key]} {key}" for key in ("diverged", "damaged") if s[key])
    line = (f"suite: {s['done']} of {s['planned']} runs done ({s['finished']} finished"
            f"{', ' + problems if problems else ''}), {s['training']} training, "
            f"{s['device_hours']:,.1f} device-hours so far")
    if s["done"] == s["planned"]:
        return line + "; all runs have ended"
    if not s["training"]:
        return line + "; no projected finish while nothing trains"
    if s["projected_finish"] is None:
        return line + "; no projected finish before a run has ended an epoch"
    unmeasured = (f", leaving out {s['runs_without_speed']} run{'s' * (s['runs_without_speed'] > 1)} with no "
                  "measured speed" if s["runs_without_speed"] else "")
    return (line + f"; projected finish {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(s['projected_finish']))}"
            f" ({s['training']} at a time{unmeasured})")


def to_json(status: SuiteStatus) -> dict:
    return {"time": status.time, "runs": [{**asdict(r), "ended": r.ended} for r in status.runs],
            "suite": status.summary(), "slurm_note": status.slurm_note}


def run_status_command(args: argparse.Namespace) -> int:
    """`repro status`: the table (or JSON) once, or every --watch seconds until Ctrl-C."""
    results = Path(args.results or ("results/smoke" if args.smoke else "results"))
    in_place = args.watch is not None and sys.stdout.isatty() and not args.json
    try:
        while True:
            status = read_status(results, args.suite, args.smoke, args.extras, args.slurm)
            text = json.dumps(to_json(status)) if args.json else render_table(status)
            if in_place:
                text = "\x1b[H\x1b[2J" + time.strftime("%Y-%m-%d %H:%M:%S") + f"  every {args.watch:g} s\n" + text
            elif args.watch is not None and not args.json:
                text = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}"
            print(text, flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
