"""The local one-node Slurm cluster runs what `run_all.sh --slurm` relies on, for real.

Needs root and Debian's slurm-wlm and munge (`sudo .ci/install-slurm.sh`); skipped otherwise.
"""

import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, cluster_unavailable_reason, local_slurm_cluster

pytestmark = pytest.mark.slurm

WAIT_TIMEOUT_S = 60  # generous: Slurm checks time limits (and so sends --signal) every 30 s
# Job states that no longer change (squeue(1), JOB STATE CODES).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def skip_without_slurm() -> None:
    reason = cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def cluster(tmp_path):
    skip_without_slurm()
    with local_slurm_cluster(tmp_path / "cluster") as running:
        yield running


def sbatch(cluster: SlurmCluster, jobs_dir: Path, *options: str, wrap: str) -> str:
    """Submit `wrap` as a batch job running in `jobs_dir`; return its job id."""
    command = ["sbatch", "--parsable", f"--chdir={jobs_dir}", *options, "--wrap", wrap]
    result = subprocess.run(command, env=cluster.env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed: {result.stderr}"
    return result.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def job_fields(cluster: SlurmCluster, job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` as one dict per job (one per task for an array)."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=cluster.env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in result.stdout.splitlines()]


def state_and_reason(cluster: SlurmCluster, job_id: str) -> tuple[str, str]:
    job = job_fields(cluster, job_id)[0]
    return job["JobState"], job["Reason"]


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_TIMEOUT_S} s waiting for {what}")
        time.sleep(0.5)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_for_success(cluster: SlurmCluster, job_id: str) -> None:
    """Wait until the job (every task of an array) has ended, and check that it succeeded."""

    def states() -> list[str]:
        return [job["JobState"] for job in job_fields(cluster, job_id)]

    wait_until(lambda: set(states()) <= FINAL_STATES, f"job {job_id} to end")
    assert set(states()) == {"COMPLETED"}, f"job {job_id}: {states()}"


def test_cluster_runs_jobs_arrays_dependencies_requeues_and_signals(cluster, tmp_path):
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    order = jobs_dir / "order.log"  # each job appends its name when it ends

    # A job asked to stop before its time limit gets SIGUSR1 (sent by Slurm's 30 s time check).
    signalled = sbatch(
        cluster, jobs_dir, "--time=1", "--signal=B:USR1@59", "--output=signalled.out",
        wrap="trap 'echo USR1 >> signals.log; exit 0' USR1; sleep 120 & wait",
    )
    # A requeued job runs again with SLURM_RESTART_COUNT=1; its first run waits to be requeued.
    requeued = sbatch(
        cluster, jobs_dir, "--requeue", "--open-mode=append", "--output=requeued.out",
        wrap='echo "run ${SLURM_RESTART_COUNT:-0}" >> runs.log; [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] || sleep 300',
    )
    # Held until the dependent job is queued, so that it could run first if its dependency were ignored.
    single = sbatch(
        cluster, jobs_dir, "--hold", "--output=single.out",
        wrap='echo "hello from job $SLURM_JOB_ID"; sleep 1; echo single >> order.log',
    )
    array = sbatch(
        cluster, jobs_dir, "--hold", "--array=0-2", "--output=array_%a.out",
        wrap='echo "task $SLURM_ARRAY_TASK_ID"; sleep 1; echo "array $SLURM_ARRAY_TASK_ID" >> order.log',
    )
    dependent = sbatch(
        cluster, jobs_dir, f"--dependency=afterany:{single}:{array}", "--output=dependent.out",
        wrap="echo dependent >> order.log",
    )
    wait_until(
        lambda: state_and_reason(cluster, dependent) == ("PENDING", "Dependency"),
        "the dependent job to be pending with Reason=Dependency",
    )
    subprocess.run(["scontrol", "release", single, array], env=cluster.env, check=True)

    wait_until(lambda: lines(jobs_dir / "runs.log") == ["run 0"], "the first run of the requeue job")
    subprocess.run(["scontrol", "requeue", requeued], env=cluster.env, check=True)
    # Requeued, not held: it waits out AuthInfo's cred_expire, then starts again by itself.
    wait_until(
        lambda: state_and_reason(cluster, requeued) == ("PENDING", "BeginTime"),
        "the requeued job to be pending with Reason=BeginTime (not held)",
    )
    wait_for_success(cluster, requeued)
    assert lines(jobs_dir / "runs.log") == ["run 0", "run 1"]
    assert job_fields(cluster, requeued)[0]["Restarts"] == "1"

    for job in (single, array, dependent):
        wait_for_success(cluster, job)
    assert lines(jobs_dir / "single.out") == [f"hello from job {single}"]
    assert [lines(jobs_dir / f"array_{task}.out") for task in range(3)] == [["task 0"], ["task 1"], ["task 2"]]
    ended = lines(order)
    assert sorted(ended[:-1]) == ["array 0", "array 1", "array 2", "single"] and ended[-1] == "dependent", ended

    wait_for_success(cluster, signalled)
    assert lines(jobs_dir / "signals.log") == ["USR1"]


def test_cluster_starts_again_in_the_same_workdir(tmp_path):
    skip_without_slurm()
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    for attempt in ("first", "second"):
        with local_slurm_cluster(tmp_path / "cluster") as cluster:
            job = sbatch(cluster, jobs_dir, f"--output={attempt}.out", wrap=f"echo {attempt}")
            wait_for_success(cluster, job)
            # Job ids restart at 1: the previous cluster's state was cleared, not recovered.
            assert job == "1"
        assert lines(jobs_dir / f"{attempt}.out") == [attempt]
