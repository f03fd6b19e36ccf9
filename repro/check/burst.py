"""`repro check`'s training bursts and the projection made from them.

A burst trains the smallest planned ResNet of a dataset for EPOCHS short epochs through the real
`repro train`, in a temporary results folder, with the switches a real run resolves on this machine.
After the first epoch's row it sends SIGTERM (the trainer must checkpoint and exit 75), then runs the
same command again, which must resume and finish, and exit. The loss must be finite and falling. The
speed of the last epoch, scaled by multiply-adds, projects the wall time of every planned run.
ImageNet also gets a burst of MULTI_PROCESS ranks through the launcher that `run-all --local` starts
its ImageNet runs with (repro/suite/launch.py): over NCCL on two GPUs, over gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from repro.check.data import CIFAR10_IMAGES, IMAGENET_IMAGES
from repro.check.items import Item, fail, note, ok
from repro.check.suite import PlannedSpec, network_size
from repro.contract import CHECKPOINTS, ENV, EXIT_OK, EXIT_PREEMPTED, FINAL, LATEST, METRICS, run_path
from repro.suite.plan import PYTHON, REPRO
from repro.suite.slurm import SIGNAL_LEAD_S

# The stop comes after epoch 1, the resume finishes epoch 2, and epoch 3 runs whole in the resumed
# process after its warm-up (compilation, graph capture): its speed is the one projected.
EPOCHS = 3
POLL_S = 0.05  # how often a start's run folder is looked at
START_TIMEOUT_S = 900  # one command of a burst; a GPU burst takes about 30 s, a CPU one a minute
EXIT_AFTER_FINAL_S = 60  # a trainer has nothing left to do once final.json is written
TRAIN_IMAGES = {"cifar10": CIFAR10_IMAGES["train"], "imagenet": IMAGENET_IMAGES["train"]}
TEST_IMAGES = {"cifar10": CIFAR10_IMAGES["test"], "imagenet": IMAGENET_IMAGES["val"]}
FORWARD_SHARE = 1 / 3  # a test image costs a forward pass, about a third of a training step's work
MULTI_PROCESS = 2  # ranks of the multi-process burst


@dataclass(frozen=True)
class BurstSize:
    """A burst's data and batch on one kind of device."""

    data: dict[str, int]  # `repro make-data` sizes; for ImageNet also the sample taken of the real data
    batch_size: int | None = None  # None: the spec's, so that the speed measured is the suite's
    overrides: tuple[str, ...] = ()  # further --set assignments

    def train_images(self) -> int:
        return self.data["train"] * self.data.get("classes", 1)  # ImageNet's counts are per class


SIZES = {
    # 2 CPU cores train a CIFAR ResNet-20 at 10-100 images/s and an ImageNet ResNet-18 at 0.5-8
    ("cpu", "cifar10"): BurstSize({"train": 32, "test": 16}, batch_size=8),
    ("cpu", "imagenet"): BurstSize({"classes": 2, "train": 2, "val": 1}, batch_size=2,
                                   overrides=("data.workers=1", "data.mean_sample_size=4")),
    # a GPU: the suite's batch sizes, 100 CIFAR and 5 ImageNet iterations an epoch
    ("cuda", "cifar10"): BurstSize({"train": 12_800, "test": 1_000}),
    ("cuda", "imagenet"): BurstSize({"classes": 32, "train": 40, "val": 4}, overrides=("data.mean_sample_size=256",)),
}


@dataclass(frozen=True)
class BurstData:
    folder: Path
    real: bool
    description: str
    train_images: int


@dataclass(frozen=True)
class Speed:
    """What a burst measured, for the projection."""

    spec: str
    multiply_adds: int  # of the network measured, per image
    images_per_second: float
    device: str


def burst_spec(planned: list[PlannedSpec], dataset: str) -> PlannedSpec:
    """The smallest planned ResNet of the dataset (the smallest planned network if none is a ResNet)."""
    candidates = [p for p in planned if p.dataset == dataset]
    residual = [p for p in candidates if p.spec.model.residual] or candidates
    return min(residual, key=lambda p: network_size(p.spec.model).multiply_adds)


def run_burst(planned: PlannedSpec, device_type: str, real_root: Path | None, scratch: Path,
              keep_log: Path, ranks: int = 1) -> tuple[list[Item], Speed | None]:
    """Train the burst of `planned` in `scratch`, as `ranks` processes through the launcher when more
    than one; its items, and its speed when it trained. The output of a failed burst is kept at
    `keep_log`."""
    dataset, size = planned.dataset, SIZES[(device_type, planned.dataset)]
    name = dataset if ranks == 1 else f"{dataset} {ranks}-process"
    work = scratch if ranks == 1 else scratch / f"{ranks}-process"  # its own data and run folder
    work.mkdir(exist_ok=True)
    log, label = work / f"{dataset}.out", f"{name} burst"
    try:
        data = _burst_data(dataset, size, device_type, real_root, work, log)
        if isinstance(data, str):
            return [_failed(label, data, log, keep_log)], None
        results = work / "results"
        command, iterations, batch = _train_command(planned, size, data, results, ranks)
        if ranks > 1 and device_type == "cpu":
            # no loader processes: a gloo rank forking one can deadlock in CPython 3.11's fork (a lock
            # held by another thread at the fork), which would hang the check, not test the launch
            command += ["--set", "data.workers=0"]
        folder = run_path(results, planned.name, planned.spec.seed)
        problem = _stop_after_first_epoch(command, folder, log)
        if problem:
            return [_failed(label, problem, log, keep_log)], None
        first_row = _rows(folder)[0]
        problem = _finish(command, folder, log)
    except subprocess.TimeoutExpired as error:  # its process group is killed by then
        return [_failed(label, f"a command ran longer than {error.timeout:.0f} s", log, keep_log)], None
    if problem:
        return [_failed(label, problem, log, keep_log)], None

    rows, starts = _rows(folder), json.loads((folder / ENV).read_text())["starts"]
    device = f"{starts[-1]['device']} ({starts[-1]['device_name']})"
    processes = starts[-1]["world_size"]
    switches = starts[-1]["switches"]
    described = ", ".join([switches["precision"]] + [k for k, v in switches.items() if v is True])
    items = [(ok if data.real else note)("training", label, f"{planned.name} on {data.description}: {iterations} "
                                                            f"iterations of {batch} images on {device} in {processes} "
                                                            f"process{'es' * (processes > 1)}, switches: "
                                                            f"{described}")]
    items.append(_loss(name, [float(row["train_loss"]) for row in rows]))
    # A rerun that started over would write epoch 1's row anew, with another epoch_seconds.
    if len(starts) == 2 and rows[0] == first_row and int(rows[-1]["iteration"]) == iterations:
        items.append(ok("training", f"{name} resume", f"SIGTERM in epoch 2: exit code {EXIT_PREEMPTED} with a "
                                                      f"checkpoint; the rerun resumed it and finished"))
    else:
        items.append(_failed(f"{name} resume", f"the rerun did not continue the stopped run: {len(starts)} starts "
                                                  f"in {ENV}, epoch 1's row {'kept' if rows[0] == first_row else 'new'}"
                                                  f", the last at iteration {rows[-1]['iteration']} of {iterations}",
                             log, keep_log))
    speed = float(rows[-1]["images_per_second"])
    items.append(ok("training", f"{name} speed", f"{speed:,.1f} images/s in the last epoch "
                                                 f"({batch / speed:.3g} s per iteration of {batch})"))
    return items, Speed(planned.name, network_size(planned.spec.model).multiply_adds, speed, device)


def _burst_data(dataset: str, size: BurstSize, device_type: str, real_root: Path | None, scratch: Path,
                log: Path) -> BurstData | str:
    """The real data where it passed its check and an epoch of it is short enough, else a generated
    stand-in; or why that could not be made."""
    if real_root is not None and dataset == "imagenet":
        return BurstData(_imagenet_sample(real_root, scratch / "imagenet-sample", size.data), True,
                         f"a sample of the real data ({size.train_images()} training images)", size.train_images())
    if real_root is not None and device_type == "cuda":
        return BurstData(real_root, True, "the real data", CIFAR10_IMAGES["train"])
    why = ("a real epoch is 50,000 images, minutes on a CPU" if real_root is not None
           else "the real data is missing or failed its check above")
    out = scratch / f"generated-{dataset}"
    sizes = [a for key, value in size.data.items() for a in (f"--{key}", str(value))]
    arguments = ["make-data", dataset, "--out", str(out), *sizes]
    with _started(REPRO + arguments, log) as process:
        code = process.wait(timeout=START_TIMEOUT_S)
    if code:
        return f"`repro {shlex.join(arguments)}` exited with {code}"
    return BurstData(out, False, f"generated data ({why})", size.train_images())


def _imagenet_sample(root: Path, out: Path, sizes: dict[str, int]) -> Path:
    """An ImageNet-layout folder of links to the first images of the first classes: the real JPEGs,
    decoded by the real pipeline, in epochs of a few iterations."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    classes = sorted(entry.name for entry in os.scandir(root / "train") if entry.is_dir())[:sizes["classes"]]
    for split in ("train", "val"):
        for name in classes:
            (out / split / name).mkdir(parents=True)
            images = sorted(f for f in os.listdir(root / split / name) if has_file_allowed_extension(f, IMG_EXTENSIONS))
            for image in images[:sizes[split]]:
                (out / split / name / image).symlink_to((root / split / name / image).absolute())
    return out


def _train_command(planned: PlannedSpec, size: BurstSize, data: BurstData, results: Path,
                   ranks: int) -> tuple[list[str], int, int]:
    """`repro train` of the burst (through the launcher for several ranks), its iterations and its
    batch size."""
    optim = planned.spec.optim
    batch = size.batch_size or optim.batch_size
    iterations = EPOCHS * (data.train_images // batch)
    sets = [f"optim.max_iters={iterations}", f"optim.batch_size={batch}", "run.progress=log",
            f"data.verify_checksums={str(data.real and planned.dataset == 'cifar10').lower()}", *size.overrides]
    # A smaller batch takes a proportionally smaller lr (Goyal et al. 2017), so that the CPU's small
    # batches train as the suite's do; the milestones keep their fractions of training.
    sets += [f"optim.{key}={value * batch / optim.batch_size}" for key in ("lr", "warmup_lr")
             if (value := getattr(optim, key)) is not None]
    if optim.lr_schedule == "milestones":
        milestones = sorted({max(1, m * iterations // optim.max_iters) for m in optim.lr_milestones})
        sets.append(f"optim.lr_milestones={milestones}")
    start = REPRO if ranks == 1 else [PYTHON, "-m", "repro.suite.launch", "--nproc-per-node", str(ranks), "--"]
    command = start + ["train", str(planned.path), "--data", str(data.folder), "--results", str(results),
                       *(a for s in sets for a in ("--set", s))]
    return command, iterations, batch


@contextlib.contextmanager
def _started(command: list[str], log: Path):
    """The command running in a process group of its own, its output appended to `log`; the whole group,
    the trainer's data-loader workers too, is killed when the block ends, however it ends."""
    with open(log, "a") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_until(process: subprocess.Popen, ready: Callable[[], bool]) -> bool:
    """Whether `ready()` came true while the process ran (within START_TIMEOUT_S)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while process.poll() is None:
        if ready():
            return True
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(process.args, START_TIMEOUT_S)
        time.sleep(POLL_S)
    return False


def _stop_after_first_epoch(command: list[str], folder: Path, log: Path) -> str:
    """Start the run, send SIGTERM once its first epoch's row is written, and check that it exits 75
    with a checkpoint; what went wrong, or ""."""
    def has_a_row() -> bool:
        return (folder / METRICS).is_file() and len((folder / METRICS).read_text().splitlines()) > 1

    with _started(command, log) as process:
        if not _wait_until(process, has_a_row):
            return f"the first start exited with {process.returncode} before its first epoch ended"
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=SIGNAL_LEAD_S)
        except subprocess.TimeoutExpired:
            return (f"after SIGTERM the trainer did not exit within {SIGNAL_LEAD_S} s, the time Slurm leaves a job "
                    "between its warning signal and the kill")
    if code != EXIT_PREEMPTED:
        return f"after SIGTERM the trainer exited with {code}, not {EXIT_PREEMPTED} (checkpointed, run again)"
    if not (folder / CHECKPOINTS / LATEST).is_file():
        return f"after SIGTERM and exit code {EXIT_PREEMPTED}, {folder / CHECKPOINTS / LATEST} is missing"
    return ""


def _finish(command: list[str], folder: Path, log: Path) -> str:
    """Run the same command again: it must finish the run and exit; what went wrong, or ""."""
    with _started(command, log) as process:
        if _wait_until(process, (folder / FINAL).is_file):
            try:
                process.wait(timeout=EXIT_AFTER_FINAL_S)
            except subprocess.TimeoutExpired:
                return (f"the rerun wrote {FINAL} but had not exited {EXIT_AFTER_FINAL_S} s later: something it "
                        "started (a data-loader worker?) keeps it alive")
    final = json.loads((folder / FINAL).read_text()) if (folder / FINAL).is_file() else {}
    if process.returncode != EXIT_OK or final.get("status") != "finished":
        return f"the rerun after the stop exited with {process.returncode}; {FINAL}: {final.get('status', 'missing')}"
    return ""


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / METRICS, newline="") as handle:
        return list(csv.DictReader(handle))


def _loss(dataset: str, losses: list[float]) -> Item:
    shown = ", ".join(f"{loss:.3f}" for loss in losses) + " (mean training loss by epoch)"
    if not all(math.isfinite(loss) for loss in losses):
        return fail("training", f"{dataset} loss", f"not finite: {shown}",
                    "the data or the device computes wrong numbers: run `repro train` on the real data and read "
                    "its log")
    if losses[-1] >= losses[0]:
        return fail("training", f"{dataset} loss", f"not falling: {shown}",
                    "run `repro train` on the real data for a few epochs and compare with a known-good run's log")
    return ok("training", f"{dataset} loss", f"finite and falling: {shown}")


def _failed(name: str, problem: str, log: Path, keep_log: Path) -> Item:
    """A failed burst, its output kept beside the check's report (the temporary folder goes)."""
    output = log.read_text() if log.is_file() else ""
    keep_log.parent.mkdir(parents=True, exist_ok=True)
    keep_log.write_text(output)
    last = [line.strip() for line in output.splitlines() if line.strip()][-1:]
    return fail("training", name, problem + (f"; its last line: {last[0]}" if last else ""),
                f"read the whole output in {keep_log}")


def cleanup(scratch: Path) -> Item:
    if scratch.exists():
        return fail("training", "cleanup", f"{scratch} could not be removed entirely", f"remove it: rm -r {scratch}")
    return ok("training", "cleanup", f"the temporary folder {scratch} is gone, with the bursts' runs, data and "
                                     "processes")


def project(planned: list[PlannedSpec], speeds: dict[str, Speed]) -> list[dict]:
    """Each planned spec's wall time on one device: its training images and its test passes (a forward
    pass per test image, each epoch), at the measured speed scaled by its multiply-adds per image."""
    rows = []
    for spec in planned:
        speed = speeds.get(spec.dataset)
        if speed is None:
            continue
        optim = spec.spec.optim
        images = optim.max_iters * optim.batch_size
        tested = images / TRAIN_IMAGES[spec.dataset] * TEST_IMAGES[spec.dataset]
        work = (images + FORWARD_SHARE * tested) * network_size(spec.spec.model).multiply_adds / speed.multiply_adds
        hours = work / speed.images_per_second / 3600
        rows.append({"spec": spec.name, "runs": spec.runs, "iterations": optim.max_iters,
                     "batch_size": optim.batch_size, "measured_on": speed.spec, "hours_per_run": hours,
                     "device_hours": hours * spec.runs})
    return rows


def format_projection(rows: list[dict], speeds: dict[str, Speed]) -> str:
    measured = "; ".join(f"{s.spec} at {s.images_per_second:,.1f} images/s" for s in speeds.values())
    devices = ", ".join(sorted({speed.device for speed in speeds.values()}))
    lines = [f"Projected wall time on one {devices}: {measured}, scaled by multiply-adds per image.",
             "ImageNet runs may stop sooner (the plateau schedule); on N GPUs one takes about 1/N of its hours.",
             f"  {'SPEC':22s} {'RUNS':>4s} {'ITERATIONS':>10s} {'BATCH':>5s} {'HOURS/RUN':>10s} {'DEVICE-HOURS':>12s}"]
    for row in rows:
        lines.append(f"  {row['spec']:22s} {row['runs']:4d} {row['iterations']:10,d} {row['batch_size']:5d} "
                     f"{row['hours_per_run']:10.2f} {row['device_hours']:12.1f}")
    lines.append(f"  {'the whole suite':22s} {sum(r['runs'] for r in rows):4d} {'':10s} {'':5s} {'':10s} "
                 f"{sum(r['device_hours'] for r in rows):12.1f}")
    return "\n".join(lines)
