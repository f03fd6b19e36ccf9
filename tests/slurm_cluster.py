"""A real one-node Slurm cluster on this machine, started and stopped by the tests.

It runs its own munged, slurmctld and slurmd (as root, in the foreground, as child processes) with
the configuration, state, spool, logs and pid files under `workdir`, so it needs neither a configured
system Slurm nor a running system munged, and touches neither. It needs Debian's `slurm-wlm` and
`munge` packages (`.ci/install-slurm.sh`) and root.

    reason = cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with local_slurm_cluster(tmp_path) as cluster:
        subprocess.run(["sbatch", "--wrap", "true"], env=cluster.env, check=True)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DAEMONS = ("munged", "slurmctld", "slurmd")  # started in this order, stopped in reverse
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")
PARTITION = "local"  # the cluster's only partition, the default one
START_TIMEOUT_S = 60  # how long the node may take to become idle; it takes a few seconds
STOP_TIMEOUT_S = 15  # how long a daemon or a cancelled job may take to end before it is killed
LOG_TAIL_LINES = 40  # lines of each daemon's log quoted in an error message
# Daemons live in sbin, which a non-login PATH (sudo, CI) often lacks.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
INSTALL_HINT = "install them with `sudo .ci/install-slurm.sh` (Debian's slurm-wlm and munge)"


class SlurmClusterError(RuntimeError):
    """The local cluster could not be started or is unavailable; the message says why."""


@dataclass(frozen=True)
class SlurmCluster:
    """A running local cluster: pass `env` to every Slurm command (it sets SLURM_CONF)."""

    workdir: Path
    env: dict[str, str]
    node: str  # the only node's name
    partition: str  # the only partition, the default one
    cpus: int  # the node's CPUs, all schedulable
    memory_mb: int  # the node's RealMemory in MB (memory is not a tracked resource here)


def cluster_unavailable_reason() -> str | None:
    """Why a local cluster cannot run here (binaries missing, not root), or None if it can."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)} not on PATH): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return (
            f"a local Slurm cluster runs munged, slurmctld and slurmd as root, and this is uid {os.geteuid()}: "
            "run the tests with sudo, or leave them out with -m 'not slurm'"
        )
    return None


@contextlib.contextmanager
def local_slurm_cluster(workdir: str | os.PathLike) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd for one node under `workdir`; stop them all on exit.

    Waits until the node is idle. Raises SlurmClusterError with the daemons' logs if it is not.
    On exit cancels every job, then stops slurmd, slurmctld and munged.
    """
    reason = cluster_unavailable_reason()
    if reason:
        raise SlurmClusterError(reason)
    layout = _Layout(Path(workdir).resolve())
    node = socket.gethostname().split(".")[0]
    hardware = _node_hardware()
    env = _cluster_env(layout.conf)
    processes: dict[str, subprocess.Popen] = {}
    try:
        layout.prepare()
        layout.conf.write_text(_slurm_conf(layout, node, hardware))
        processes["munged"] = layout.start(
            "munged", "--foreground", f"--socket={layout.munge_socket}", f"--key-file={layout.munge_key}",
            f"--pid-file={layout.pid_file('munged')}", f"--seed-file={layout.munge_dir / 'munged.seed'}",
            env=env,
        )
        _wait_for(lambda: layout.munge_socket.exists(), processes, layout, "munged to create its socket")
        processes["slurmctld"] = layout.start("slurmctld", "-D", "-f", str(layout.conf), env=env)
        processes["slurmd"] = layout.start("slurmd", "-D", "-f", str(layout.conf), "-N", node, env=env)
        _wait_for(lambda: _node_state(node, env) == "idle", processes, layout, f"node {node} to be idle in sinfo")
        yield SlurmCluster(
            workdir=layout.workdir, env=env, node=node, partition=PARTITION,
            cpus=int(hardware["CPUs"]), memory_mb=int(hardware["RealMemory"]),
        )
    finally:
        if "slurmctld" in processes:
            _cancel_all_jobs(env)
        for name in reversed(DAEMONS):
            if name in processes:
                _stop(processes[name])
        shutil.rmtree(layout.munge_socket.parent, ignore_errors=True)


class _Layout:
    """Where the cluster's files live under `workdir`, and how a daemon is started there."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.conf = workdir / "slurm.conf"
        self.state_dir = workdir / "state"  # slurmctld's StateSaveLocation
        self.spool_dir = workdir / "spool"  # slurmd's SlurmdSpoolDir
        self.log_dir = workdir / "log"  # one <daemon>.log each: its stdout and stderr
        self.run_dir = workdir / "run"  # one <daemon>.pid each
        self.munge_dir = workdir / "munge"  # munged's key and PRNG seed, private to root
        self.munge_key = self.munge_dir / "munge.key"
        # munged insists that every folder above its socket is searchable by all, which pytest's
        # tmp_path (under a 0700 folder) is not, and Unix socket paths are limited to 107 bytes;
        # so the socket lives in a short folder under /run, named after workdir.
        workdir_hash = hashlib.sha256(str(workdir).encode()).hexdigest()[:12]
        self.munge_socket = Path("/run") / f"repro-munge-{workdir_hash}" / "munge.socket"

    def prepare(self) -> None:
        """Create the folders and a munge key; clear what an earlier cluster here left behind."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in DAEMONS:
            _kill_stale_daemon(self.pid_file(name), name)
        # A fresh cluster each time: old job records would otherwise be recovered and rerun.
        for stale in (self.state_dir, self.spool_dir):
            shutil.rmtree(stale, ignore_errors=True)
        for folder in (self.state_dir, self.spool_dir):
            folder.mkdir()
        self.log_dir.mkdir(exist_ok=True)
        shutil.rmtree(self.munge_socket.parent, ignore_errors=True)
        self.munge_socket.parent.mkdir(mode=0o755)
        self.munge_socket.parent.chmod(0o755)  # whatever the umask
        self.munge_dir.mkdir(mode=0o700, exist_ok=True)
        if not self.munge_key.exists():
            # 1024 random bits, what `mungekey` makes; munged refuses a key others can read.
            fd = os.open(self.munge_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as key:
                key.write(os.urandom(128))

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
        with open(self.log_file(name), "wb") as log:  # this cluster's log only, for error messages
            process = subprocess.Popen(
                [_which(name), *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C meant for pytest must not skip the orderly stop
            )
        self.pid_file(name).write_text(f"{process.pid}\n")
        return process

    def logs(self) -> str:
        """The last lines of every daemon's log, for error messages."""
        parts = []
        for name in DAEMONS:
            path = self.log_file(name)
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if path.exists() else ["(no log)"]
            parts.append(f"--- {path} (last {LOG_TAIL_LINES} lines) ---\n" + "\n".join(lines))
        return "\n".join(parts)


def _slurm_conf(layout: _Layout, node: str, hardware: dict[str, str]) -> str:
    ctld_port, slurmd_port = _free_ports(2)
    node_hardware = " ".join(f"{key}={value}" for key, value in hardware.items())
    return f"""\
# A one-node test cluster written by tests/slurm_cluster.py; everything lives under {layout.workdir}.
ClusterName=repro-test
# This machine is controller and node, reached over loopback whatever its hostname resolves to.
SlurmctldHost={node}(127.0.0.1)
# Free ports picked at start, so a cluster still stopping (or another one) cannot collide.
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
# The daemons run as root (the test runs as root); jobs run as whoever submits them.
SlurmUser=root
SlurmdUser=root
# Our own munged; cred_expire is also how long a requeued job waits before it may start again
# (default 120 s).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={layout.munge_socket},cred_expire=10
# All state, spool and pid files under workdir (the daemons log to stderr, captured in log/).
StateSaveLocation={layout.state_dir}
SlurmdSpoolDir={layout.spool_dir}
SlurmctldPidFile={layout.pid_file('slurmctld')}
SlurmdPidFile={layout.pid_file('slurmd')}
# No cgroups: plain process tracking works in containers and VMs alike.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# No accounting database (slurmdbd): sacct knows nothing; ask squeue/scontrol instead.
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
# No mail is sent (the default MailProg, /bin/mail, is not installed).
MailProg=/bin/true
SwitchType=switch/none
# Schedule single CPUs; memory is not a consumable resource.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start jobs as soon as they are submitted or their dependencies end (defaults: 3 s, 60 s, 30 s).
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
# Finished jobs stay visible to squeue/scontrol for 60 s (default 300); there is no sacct.
MinJobAge=60
# Batch jobs may be requeued unless submitted with --no-requeue.
JobRequeue=1
# A node that went DOWN (e.g. slurmd restarted) returns when its slurmd registers again.
ReturnToService=2
# Seconds between SIGTERM and SIGKILL for cancelled or timed-out jobs (default 30).
KillWait=5
NodeName={node} NodeAddr=127.0.0.1 {node_hardware} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _node_hardware() -> dict[str, str]:
    """This machine's CPUs, sockets, cores, threads and RealMemory as slurmd itself detects them."""
    result = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SlurmClusterError(f"`slurmd -C` failed (exit status {result.returncode}):\n{result.stderr}")
    fields = dict(field.split("=", 1) for field in result.stdout.splitlines()[0].split())
    return {key: value for key, value in fields.items() if key not in ("NodeName", "UpTime")}


def _cluster_env(conf: Path) -> dict[str, str]:
    # Drop the settings of any Slurm job we run inside: sbatch reads SBATCH_* as options.
    inherited = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))}
    return {**inherited, "SLURM_CONF": str(conf)}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_for(ready, processes: dict[str, subprocess.Popen], layout: _Layout, what: str) -> None:
    """Poll `ready()` until true; fail at once, with the logs, if a daemon exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        exited = [f"{name} (exit status {p.returncode})" for name, p in processes.items() if p.poll() is not None]
        if exited:
            raise SlurmClusterError(f"waiting for {what}: {', '.join(exited)} exited\n{layout.logs()}")
        if time.monotonic() > deadline:
            raise SlurmClusterError(f"timed out after {START_TIMEOUT_S} s waiting for {what}\n{layout.logs()}")
        time.sleep(0.2)


def _node_state(node: str, env: dict[str, str]) -> str:
    result = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], env=env, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def _cancel_all_jobs(env: dict[str, str]) -> None:
    """Cancel every job and wait until none is left running, so no job outlives slurmd."""
    subprocess.run(["scancel", f"--partition={PARTITION}"], env=env, capture_output=True)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        result = subprocess.run(["squeue", "-h", "-t", "CONFIGURING,RUNNING,COMPLETING", "-o", "%i"], env=env, capture_output=True, text=True)
        if result.returncode != 0 or not result.stdout.strip():
            return
        time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _kill_stale_daemon(pid_file: Path, name: str) -> None:
    """Stop a daemon that an earlier, interrupted cluster in this workdir left running."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    if pid is not None and _is_running(pid, name):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _is_running(pid, name) and time.monotonic() < deadline:
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)


def _is_running(pid: int, name: str) -> bool:
    """Whether process `pid` is alive (not a zombie) and is the program `name`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # /proc/<pid>/stat is "<pid> (<comm>) <state> ...", comm cut to 15 characters.
    comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return comm == name[:15] and state != "Z"


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)
