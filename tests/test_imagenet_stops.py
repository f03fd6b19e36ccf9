"""A multi-process ImageNet run stopped the ways our users' runs are stopped, and resumed exactly.

- The launcher of `run-all --local` (repro/suite/launch.py): each rank's environment, stop signals
  passed on to every rank and exit code 75 kept however long a rank takes to save, a failed rank's
  peers killed.
- `run-all --local` with two ranks (gloo on the CPU, standing in for two GPUs): SIGTERM to run-all
  reports the run "stopped", exits 75, and the same command resumes it.
- The ImageNet job script on the real one-node Slurm (tests/slurm_cluster.py) as a job of two srun
  tasks: preempted mid-epoch by `scancel --signal=USR1` and by the time-limit warning of `--signal`,
  requeued by itself each time, and resumed.
Both runs end with the metrics.csv of the same run trained without a stop.
"""
import csv
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from repro.contract import EXIT_PREEMPTED
from repro.data.generated import write_imagenet
from repro.data.imagenet import mean_image
from repro.suite import launch, slurm
from repro.suite.plan import PYTHON, make_plan
from repro.suite.run_all import add_arguments as add_run_all_arguments

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
TIME_COLUMNS = {"epoch_seconds", "images_per_second"}  # the only columns a resume may change
# The shipped ResNet-18 spec on 2 classes of 7 generated images: epochs of 7 iterations of 2 images
# (one a rank). Two ranks check for a stop every 10 iterations and at an epoch's end (repro/engine.py),
# so a stop signal in epoch 1 stops at iteration 10 and one in epoch 3 at 20: both mid-epoch.
CLASSES, TRAIN_IMAGES, BATCH = 2, 7, 2
EPOCH_ITERATIONS = CLASSES * TRAIN_IMAGES // BATCH
# No data-loader processes: a rank forking one while gloo's threads run can deadlock in CPython 3.11's
# fork (PyOS_AfterFork_Child waits for a lock another thread held), seen here once in a few runs.
SETTINGS = {"run": {"device": "cpu", "progress": "log"},
            "data": {"workers": 0, "mean_sample_size": 4, "eval_batch_size": 2},
            "optim": {"batch_size": BATCH, "max_iters": 3 * EPOCH_ITERATIONS, "lr_schedule": "milestones",
                      "lr_milestones": [2 * EPOCH_ITERATIONS]}}


def merged(base: dict, changes: dict) -> dict:
    return {key: {**base.get(key, {}), **changes.get(key, {})} if isinstance(base.get(key), dict) else
            changes.get(key, base.get(key)) for key in {*base, *changes}}


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> Path:
    """experiments/ with the shipped ImageNet ResNet-18, shrunk as SETTINGS says, and a suite of it."""
    folder = tmp_path_factory.mktemp("experiments")
    (folder / "imagenet").mkdir()
    base = yaml.safe_load((ROOT / "experiments" / "imagenet" / "base.yaml").read_text())
    (folder / "imagenet" / "base.yaml").write_text(yaml.safe_dump(merged(base, SETTINGS)))
    (folder / "imagenet" / "resnet18.yaml").write_text((ROOT / "experiments" / "imagenet" / "resnet18.yaml").read_text())
    (folder / "suite.yaml").write_text(yaml.safe_dump({"seeds": {"imagenet": 1},
                                                       "tables": {"table2": ["imagenet_resnet18"]}}))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = write_imagenet(tmp_path_factory.mktemp("imagenet"), classes=CLASSES, n_train=TRAIN_IMAGES, n_val=1,
                          short_side=(240, 300))
    # The mean image cached before any run: computing it draws from the global RNG before the network's
    # initialisation, so a first start that computes it initialises otherwise than one that reads it.
    mean_image(root / "train", SETTINGS["data"]["mean_sample_size"], seed=0)
    return root


def train_command(experiments: Path, data: Path, results: Path) -> list[str]:
    return ["train", str(experiments / "imagenet" / "resnet18.yaml"), "--seed", "0", "--data", str(data),
            "--results", str(results)]


@pytest.fixture(scope="module")
def reference(experiments, data, tmp_path_factory) -> list[dict]:
    """The run's rows trained by two ranks without a stop."""
    results = tmp_path_factory.mktemp("reference")
    done = subprocess.run([PYTHON, "-m", "repro.suite.launch", "--nproc-per-node", "2", "--",
                           *train_command(experiments, data, results)],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    return rows(results / "runs" / "imagenet_resnet18" / "seed0")


def rows(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(handle)]


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def wait_until(condition, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def has_rows(folder: Path, count: int) -> bool:
    return len(text(folder / "metrics.csv").splitlines()) > count


def assert_stopped_mid_epoch_and_resumed(log: str, signals: list[int]) -> None:
    stops = [(s, int(i)) for s, i in re.findall(r"stopped by signal (SIG[A-Z0-9]+) at iteration (\d+)", log)]
    assert [s for s, _ in stops] == [signal.Signals(number).name for number in signals], log
    assert all(iteration % EPOCH_ITERATIONS for _, iteration in stops), log
    resumed = [int(i) for i in re.findall(r"resuming imagenet_resnet18 seed 0 at iteration (\d+)", log)]
    assert resumed == [i for _, i in stops], log
    assert "finished" in log.splitlines()[-1], log


# --- the launcher ------------------------------------------------------------------------------------

RANK = """
import os, signal, sys, time
rank = os.environ["RANK"]
def stop(signum, frame):
    time.sleep(float(os.environ.get("SAVE_S", "0")))  # a checkpoint that takes its time
    os.write(1, f"rank {rank} saved after signal {signum}\\n".encode())
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGUSR1, stop)
os.write(1, " ".join([rank] + [os.environ[k] for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")])
         .encode() + b"\\n")  # one write: the ranks share the pipe
if rank == os.environ.get("FAILING_RANK"):
    sys.exit(1)
time.sleep(60)
os.write(1, f"rank {rank} slept\\n".encode())
"""


def start_launcher(ranks: int, new_session: str = "", **environment: str) -> subprocess.Popen:
    code = f"import sys; from repro.suite.launch import launch; sys.exit(launch([sys.executable, '-c', {RANK!r}], {ranks}))"
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **environment},
                            stdout=subprocess.PIPE, text=True, start_new_session=bool(new_session))


def read_lines(process: subprocess.Popen, count: int) -> list[str]:
    return [process.stdout.readline().strip() for _ in range(count)]


def test_each_rank_gets_its_rank_and_the_rendezvous():
    launcher = start_launcher(3)
    started = sorted(read_lines(launcher, 3))
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == EXIT_PREEMPTED
    port = started[0].split()[-1]
    assert started == [f"{rank} {rank} 3 127.0.0.1 {port}" for rank in range(3)]


@pytest.mark.parametrize("sent, received", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGUSR1, signal.SIGUSR1),
                                            (signal.SIGINT, signal.SIGTERM)])
def test_a_stop_reaches_every_rank_and_exit_75_comes_back_however_long_the_save(sent, received):
    # torchrun kills its workers 30 s after a SIGTERM, dies on SIGUSR1, and exits 1 where they exit 75
    launcher = start_launcher(2, SAVE_S="2")
    read_lines(launcher, 2)
    launcher.send_signal(sent)
    output, _ = launcher.communicate(timeout=30)
    assert launcher.returncode == EXIT_PREEMPTED
    assert sorted(output.splitlines()) == [f"rank {rank} saved after signal {int(received)}" for rank in range(2)]


def test_a_ctrl_c_in_the_terminal_stops_the_ranks_instead_of_interrupting_them():
    launcher = start_launcher(2, SAVE_S="1", new_session="1")
    read_lines(launcher, 2)
    os.killpg(launcher.pid, signal.SIGINT)  # what a Ctrl-C does: the whole foreground process group
    output, _ = launcher.communicate(timeout=30)
    assert launcher.returncode == EXIT_PREEMPTED
    assert sorted(output.splitlines()) == [f"rank {rank} saved after signal {int(signal.SIGTERM)}" for rank in range(2)]


def test_a_failed_rank_ends_the_others_and_its_exit_code_is_the_launchers(monkeypatch, capfd):
    monkeypatch.setattr(launch, "FAILURE_GRACE_S", 0.5)
    monkeypatch.setenv("FAILING_RANK", "1")
    assert launch.launch([sys.executable, "-c", RANK], 2) == 1
    output = capfd.readouterr().out
    assert "rank 0 slept" not in output  # killed, not left to wait for the failed rank
    assert "saved" not in output  # nor asked to save: a failed run has nothing coherent to save


# --- run-all --local -----------------------------------------------------------------------------------

# `repro run-all` on a machine with two GPUs: the ranks train on the CPU over gloo (the spec says
# run.device: cpu), as they would on the GPUs over NCCL.
TWO_GPUS = ("import sys; from repro.suite import local; local.local_gpus = lambda requested: [0, 1]; "
            "from repro.cli import main; sys.exit(main())")


@pytest.mark.slow
def test_local_imagenet_run_of_two_ranks_stops_on_sigterm_and_resumes_exactly(experiments, data, reference, tmp_path):
    results = tmp_path / "results"
    command = [PYTHON, "-c", TWO_GPUS, "run-all", "--local", "--suite", str(experiments / "suite.yaml"),
               "--results", str(results), "--data-imagenet", str(data), "--only", "imagenet_resnet18"]
    folder = results / "runs" / "imagenet_resnet18" / "seed0"
    run_all = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: has_rows(folder, 1) or run_all.poll() is not None, "the first epoch")
    run_all.send_signal(signal.SIGTERM)
    output, _ = run_all.communicate(timeout=TIMEOUT_S)
    assert run_all.returncode == EXIT_PREEMPTED, output
    assert re.search(r"stopped\s+imagenet_resnet18 seed 0", output), output
    assert "stopped after a checkpoint: run the same command to resume: 1" in output and "FAILED" not in output, output

    # The same command resumes the run; the reports after it (minutes on 2 cores) are stopped too.
    again = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while not lines or lines[-1] and not re.match(r"(done|stopped|failed)\s+imagenet_resnet18 seed 0", lines[-1]):
        lines.append(again.stdout.readline())  # "" at the end of the output
    again.send_signal(signal.SIGTERM)
    output, _ = again.communicate(timeout=TIMEOUT_S)
    assert lines[-1].startswith("done"), "".join(lines) + output
    log = text(folder / "log.txt")
    assert "starting imagenet_resnet18 seed 0 at iteration 0 on cpu x2" in log, log  # two ranks
    assert_stopped_mid_epoch_and_resumed(log, [signal.SIGTERM])
    assert rows(folder) == reference


# --- Slurm -----------------------------------------------------------------------------------------------



def scontrol(*arguments: str) -> str:
    return subprocess.run(["scontrol", *arguments], check=True, capture_output=True, text=True).stdout


def job_field(job: str, field: str) -> str:
    found = re.search(rf"\b{field}=(\S+)", scontrol("-o", "show", "job", job))
    return found.group(1) if found else ""


def step_pids(job: str) -> list[int]:
    """The processes of the job's srun step (its tasks and their data-loader workers)."""
    listing = scontrol("listpids", job_field(job, "JobId")).splitlines()[1:]  # PID JOBID STEPID LOCALID GLOBALID
    return [int(fields[0]) for fields in map(str.split, listing) if len(fields) > 2 and fields[2] == "0"]


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_imagenet_job_of_two_tasks_is_preempted_both_ways_requeued_and_resumed_exactly(
        cluster, experiments, data, reference, tmp_path):
    parser = __import__("argparse").ArgumentParser()
    add_run_all_arguments(parser)
    options = parser.parse_args(["--slurm", "--suite", str(experiments / "suite.yaml"), "--results",
                                 str(tmp_path / "results"), "--data-imagenet", str(data)])
    plan = make_plan(options)
    [array] = slurm.arrays(plan)
    (array.script.parent / "logs").mkdir(parents=True)
    array.runs_list.write_text(slurm.runs_list(array.runs, plan))
    # two ranks on CPUs: what --gpus-per-node 2 writes, less the GPUs this node lacks
    resources = slurm.Resources(gpus_per_node=0, nodes=1, cpus=1, common=[], ranks_per_node=2)
    array.script.write_text(slurm.array_script(array, plan, resources))
    job = slurm.sbatch(str(array.script)) + "_0"
    [run] = array.runs
    folder = run.folder

    # 1. `scancel --signal=USR1`: Slurm signals the tasks themselves, in epoch 2.
    wait_until(lambda: has_rows(folder, 1), "the first epoch")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_until(lambda: "resuming" in text(folder / "log.txt"), "the requeued job to resume")
    assert job_field(job, "Restarts") == "1"

    # 2. The time-limit warning (--signal=B:USR1@120) to the batch shell, which passes it on through
    # srun. Slurm sends it within 30 s of the limit coming near (its time-limit checks are that far
    # apart): the ranks wait, frozen, for it in epoch 3 (in epoch 2 they would stop at its end, 14).
    wait_until(lambda: has_rows(folder, 2), "the second epoch")
    frozen = step_pids(job)
    assert frozen, scontrol("listpids", job)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    # 3 minutes from this start: the warning is due at 1 minute, and the ranks have 2 to save in
    scontrol("update", f"jobid={job}", "TimeLimit=3")
    wait_until(lambda: "passed on SIGUSR1" in text(run.log), "Slurm's time-limit warning", timeout=120)
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: job_field(job, "Restarts") == "2", "the second requeue")
    scontrol("update", f"jobid={job}", "TimeLimit=10")  # the next start has time to finish
    wait_until(lambda: job_field(job, "JobState") == "COMPLETED", "the job to finish")

    log = text(folder / "log.txt")
    assert_stopped_mid_epoch_and_resumed(log, [signal.SIGUSR1, signal.SIGUSR1])
    job_log = text(run.log)
    assert job_log.count(f"end: exit code {EXIT_PREEMPTED}") == 2 and job_log.count("requeued:") == 2, job_log
    assert "end: exit code 0" in job_log, job_log
    assert rows(folder) == reference
