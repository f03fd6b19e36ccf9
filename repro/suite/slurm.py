"""The `slurm` backend of `repro run-all`: the suite as Slurm jobs, from job scripts written to
<results>/slurm/.

Each dataset's unfinished runs form one job array whose task i trains line i+1 of a runs list: a
CIFAR-10 run on one GPU, an ImageNet run on `--nodes` x `--gpus-per-node` GPUs, one srun task per GPU
(no torchrun: each trainer takes its rank from SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS).
Every job may be requeued: Slurm sends the batch shell SIGUSR1 120 s before the time limit, and the
shell passes SIGUSR1 on to the trainer or to srun, which hands it to every task unchanged (srun answers
SIGTERM by killing its tasks); `scancel --signal=USR1 <job>` signals the trainers themselves. Each
trainer saves a checkpoint at its next step and exits with 75, and the shell requeues the job, whose
next start resumes the run. A report job waits for all of them (afterany).
The scripts stand alone: `sbatch <results>/slurm/cifar10_array.sh` submits one again.

Every value written into a script or runs list is one line (a newline would end an #SBATCH line, and
with it sbatch's reading of the directives below, and start a shell command) and is quoted.
"""
from __future__ import annotations

import argparse
import getpass
import os
import re
import shlex
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from repro.contract import EXIT_DIVERGED, EXIT_LOCKED, EXIT_OK, EXIT_PREEMPTED
from repro.errors import ReproError
from repro.suite.plan import DATA_FLAGS, PYTHON, REPRO, Plan, Run, at_least, make_missing_data, print_start

MODE = "submit the suite to Slurm (options below)"  # the help of --slurm
ENV_PREFIX = "REPRO_SLURM_"  # every option below also comes from REPRO_SLURM_<OPTION>
SIGNAL_LEAD_S = 120  # seconds before the time limit when a job is told to checkpoint (which takes seconds)
GPUS_PER_NODE = 8  # ImageNet: a common GPU node; 256 images per iteration (Sec. 3.4) are 32 per GPU
CPUS_PER_GPU = 8  # ImageNet: a trainer and its data.workers (8) loaders per GPU; also each CIFAR run's CPUs
ARRAY_NAMES = {"cifar10": "CIFAR-10", "imagenet": "ImageNet"}
TEXT_OPTIONS = ("partition", "account", "qos", "time", "mem")  # the options below that every job gets as given
# What sbatch reads as it is on an #SBATCH line; any other value is quoted.
SBATCH_PLAIN = re.compile(r"[\w@%+=:,./-]+")


def variable(option: str) -> str:
    return ENV_PREFIX + option.upper().replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "--slurm", "Each option also comes from the environment variable named in brackets; the flag wins.")

    def option(flag: str, help: str, **kwargs) -> None:
        name = variable(flag[2:])
        group.add_argument(flag, default=os.environ.get(name), help=f"{help} [${name}]", **kwargs)

    option("--partition", "partition (default: the cluster's default)", metavar="P")
    option("--account", "account to charge", metavar="A")
    option("--qos", "quality of service", metavar="Q")
    option("--time", f"time limit of each job, e.g. 24:00:00 (default: the partition's); {SIGNAL_LEAD_S} s "
                     "before it a run checkpoints and its job requeues itself", metavar="T")
    option("--mem", "memory per node, e.g. 64G (default: the partition's)", metavar="M")
    option("--gpus-per-node", f"GPUs of each ImageNet job per node, and 1 for each CIFAR run; 0 runs on CPUs "
                              f"(default: {GPUS_PER_NODE}, with --smoke 0)", type=at_least(0), metavar="G")
    option("--nodes", "nodes of each ImageNet job (default: 1)", type=at_least(1), metavar="N")
    option("--cpus-per-task", f"CPUs of each CIFAR run and per GPU of an ImageNet job (default: {CPUS_PER_GPU}, "
                              "with --smoke 1)", type=at_least(1), metavar="C")
    group.add_argument("--sbatch-arg", action="append", metavar="ARG",
                       default=shlex.split(os.environ.get(variable("sbatch-args"), "")),
                       help="another sbatch option for every job, e.g. --sbatch-arg=--constraint=a100 "
                            f"(repeatable) [${variable('sbatch-args')}, space-separated]")


def check(options: argparse.Namespace) -> None:
    """What this machine lacks, said before anything about the data."""
    if not options.dry_run:
        check_sbatch()


def one_line(value: str, what: str) -> str:
    """`value`, refused when it holds a control character: it goes on one line of a job script or of a
    runs list (whose fields a tab separates)."""
    control = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise ReproError(f"{what}: {value!r} holds the control character {control!r}; the Slurm job scripts "
                         "take one-line values")
    return value


def sbatch_quote(value: str) -> str:
    """`value` as one argument on an #SBATCH line: sbatch ends an argument at a space and the line at an
    unquoted #, and takes a backslash as an escape."""
    if SBATCH_PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_arg(argument: str) -> str:
    """A --sbatch-arg as a directive: the value of --key=value quoted, any other option as given."""
    key, equals, value = argument.partition("=")
    return f"{key}={sbatch_quote(value)}" if argument.startswith("--") and equals else argument


@dataclass(frozen=True)
class Resources:
    gpus_per_node: int
    nodes: int
    cpus: int  # per CIFAR run, and per rank of an ImageNet job
    common: list[str]  # options every job gets: partition, account, qos, time, mem, --sbatch-arg
    ranks_per_node: int = 1  # an ImageNet job's srun tasks per node: one per GPU, one without GPUs

    @classmethod
    def from_options(cls, options: argparse.Namespace) -> "Resources":
        common = [f"--{key}={sbatch_quote(one_line(value, f'--{key} (or ${variable(key)})'))}"
                  for key in TEXT_OPTIONS if (value := getattr(options, key))]
        common += [sbatch_arg(one_line(argument, f"--sbatch-arg (or ${variable('sbatch-args')})"))
                   for argument in options.sbatch_arg]
        gpus = options.gpus_per_node if options.gpus_per_node is not None else 0 if options.smoke else GPUS_PER_NODE
        cpus = options.cpus_per_task or (1 if options.smoke else CPUS_PER_GPU)
        return cls(gpus, options.nodes or 1, cpus, common, max(gpus, 1))


@dataclass(frozen=True)
class Array:
    """A dataset's unfinished runs as one job array, and the files it is written to."""
    dataset: str
    runs: list[Run]
    script: Path
    runs_list: Path

    @property
    def job_name(self) -> str:
        return f"repro-{self.dataset}"

    @property
    def description(self) -> str:
        return f"{len(self.runs)} {ARRAY_NAMES[self.dataset]} run{'s' * (len(self.runs) > 1)}"


def array_script(array: Array, plan: Plan, resources: Resources) -> str:
    imagenet = array.dataset == "imagenet"
    gpus = resources.gpus_per_node if imagenet else min(resources.gpus_per_node, 1)
    directives = [f"--job-name={array.job_name}", f"--array=0-{len(array.runs) - 1}",
                  f"--nodes={resources.nodes if imagenet else 1}",
                  f"--ntasks-per-node={resources.ranks_per_node if imagenet else 1}", f"--cpus-per-task={resources.cpus}",
                  *([f"--gres=gpu:{gpus}"] if gpus else []),
                  "--requeue", f"--signal=B:USR1@{SIGNAL_LEAD_S}", "--open-mode=append",
                  f"--output={output_pattern(plan, '%x_%A_%a.out')}", *resources.common]
    python = shlex.quote(PYTHON)
    if imagenet:
        launcher = f"""\
# One srun task per GPU, each a trainer that reads its rank in the variables torchrun would set; the
# rendezvous is on the job's first node, on a port of this job's own. A task that ends does not kill
# the others (exit 75 is a stop: the others may still be saving); after {SIGNAL_LEAD_S} s they are killed.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((29500 + SLURM_JOB_ID % 1000))
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}
PASS_ON=USR1  # srun answers SIGTERM by killing its tasks, and hands SIGUSR1 on to them unchanged
TRAIN=(srun --kill-on-bad-exit=0 --wait={SIGNAL_LEAD_S} --cpus-per-task="$SLURM_CPUS_PER_TASK"{f" --gres=gpu:{gpus}" if gpus else ""}
       bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' rank
       {python} -m repro "${{ARGS[@]}}")"""
    else:
        launcher = f"""\
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}
TRAIN=({python} -m repro "${{ARGS[@]}}")"""
    return f"""\
#!/bin/bash
# The suite's unfinished {ARRAY_NAMES[array.dataset]} runs as one job array, written by `repro run-all --slurm`.
# Task i trains line i+1 of {array.runs_list.name}: the run's output file, then the arguments of `repro`
# (tab-separated). Submit again with `sbatch {shlex.quote(str(array.script))}`: finished
# runs end at once, unfinished ones resume.
{_directives(directives)}
set -uo pipefail
RUNS={shlex.quote(str(array.runs_list))}
IFS=$'\\t' read -r -a LINE < <(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$RUNS")
if [ "${{#LINE[@]}}" -lt 2 ]; then echo "no run on line $((SLURM_ARRAY_TASK_ID + 1)) of $RUNS" >&2; exit 2; fi
LOG=${{LINE[0]}}
ARGS=("${{LINE[@]:1}}")
{launcher}
# the exit codes of `repro train` (repro/contract.py)
DIVERGED={EXIT_DIVERGED} LOCKED={EXIT_LOCKED} PREEMPTED={EXIT_PREEMPTED}
{TRAINER_BODY}"""


def output_pattern(plan: Plan, name: str) -> str:
    """--output: the file `name` (a Slurm filename pattern) in <results>/slurm/logs/, whose own %s are
    escaped."""
    return sbatch_quote(str(plan.results / "slurm" / "logs").replace("%", "%%") + os.sep + name)


def runs_list(runs: list[Run], plan: Plan) -> str:
    """One run per line: its output file, then the arguments of `repro`, tab-separated."""
    return "".join("\t".join(one_line(field, f"an argument of {run.label}")
                             for field in [str(run.log), *plan.train_arguments(run)]) + "\n" for run in runs)


# Runs "${TRAIN[@]}" in the background, so that the shell can take signals while it waits. A signal
# is passed on as it came, or as $PASS_ON where set; one that comes before the trainer starts is
# passed on once it has.
TRAINER_BODY = """\
mkdir -p "$(dirname "$LOG")"
RUN="$(basename "$(dirname "$LOG")") $(basename "$LOG" .out)"
say() { echo "$(date '+%F %T.%3N') job $SLURM_JOB_ID, $RUN: $*" | tee -a "$LOG"; }
SIGNAL= TRAINER=
stop() {  # the trainer checkpoints and exits with 75
    SIGNAL=$1
    if [ -n "$TRAINER" ]; then
        say "SIG$1: passed on SIG${PASS_ON:-$1} to the trainer"
        kill -"${PASS_ON:-$1}" "$TRAINER" 2>/dev/null
    fi
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM
say "start $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname): ${TRAIN[*]}"
"${TRAIN[@]}" >>"$LOG" 2>&1 &
TRAINER=$!
if [ -n "$SIGNAL" ]; then stop "$SIGNAL"; fi
while kill -0 "$TRAINER" 2>/dev/null; do wait "$TRAINER"; done  # a signal interrupts `wait`
wait "$TRAINER"; STATUS=$?
say "end: exit code $STATUS${SIGNAL:+ after SIG$SIGNAL}"
# Another process trains this run (a manual run, or an earlier start not yet ended) and this one wrote
# nothing: the run is busy, not failed, and a requeue would only race that process.
if [ "$STATUS" -eq "$LOCKED" ]; then
    say "busy: another process holds the run's lock; this job ends, not requeued"
    exit 0
fi
# Finished (0) and diverged end the job. A checkpointed stop (PREEMPTED, or any end after our USR1:
# the time limit is near) requeues it, and the next start resumes. After a SIGTERM Slurm is ending
# the job itself (scancel, preemption, scontrol requeue) and requeues it when it means to.
if [ "$STATUS" -ne 0 ] && [ "$STATUS" -ne "$DIVERGED" ] && [ "$SIGNAL" != TERM ] && { [ "$STATUS" -eq "$PREEMPTED" ] || [ "$SIGNAL" = USR1 ]; }; then
    say "requeued: the next start resumes from the checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
"""


def report_script(plan: Plan, resources: Resources, path: Path) -> str:
    directives = ["--job-name=repro-report", "--nodes=1", "--ntasks-per-node=1", f"--cpus-per-task={resources.cpus}",
                  f"--output={output_pattern(plan, '%x_%j.out')}", *resources.common,
                  # Table 4's test (run-all --extras) runs the networks: one GPU
                  *(["--gres=gpu:1"] if resources.gpus_per_node and any(n == "table4" for n, _ in
                                                                          plan.report_arguments()) else [])]
    steps = "\n".join(f"step {name} {shlex.join([*REPRO, *arguments])}"
                      for name, arguments in plan.report_arguments())
    return f"""\
#!/bin/bash
# The figures and tables from the run folders, written by `repro run-all --slurm`, which submits it to
# start once every training job has ended. Submit again with: sbatch {shlex.quote(str(path))}
{_directives(directives)}
set -u
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}
say() {{ echo "$(date '+%F %T.%3N') job $SLURM_JOB_ID: $*"; }}
STATUS=0
step() {{ local name=$1; shift; say "$name: $*"; "$@" || {{ say "$name failed: exit code $?"; STATUS=1; }}; }}
say "start on $(hostname)"
{steps}
say "end: exit code $STATUS"
exit "$STATUS"
"""


def _directives(options: list[str]) -> str:
    return "\n".join(f"#SBATCH {option}" for option in options)


def array_files(results: Path, dataset: str) -> tuple[Path, Path]:
    """The job script of a dataset's array and its runs list, in <results>/slurm/ (`repro status` reads them)."""
    folder = results / "slurm"
    return folder / f"{dataset}_array.sh", folder / f"{dataset}_runs.txt"


def arrays(plan: Plan) -> list[Array]:
    return [Array(d, plan.pending(d), *array_files(plan.results, d)) for d in plan.data if plan.pending(d)]


def check_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise ReproError("--slurm needs Slurm's sbatch, which is not on PATH here: run on the cluster's login "
                         "node (or add Slurm's bin folder to PATH); --local and --smoke run on this machine")


def check_no_jobs_queued(plan: Plan) -> None:
    """Refuse to submit while jobs of the same results folder are queued or running: two trainers in one
    run folder would overwrite each other's checkpoints."""
    listing = subprocess.run(["squeue", "--noheader", "--user", getpass.getuser(), "--format=%i %o"],
                             capture_output=True, text=True)
    ours = str(plan.results / "slurm") + os.sep
    queued = [line.split()[0] for line in listing.stdout.splitlines() if ours in line]
    if queued:
        raise ReproError(f"jobs {', '.join(queued)} of {plan.results} are still queued or running; wait until "
                         f"they end (squeue -u $USER), or scancel them, before submitting again")


def sbatch(*arguments: str) -> str:
    result = subprocess.run(["sbatch", "--parsable", *arguments], capture_output=True, text=True)
    if result.returncode:
        raise ReproError(f"`sbatch {shlex.join(arguments)}` failed (exit code {result.returncode}): "
                         f"{result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def run(plan: Plan, options: argparse.Namespace) -> int:
    """Write the job scripts and submit them; with --dry-run, print what would be submitted."""
    for what, path in [("--results", plan.results), ("--suite", plan.suite),
                       *((DATA_FLAGS[dataset], folder) for dataset, folder in plan.data.items())]:
        one_line(str(path), what)
    resources = Resources.from_options(options)
    jobs = [(array, runs_list(array.runs, plan), array_script(array, plan, resources)) for array in arrays(plan)]
    report = plan.results / "slurm" / "report.sh"
    print_start(plan, options.dry_run)
    if options.dry_run:
        for array, _, _ in jobs:
            print(f"# sbatch {array.script}: {array.description}")
            for task, suite_run in enumerate(array.runs):
                print(f"{array.job_name}[{task}] {suite_run.state():7s} {suite_run.label:28s} "
                      f"{shlex.join(REPRO + plan.train_arguments(suite_run))}")
        after = ":".join(f"<{array.job_name}>" for array, _, _ in jobs)
        print(f"# sbatch {f'--dependency=afterany:{after} ' if jobs else ''}{report}")
        for name, arguments in plan.report_arguments():
            print(f"repro-report {name:24s} {shlex.join(REPRO + arguments)}")
        return EXIT_OK
    check_no_jobs_queued(plan)
    make_missing_data(plan)
    logs = plan.results / "slurm" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ids = []
    for array, runs, script in jobs:
        array.runs_list.write_text(runs)
        array.script.write_text(script)
        ids.append(sbatch(str(array.script)))
        print(f"submitted job array {ids[-1]}: {array.description} ({array.script})")
    report.write_text(report_script(plan, resources, report))
    report_id = sbatch(*([f"--dependency=afterany:{':'.join(ids)}"] if ids else []), str(report))
    after = f", once job{'s' * (len(ids) > 1)} {' and '.join(ids)} ended" if ids else ""
    print(f"submitted job {report_id}: the reports{after} ({report})")
    print(f"Slurm's logs are in {logs}, each run's output in {plan.results / 'runs'}/<spec>/seed<K>.out. "
          "Follow the jobs with `squeue -u $USER`; submitting again later resumes whatever did not finish.")
    return EXIT_OK
