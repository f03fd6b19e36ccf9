"""`repro check` (also `./run_all.sh --check [--local|--slurm]`): a preflight of the machine that will
run the suite, before anyone spends GPU-hours on it.

It checks the software, the devices, the data, the free disk and (--slurm) Slurm; then trains a short
burst of each planned dataset's smallest ResNet through the real `repro train` (stopped by SIGTERM and
resumed), and projects the wall time of every planned run from the speed measured. When ImageNet is
planned, its multi-process path too: a 2-process burst through the launcher `run-all --local` uses,
and an all_reduce over every visible GPU (over gloo on the CPU where there is none). It prints a table,
writes <out>/check-<host>.json, and exits 1 when an item failed; each failure names its fix.

items.py is a line of the table; machine.py, data.py and burst.py make them; suite.py is the runs
planned. This module reads the options and imports no torch, so the CLI's parser stays light.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from repro.contract import DATA_ENV, EXIT_FAILED, EXIT_OK, STOP_SIGNALS, atomic_write, data_root
from repro.arguments import at_least, output_folder
from repro.suite.slurm import variable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Check this machine before the suite runs on it: software, devices, data, disk, "
                          "Slurm (--slurm), and a short training burst per dataset, with the suite's wall "
                          "time projected from it. Exits 1 when an item fails.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="the suite will run on this machine's GPUs: no GPU fails")
    mode.add_argument("--slurm", action="store_true", help="the suite will be submitted from here: check sinfo, "
                                                           "the partition and the account too")
    runs = parser.add_argument_group("the planned runs, chosen as repro run-all chooses them")
    runs.add_argument("--suite", default="experiments/suite.yaml", help="suite file (default: %(default)s)")
    runs.add_argument("--only", action="append", default=[], metavar="PATTERN",
                      help="only specs whose name matches (fnmatch); repeatable or comma-separated")
    runs.add_argument("--extras", action="store_true", help="also the suite's extras")
    runs.add_argument("--seeds", type=at_least(1), metavar="N", help="seeds per spec (default: the suite file's)")
    runs.add_argument("--results", type=output_folder, default="results",
                      help="where the run folders will go: its disk is checked and the bursts train there, "
                           "in a temporary folder")
    runs.add_argument("--data-cifar", metavar="DIR",
                      help=f"the folder holding cifar-10-batches-py (default: ${DATA_ENV})")
    runs.add_argument("--data-imagenet", metavar="DIR",
                      help=f"the folder holding train/ and val/ (default: ${DATA_ENV}/imagenet)")
    slurm = parser.add_argument_group("--slurm", "as repro run-all --slurm takes them")
    slurm.add_argument("--partition", default=os.environ.get(variable("partition")), metavar="P",
                       help=f"partition (default: the cluster's default) [${variable('partition')}]")
    slurm.add_argument("--account", default=os.environ.get(variable("account")), metavar="A",
                       help=f"account to charge [${variable('account')}]")
    parser.add_argument("--no-burst", action="store_true", help="skip the training bursts and the projection")
    parser.add_argument("--acceptance", action="store_true",
                        help="instead: prove and time the GPU path in at most 10 minutes (GPU tests, this check on "
                             "generated data, the CIFAR and data-loading benchmarks, bf16 against fp32), into "
                             "<out>/acceptance-<device>/ (repro/check/acceptance.py)")
    parser.add_argument("--out", type=output_folder, default="results/bench",
                        help="where check-<host>.json goes (default: %(default)s)")


def run_check(options: argparse.Namespace) -> int:
    if options.acceptance:
        from repro.check.acceptance import run_acceptance

        return run_acceptance(Path(options.out), Path(options.results))
    from repro.check import burst, data, machine
    from repro.check.items import FAIL, OK, format_table, note
    from repro.check.suite import network_size, planned_specs

    planned = planned_specs(options.suite, options.only, options.extras, options.seeds)
    datasets = list(dict.fromkeys(spec.dataset for spec in planned))
    items = machine.software() + machine.devices(need_gpu=options.local)
    real = {}  # the data folders that passed every check, for the bursts
    for dataset in datasets:
        root = data_root(dataset, options.data_cifar if dataset == "cifar10" else options.data_imagenet)
        found = [data.cifar10(root)] if dataset == "cifar10" else data.imagenet(root)
        items += found
        real[dataset] = root if all(item.status == OK for item in found) else None
    parameters = [network_size(spec.spec.model).parameters for spec in planned for _ in range(spec.runs)]
    items.append(machine.disk(Path(options.results), parameters))
    if options.slurm:
        items += machine.slurm(options.partition, options.account)

    host = re.sub(r"[^\w.-]", "_", socket.gethostname().split(".")[0]) or "host"
    out = Path(options.out)
    speeds, projection = {}, []
    if options.no_burst:
        items.append(note("training", "bursts", "skipped (--no-burst): no projection either"))
    else:
        found, speeds = _bursts(planned, datasets, real, Path(options.results), out, host)
        items += found
        projection = burst.project(planned, speeds)

    print(format_table(items))
    if projection:
        print()
        print(burst.format_projection(projection, speeds))
    failed = [item for item in items if item.status == FAIL]
    report = {"host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv,
              "failed": len(failed), "items": [item.as_dict() for item in items],
              "speeds": {dataset: vars(speed) for dataset, speed in speeds.items()},
              "projection": projection, "device_hours": sum(row["device_hours"] for row in projection)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"check-{host}.json"
    atomic_write(path, json.dumps(report, indent=2) + "\n")
    print(f"\n{len(failed)} of {len(items)} items failed" if failed else f"\nall {len(items)} items passed",
          f"; wrote {path}", sep="")
    return EXIT_FAILED if failed else EXIT_OK


def _bursts(planned, datasets: list[str], real: dict[str, Path | None], results: Path, out: Path,
            host: str) -> tuple[list, dict]:
    """Each dataset's burst in one temporary folder inside `results` (the disk the runs will write),
    removed afterwards whatever happens; their items, and the speeds measured."""
    import torch

    from repro.check import burst
    from repro.check.items import fail

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        results.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".check-", dir=results))
    except OSError as error:
        return [fail("training", "bursts", f"cannot write in {results}: {error.strerror or error}",
                     "pass --results DIR on a disk this user can write")], {}
    items, speeds = [], {}
    handlers = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    try:
        for dataset in datasets:
            chosen = burst.burst_spec(planned, dataset)
            print(f"repro check: training a burst of {chosen.name} on {device_type}", file=sys.stderr, flush=True)
            kept_log = out / f"check-{host}-{dataset}.log"  # written when the burst fails
            kept_log.unlink(missing_ok=True)
            found, speed = burst.run_burst(chosen, device_type, real[dataset], scratch, kept_log)
            items += found
            if speed is not None:
                speeds[dataset] = speed
        if "imagenet" in datasets:  # the only runs of several processes
            items += _multi_process(planned, device_type, real["imagenet"], scratch, out, host)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return items + [burst.cleanup(scratch)], speeds


def _multi_process(planned, device_type: str, real_root: Path | None, scratch: Path, out: Path,
                   host: str) -> list:
    """The ImageNet burst again as several processes, and an all_reduce over every GPU."""
    import torch

    from repro.check import burst, collective
    from repro.check.items import note

    items = [collective.all_reduce()]
    gpus = torch.cuda.device_count()
    name = f"imagenet {burst.MULTI_PROCESS}-process burst"
    if device_type == "cuda" and gpus < burst.MULTI_PROCESS:
        return items + [note("training", name, f"{gpus} GPU visible: an ImageNet run trains in one process here")]
    print(f"repro check: training {name} on {device_type}", file=sys.stderr, flush=True)
    kept_log = out / f"check-{host}-imagenet-{burst.MULTI_PROCESS}-process.log"
    kept_log.unlink(missing_ok=True)
    found, _ = burst.run_burst(burst.burst_spec(planned, "imagenet"), device_type, real_root, scratch, kept_log,
                               ranks=burst.MULTI_PROCESS)
    return items + found


def _stop(signum: int, frame) -> None:
    """A stop signal (Slurm's, or kill) unwinds the bursts, so that their folder is still removed and
    the trainer they started is killed."""
    raise SystemExit(128 + signum)
