"""`python -m repro.suite.launch --nproc-per-node N -- train SPEC ...`: one `python -m repro` per rank on
this machine, over which an ImageNet run trains. `run-all --local` and `repro check` start their
multi-process runs through it; under Slurm, srun starts the ranks (repro/suite/slurm.py).

Not torchrun, which SIGKILLs its workers 30 s after a SIGTERM (a checkpoint being written too), turns
a worker's exit code 75 into 1, and dies on SIGUSR1, leaving its workers running. Here a stop is a
stop: SIGTERM and SIGUSR1 go on to every rank unchanged, and SIGINT (a Ctrl-C) as SIGTERM, the
trainer's stop signals; each rank checkpoints at its next step and exits with 75, however long that
takes, and so does the launcher. When a rank fails, the others are killed after FAILURE_GRACE_S (they
would wait for it in a collective until a timeout); a checkpoint is replaced atomically, so a kill
never leaves half of one.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from repro.contract import EXIT_OK, EXIT_PREEMPTED, STOP_SIGNALS

FAILURE_GRACE_S = 30.0  # after a rank failed, how long the others may take to end by themselves
POLL_S = 0.1  # how often the ranks are looked at
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for the child when its parent dies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environments(nproc: int, environ: dict[str, str]) -> list[dict[str, str]]:
    """What each rank reads in init_processes (repro/distributed.py), as torchrun --standalone sets it.
    The CPU threads are shared among the ranks unless OMP_NUM_THREADS is given."""
    port = str(free_port())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = environ.get("OMP_NUM_THREADS") or str(max(1, cores // nproc))
    return [{**environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
             "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
             "OMP_NUM_THREADS": threads} for rank in range(nproc)]


def _prepare_rank() -> None:
    """In each rank before it runs. SIGINT ignored: a Ctrl-C in the terminal reaches the launcher's
    whole process group, and the launcher asks every rank to stop rather than interrupt it. SIGTERM
    when the launcher dies (SIGKILL'ed, say), so that no rank trains on alone: a stop, which
    checkpoints."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def exit_code(returncode: int) -> int:
    """A Popen returncode as a shell reports it: -N (killed by signal N) is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def launch(command: list[str], nproc: int, environ: dict[str, str] | None = None) -> int:
    """Run `command` as `nproc` ranks and return their exit code: 0 when all finished, 75 when they
    stopped after a checkpoint, else the first failure's (a rank killed by signal N: 128 + N)."""
    ranks: list[subprocess.Popen] = []
    received: list[int] = []

    def pass_on(signum: int) -> None:
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    def forward(signum: int, frame) -> None:
        received.append(signum)
        pass_on(signum)

    handled = (*STOP_SIGNALS, signal.SIGINT)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        for env in rank_environments(nproc, dict(os.environ if environ is None else environ)):
            ranks.append(subprocess.Popen(command, env=env, preexec_fn=_prepare_rank))
        for signum in set(received):  # a stop that came while the ranks were starting reaches them all
            pass_on(signum)
        return _wait(ranks)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(ranks: list[subprocess.Popen]) -> int:
    failure, failed_at = None, None
    while None in [process.poll() for process in ranks]:  # every rank's code, not up to the first running
        if failure is None:
            failure = next((p.returncode for p in ranks if p.returncode not in (None, EXIT_OK, EXIT_PREEMPTED)), None)
            failed_at = time.monotonic() if failure is not None else None
        elif time.monotonic() - failed_at > FAILURE_GRACE_S:
            for process in ranks:
                if process.poll() is None:
                    process.kill()  # its data-loader workers end with it
                    process.wait()
            break
        time.sleep(POLL_S)
    codes = [process.returncode for process in ranks]
    if failure is None:
        failure = next((code for code in codes if code not in (EXIT_OK, EXIT_PREEMPTED)), None)
    if failure is not None:
        return exit_code(failure)
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.suite.launch",
                                     description="Run `python -m repro ARGS` as N ranks on this machine; stop "
                                                 "signals reach every rank, and the ranks' exit code is ours.")
    parser.add_argument("--nproc-per-node", type=int, required=True, metavar="N", help="ranks (one per GPU)")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the arguments of `repro`, after --")
    options = parser.parse_args(argv)
    arguments = options.arguments[1:] if options.arguments[:1] == ["--"] else options.arguments
    if options.nproc_per_node < 1 or not arguments:
        parser.error("expected --nproc-per-node N (N >= 1) and the arguments of `repro` after --")
    return launch([sys.executable, "-m", "repro", *arguments], options.nproc_per_node)


if __name__ == "__main__":
    sys.exit(main())
