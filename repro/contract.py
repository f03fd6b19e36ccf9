"""The promises that the trainer, the reports and the suite backends share: exit codes, stop signals,
the run folder's file names and metric columns, where data lies, and how a file is written safely.

Nothing here imports torch or pandas: the launcher, the Slurm scripts and the reports read it too.
"""
from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import sys
import time
from pathlib import Path

# --- exit codes of `repro train` ----------------------------------------------------------------
EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected error (a traceback), or a suite with failed runs
EXIT_USAGE = 2  # a ReproError: bad spec, missing data, damaged run folder; the message says what to do
EXIT_DIVERGED = 3  # the loss became non-finite: final.json says "diverged"; rerunning does nothing
EXIT_LOCKED = 4  # another process holds the run folder's lock; this one wrote nothing
EXIT_PREEMPTED = 75  # stopped by a stop signal after a checkpoint (EX_TEMPFAIL): run the command again

# How Slurm and a user ask a run to stop: the trainer checkpoints at the next step and exits 75.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# --- the run folder: RESULTS/runs/<spec name>/seed<K>/ ------------------------------------------
CONFIG = "config.yaml"  # the resolved spec, written when the run starts
ENV = "env.json"  # one entry per start: versions, device, resolved speed switches, command
METRICS = "metrics.csv"  # one row per epoch, rewritten from the checkpoint so it never runs ahead
LOG = "log.txt"
FINAL = "final.json"  # written last: "finished" or "diverged"
CHECKPOINTS = "checkpoints"
LATEST, PREVIOUS = "last.pt", "prev.pt"
# The checkpoint key of the precise BN statistics of a finished run ({"statistics": BN buffers, "images": n}),
# kept beside the moving averages of its "model" (repro/precise_bn.py)
PRECISE_BN = "precise_bn"
LOCK = ".lock"  # flock'ed by the one process that trains the run; holds its host and pid
DAMAGED = "damaged"  # unreadable checkpoints are moved into checkpoints/damaged/, never deleted
EVENTS = "events.out.tfevents"  # run.tensorboard: TensorBoard's event files (their names begin so), a view of the CSV

# metrics.csv. `train_images` counts the epoch's training images; `partial` is 1 on the last row
# when training stopped inside an epoch (the curves keep it, the claims read full epochs only).
METRIC_COLUMNS = ("epoch", "iteration", "lr", "train_images", "partial", "train_loss", "train_error",
                  "test_loss", "test_error", "epoch_seconds", "images_per_second")
IMAGENET_METRIC_COLUMNS = METRIC_COLUMNS[:9] + ("test_top5_error",) + METRIC_COLUMNS[9:]


def metric_columns(dataset: str) -> tuple[str, ...]:
    return IMAGENET_METRIC_COLUMNS if dataset == "imagenet" else METRIC_COLUMNS


def run_path(results: str | Path, name: str, seed: int) -> Path:
    return Path(results) / "runs" / name / f"seed{seed}"


def lock_holder(lock_file: str | Path) -> str | None:
    """Who holds a run's lock ("host H pid P", as the holder wrote it into the file), or None when nobody
    does. It only looks: taking the lock, even for an instant, could make a trainer starting then fail.
    A lock held on this machine shows in /proc/locks; one held by another node of a network file system
    (NFS emulates flock with a whole-file record lock) shows to an F_GETLK query."""
    try:
        info = os.stat(lock_file)
    except OSError:
        return None
    pid = _local_lock_pid(info) or _record_lock_pid(lock_file)
    if pid is None:
        return None
    try:
        recorded = Path(lock_file).read_text().strip()
    except (OSError, UnicodeDecodeError):
        recorded = ""
    return recorded or f"pid {pid}"  # empty between the holder's flock and its write


_PROC_LOCK = re.compile(r"\d+:\s+(FLOCK|POSIX|OFDLCK)\s+\S+\s+\S+\s+(-?\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s")


def _local_lock_pid(info: os.stat_result) -> int | None:
    """The pid of a lock on the file `info` describes, from /proc/locks (Linux; waiters, `->`, left out)."""
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in table.splitlines():
        found = _PROC_LOCK.match(line)
        if found and int(found.group(5)) == info.st_ino and (int(found.group(3), 16), int(found.group(4), 16)) == (
                os.major(info.st_dev), os.minor(info.st_dev)):
            return int(found.group(2))
    return None


def _record_lock_pid(lock_file: str | Path) -> int | None:
    """The pid an F_GETLK query names for a lock on the whole file (Linux's struct flock on 64 bits)."""
    if not sys.platform.startswith("linux") or struct.calcsize("P") != 8:
        return None
    layout = "hhqqi4x"  # l_type, l_whence, l_start, l_len, l_pid
    try:
        handle = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        answer = fcntl.fcntl(handle, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return None
    finally:
        os.close(handle)
    kind, _, _, _, pid = struct.unpack(layout, answer)
    return None if kind == fcntl.F_UNLCK else pid


# --- data -----------------------------------------------------------------------------------------
DATA_ENV = "REPRO_DATA"  # a folder holding cifar-10-batches-py/ and, in imagenet/, train/ and val/


def data_root(dataset: str, given: str | None) -> Path | None:
    """`given` (a flag or the spec's data.root), else $REPRO_DATA, or its `imagenet/` subfolder for
    ImageNet; None when neither is set."""
    if given:
        return Path(given).expanduser()
    shared = os.environ.get(DATA_ENV)
    if not shared:
        return None
    return Path(shared).expanduser() / "imagenet" if dataset == "imagenet" else Path(shared).expanduser()


# --- files ------------------------------------------------------------------------------------------
def atomic_write(path: str | Path, data: str | bytes, durable: bool = False,
                 keep_previous: str | Path | None = None) -> None:
    """Replace `path` with `data` in one step: a reader or a crash sees the old file or the new one,
    never half of one. `durable` flushes the file and its folder to disk (checkpoints, results);
    `keep_previous` first renames the old file there. A failed write (a full or read-only disk)
    removes its `.partial` file, leaves the old files as they were, and raises."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb" if isinstance(data, bytes) else "w") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def set_aside(path: str | Path, why: str) -> Path:
    """Rename `path` (a file or a folder) to `<name>.<why>-<time>` beside it, so that nothing is
    deleted or overwritten when it has to make way; returns the new path."""
    path = Path(path)
    kept = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(kept)
    return kept
