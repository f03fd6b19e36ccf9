"""`repro run-all` (what `./run_all.sh` runs): every run of the paper's suite, then its figures and tables.

plan.py reads the suite file and plans the runs; a backend runs the plan: local.py on this machine,
slurm.py as Slurm jobs. A backend is a module with MODE (the help of its flag), add_arguments(parser),
check(options) (what the machine lacks, said before anything about the data) and run(plan, options)
-> exit code; it is chosen by its flag, `--<name>` in BACKENDS. The backends import plan.py, and
nothing imports this module but the CLI.
"""
from __future__ import annotations

import argparse

from repro.errors import ReproError
from repro.suite import local, slurm
from repro.suite.plan import add_arguments as add_plan_arguments, make_plan

BACKENDS = {"local": local, "slurm": slurm}
DEFAULT_BACKEND = "local"  # without a backend's flag, --smoke runs on this machine's CPU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train every run of the paper's suite (finished runs are skipped, unfinished ones "
                          "resume), then write its figures and tables.")
    mode = parser.add_argument_group("mode (default: --smoke)")
    mode.add_argument("--smoke", action="store_true",
                      help="the suite shrunk by the suite file's `smoke` section, on the CPU and generated "
                           "data, into results/smoke (with --slurm: as Slurm jobs)")
    for name, backend in BACKENDS.items():
        mode.add_argument(f"--{name}", action="store_true", help=backend.MODE)
    add_plan_arguments(parser)
    for backend in BACKENDS.values():
        backend.add_arguments(parser)


def run_all(options: argparse.Namespace) -> int:
    """`repro run-all`; returns the exit code: 0 all done (or submitted), 1 something failed, 75 something
    is left to do (run the same command again)."""
    chosen = [name for name in BACKENDS if getattr(options, name)]
    if len(chosen) > 1:
        raise ReproError(f"{' and '.join(f'--{name}' for name in chosen)} exclude each other: choose one")
    options.smoke = options.smoke or not chosen
    backend = BACKENDS[chosen[0] if chosen else DEFAULT_BACKEND]
    backend.check(options)
    return backend.run(make_plan(options), options)
