"""The `local` backend of `repro run-all`: the plan run on this machine, --smoke on the CPU, --local
on its GPUs.

The CIFAR-10 runs share a pool of slots (CPU threads, or a GPU each), the ImageNet runs follow one at
a time (one process per GPU, through repro/suite/launch.py), then the reports. A failed run does not stop the others; the
summary at the end names each failure with its output file.
"""
from __future__ import annotations

import argparse
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from repro.contract import EXIT_DIVERGED, EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_PREEMPTED
from repro.errors import ReproError
from repro.suite.plan import PYTHON, REPRO, Plan, Run, at_least, make_missing_data, print_start

MODE = "the full suite on this machine's CUDA GPUs"  # the help of --local
SMOKE_MAX_PARALLEL = 4  # smoke CIFAR runs at once: nets this small at batch 32 gain little past a few threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--local")
    group.add_argument("--gpus", type=gpu_list, help="GPU indices to use, e.g. 0,1 (default: all visible)")
    group.add_argument("--per-gpu", type=at_least(1), default=1, metavar="N",
                       help="CIFAR runs sharing one GPU at a time (default: 1)")


def gpu_list(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1,3, got {text!r}") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative GPU indices, got {text!r}")
    return gpus


def check(options: argparse.Namespace) -> None:
    """A mode this backend cannot run, and what this machine lacks, said before anything about the data."""
    if options.local and options.smoke:
        raise ReproError("--local trains the full suite on this machine's GPUs; --smoke trains the shrunk suite "
                         "(on the CPU here, or with --slurm on Slurm): choose one")
    if options.local:
        local_gpus(options.gpus)


def run(plan: Plan, options: argparse.Namespace) -> int:
    """Run the plan here (--smoke on the CPU, --local on the GPUs); return run-all's exit code."""
    stages = local_stages(plan, local_gpus(options.gpus) if options.local else [], options.per_gpu)
    if options.dry_run:
        print_plan(plan, stages)
        return EXIT_OK
    started = time.monotonic()
    print_start(plan, dry_run=False)
    make_missing_data(plan)
    pool = LocalPool()
    previous = {sig: signal.signal(sig, pool.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        outcomes = [outcome for stage in stages for outcome in pool.run(stage)]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return summarize(plan, outcomes, time.monotonic() - started)


@dataclass(frozen=True)
class Job:
    label: str
    command: list[str]
    log: Path
    run: Run | None = None  # None for a report


@dataclass(frozen=True)
class Stage:
    """Jobs that run together, each in a free slot (an environment: its GPU, its thread count)."""
    name: str
    jobs: list[Job]
    slots: list[dict[str, str]]
    where: str


@dataclass(frozen=True)
class Outcome:
    job: Job
    code: int | None  # None: never started (stopped before its turn)
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        return {EXIT_OK: "done", EXIT_DIVERGED: "diverged", EXIT_PREEMPTED: "stopped", EXIT_LOCKED: "busy",
                None: "not started"}.get(self.code, "failed")


class LocalPool:
    """Runs jobs as child processes, one per free slot, in order. SIGINT or SIGTERM stops everything:
    the trainers get SIGTERM (an ImageNet run's launcher passes it on to every rank), save a checkpoint
    and exit with 75, however long that takes; the jobs not started stay so."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, stage: Stage) -> list[Outcome]:
        free: queue.Queue = queue.Queue()
        for slot in stage.slots:
            free.put(slot)
        with ThreadPoolExecutor(len(stage.slots)) as threads:
            return list(threads.map(lambda job: self._run_one(job, free), stage.jobs))

    def _run_one(self, job: Job, free: queue.Queue) -> Outcome:
        slot = free.get()
        try:
            with self.lock:
                if self.stopping:
                    return Outcome(job, None)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                where = f"GPU {slot['CUDA_VISIBLE_DEVICES']}" if slot.get("CUDA_VISIBLE_DEVICES") else "the CPU"
                print(f"start       {job.label} on {where} (output: {job.log})", flush=True)
                start = time.monotonic()
                with open(job.log, "a") as log:
                    # A session of its own: a Ctrl-C reaches only us, and we ask the child to checkpoint.
                    process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                               env={**os.environ, **slot}, start_new_session=True)
                self.running.add(process)
            code = process.wait()
            with self.lock:
                self.running.discard(process)
            outcome = Outcome(job, code, time.monotonic() - start)
            print(f"{outcome.kind:11s} {job.label} after {duration(outcome.seconds)}"
                  + (f" (exit code {code}, see {job.log})" if outcome.kind == "failed" else ""), flush=True)
            return outcome
        finally:
            free.put(slot)

    def stop(self, signum: int, frame) -> None:
        with self.lock:
            self.stopping = True
            for process in self.running:
                process.send_signal(signal.SIGTERM)
        print(f"\nsignal {signum}: stopping; the runs save a checkpoint, run the same command to resume", flush=True)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_gpus(requested: list[int] | None) -> list[int]:
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise ReproError("--local needs CUDA GPUs and this machine has none visible; use --smoke for the CPU "
                         "or --slurm for a cluster")
    missing = [g for g in requested or [] if g >= count]
    if missing:
        raise ReproError(f"--gpus: there is no GPU {missing[0]} here; the visible GPUs are 0..{count - 1}")
    return requested or list(range(count))


def local_stages(plan: Plan, gpus: list[int], per_gpu: int) -> list[Stage]:
    """The CIFAR-10 runs in a pool, then the ImageNet runs one at a time, then the reports. Without
    `gpus` (--smoke) each run gets cores/parallel CPU threads; with them each CIFAR run gets one GPU
    and each ImageNet run all of them, one process per GPU through our launcher."""
    cores = usable_cores()
    if not gpus:
        parallel = min(cores, SMOKE_MAX_PARALLEL)
        threads = max(1, cores // parallel)
        cifar_slots = [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}] * parallel
        cifar_where = f"{parallel} at a time on the CPU, {threads} thread{'s' * (threads > 1)} each"
        imagenet_slot = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(cores)}
        imagenet_launch, imagenet_where = REPRO, f"one at a time on the CPU, {cores} threads"
    else:
        gpu_list = ",".join(map(str, gpus))
        threads = max(1, cores // (len(gpus) * per_gpu))
        cifar_slots = [{"CUDA_VISIBLE_DEVICES": str(g), "OMP_NUM_THREADS": str(threads)}
                       for _ in range(per_gpu) for g in gpus]
        cifar_where = f"{per_gpu} per GPU on GPUs {gpu_list}"
        imagenet_slot = {"CUDA_VISIBLE_DEVICES": gpu_list}
        imagenet_launch = [PYTHON, "-m", "repro.suite.launch", "--nproc-per-node", str(len(gpus)), "--"]
        imagenet_where = f"one at a time, one process on each of GPUs {gpu_list}"
    cifar = [Job(run.label, REPRO + plan.train_arguments(run), run.log, run) for run in plan.pending("cifar10")]
    imagenet = [Job(run.label, imagenet_launch + plan.train_arguments(run), run.log, run)
                for run in plan.pending("imagenet")]
    reports = [Job(name, REPRO + arguments, plan.results / "logs" / f"{name}.out")
               for name, arguments in plan.report_arguments()]
    return [Stage("CIFAR-10 runs", cifar, cifar_slots, cifar_where),
            Stage("ImageNet runs", imagenet, [imagenet_slot], imagenet_where),
            # Table 4's test (run-all --extras) is a report that runs networks: it gets the first GPU
            Stage("reports", reports, [{"CUDA_VISIBLE_DEVICES": str(gpus[0]) if gpus else ""}],
                  f"one after another on {f'GPU {gpus[0]}' if gpus else 'the CPU'}")]


def print_plan(plan: Plan, stages: list[Stage]) -> None:
    print_start(plan, dry_run=True)
    for stage in stages:
        if stage.jobs:
            print(f"# {stage.name}: {stage.where}")
        for job in stage.jobs:
            print(f"{job.run.state() if job.run else 'report':11s} {job.label:28s} {shlex.join(job.command)}")


def summarize(plan: Plan, outcomes: list[Outcome], seconds: float) -> int:
    """Print what happened to each run and report; return run-all's exit code: 0 all done, 1 something
    failed, 75 something is left to do (stopped, busy or not started)."""
    reports = sum(1 for o in outcomes if o.job.run is None)
    print(f"\n{len(plan.runs)} runs and {reports} reports in {duration(seconds)} (results in {plan.results}):")
    print(f"  already finished, skipped: {len(plan.runs) - (len(outcomes) - reports)}")
    for kind, meaning in (("done", "done"), ("diverged", "diverged (final.json says so)"),
                          ("stopped", "stopped after a checkpoint: run the same command to resume"),
                          ("busy", "busy: another process trains it (its run folder is untouched); run the "
                                   "same command once that one ends"),
                          ("not started", "not started"), ("failed", "FAILED")):
        chosen = [o for o in outcomes if o.kind == kind]
        if chosen:
            print(f"  {meaning}: {len(chosen)}")
        if kind == "failed":
            for o in chosen:
                print(f"    {o.job.label}: exit code {o.code}, output in {o.job.log}")
    kinds = {o.kind for o in outcomes}
    if "failed" in kinds:
        return EXIT_FAILED
    # not all done, nothing broken: the same command, run again, goes on
    return EXIT_PREEMPTED if kinds & {"stopped", "busy", "not started"} else EXIT_OK
