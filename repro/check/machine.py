"""`repro check`'s probes of the machine: software versions, devices, free disk, and Slurm."""
from __future__ import annotations

import getpass
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

from repro.check.items import Item, fail, note, ok

GIB = 2 ** 30
BYTES_PER_VALUE = 4  # checkpoints hold fp32 tensors, whatever the training precision
CHECKPOINT_EXTRA = 1.05  # ResNet-20's last.pt measured 3.5% above its weights and momentum; larger nets, less
INSTALL_TORCH = "install a CUDA build of torch (https://pytorch.org/get-started/locally/) in this environment"
SLURM_TIMEOUT_S = 30  # a controller that takes longer to answer is itself a problem worth reporting


def software() -> list[Item]:
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return [
        ok("software", "python", platform.python_version()),
        ok("software", "torch", torch.__version__),
        ok("software", "cuda", torch.version.cuda) if torch.version.cuda
        else note("software", "cuda", "none: this torch is a CPU-only build"),
        # torch reports cuDNN 9.1.0 as 90100
        ok("software", "cudnn", f"{cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}") if cudnn
        else note("software", "cudnn", "none"),
    ]


def devices(need_gpu: bool) -> list[Item]:
    """Each GPU (name, memory, bf16) and NCCL; the CPU always, as the data loaders run on it. No GPU
    is a failure only where the suite is to run on this machine's GPUs (`need_gpu`, from --local)."""
    import torch

    from repro.hardware import probe
    from repro.suite.local import usable_cores

    items = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            with torch.cuda.device(index):  # the probe a run resolves its switches from
                bf16 = probe(torch.device("cuda", index)).native_bf16
            items.append(ok("devices", f"gpu {index}", f"{properties.name}, {properties.total_memory / GIB:.1f} GiB, "
                            f"compute capability {properties.major}.{properties.minor}, bf16 "
                            + ("yes" if bf16 else "no (run.precision=bf16 would run in slow fallbacks)")))
        if torch.distributed.is_nccl_available():
            version = ".".join(map(str, torch.cuda.nccl.version()))
            items.append(ok("devices", "nccl", f"NCCL {version} (multi-GPU ImageNet runs)"))
        else:
            items.append(fail("devices", "nccl", "this torch has no NCCL: multi-GPU ImageNet runs cannot start",
                              INSTALL_TORCH))
    else:
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "torch sees no CUDA device (no GPU, or no driver: try nvidia-smi)")
        items.append(fail("devices", "gpu", f"none: {why}", f"run on a GPU machine, or {INSTALL_TORCH}")
                     if need_gpu else note("devices", "gpu", f"none: {why}; this check measures the CPU"))
    cpu = probe(torch.device("cpu"))
    items.append(ok("devices", "cpu", f"{cpu.name}, {usable_cores()} cores, torch CPU capability "
                                      f"{cpu.cpu_capability}, native bf16 {'yes' if cpu.native_bf16 else 'no'}"))
    return items


def checkpoint_bytes(parameters: int) -> int:
    """A checkpoint's size: the weights and SGD's momentum buffer, and what else it holds (BN's
    statistics, the RNG states, the metrics), which CHECKPOINT_EXTRA allows for."""
    return int(2 * parameters * BYTES_PER_VALUE * CHECKPOINT_EXTRA)


def disk(results: Path, parameters_per_run: list[int]) -> Item:
    """Free space where the run folders go, against the checkpoints of every planned run: two each
    (last.pt and prev.pt), and a third of the largest, which a save writes before it replaces one."""
    where = results.absolute()
    while not where.exists():  # the folder is made by the first run; its disk is the nearest existing parent
        where = where.parent
    need = (sum(2 * checkpoint_bytes(p) for p in parameters_per_run)
            + checkpoint_bytes(max(parameters_per_run, default=0)))
    free = shutil.disk_usage(where).free
    found = (f"{free / GIB:.1f} GiB free on {where}; the {len(parameters_per_run)} runs' checkpoints need "
             f"{need / GIB:.2f} GiB")
    if not os.access(where, os.W_OK):
        return fail("disk", "results", f"{where} is not writable ({found})", "pass --results DIR on a writable disk")
    if free < need:
        return fail("disk", "results", found, f"free {(need - free) / GIB:.2f} GiB there, or pass --results DIR on "
                                              "a larger disk")
    return ok("disk", "results", found)


def slurm(partition: str | None, account: str | None) -> list[Item]:
    """sinfo answers; the partition exists; the account exists for this user (when sacctmgr is here)."""
    on_login_node = "run this on the cluster's login node, or put Slurm's bin folder on PATH (e.g. module load slurm)"
    if shutil.which("sinfo") is None:
        return [fail("slurm", "sinfo", "sinfo is not on PATH: Slurm cannot be reached from here", on_login_node)]
    answer = _ask(["sinfo", "--noheader", "--format=%P %a"])
    if isinstance(answer, str):
        return [fail("slurm", "sinfo", answer, "check that slurmctld is up (scontrol ping) and reachable from here")]
    # "%P %a": partition name (the default marked with *) and up/down, one line each
    rows = [line.split() for line in answer if line.strip()]
    states = {name.rstrip("*"): state for name, state in rows}
    default = next((name.rstrip("*") for name, _ in rows if name.endswith("*")), None)
    items = [ok("slurm", "sinfo", f"{len(states)} partitions: {', '.join(sorted(states))}")]
    if shutil.which("sbatch") is None:
        items.append(fail("slurm", "sbatch", "sbatch is not on PATH: the suite cannot be submitted", on_login_node))
    chosen = partition or default
    if chosen is None:
        items.append(fail("slurm", "partition", "none given and the cluster has no default partition",
                          f"pass --partition, one of {', '.join(sorted(states))}"))
    elif chosen not in states:
        items.append(fail("slurm", "partition", f"{chosen} does not exist",
                          f"pass --partition, one of {', '.join(sorted(states))}"))
    elif states[chosen] != "up":
        items.append(fail("slurm", "partition", f"{chosen} is {states[chosen]}",
                          "ask the cluster's admins, or pass another --partition"))
    else:
        items.append(ok("slurm", "partition", f"{chosen}{'' if partition else ' (the default)'} is up"))
    items.append(_account(account))
    return items


def _account(account: str | None) -> Item:
    if account is None:
        return note("slurm", "account", "none given: jobs are charged to your default account")
    if shutil.which("sacctmgr") is None:
        return note("slurm", "account", f"sacctmgr is not on PATH, so {account} cannot be checked here; sbatch "
                                        "refuses an account that does not exist")
    user = getpass.getuser()
    answer = _ask(["sacctmgr", "--noheader", "--parsable2", "show", "associations", f"user={user}",
                   f"account={account}", "format=account"])
    if isinstance(answer, str):
        return note("slurm", "account", f"sacctmgr could not say whether {account} exists: {answer}")
    if not any(line.strip() for line in answer):
        return fail("slurm", "account", f"{user} has no association with the account {account}",
                    f"pass --account, one listed by `sacctmgr show associations user={user} format=account`")
    return ok("slurm", "account", f"{account} ({user} may charge it)")


def _ask(command: list[str]) -> list[str] | str:
    """The command's output lines, or why it gave none."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"`{shlex.join(command)}` gave no answer in {SLURM_TIMEOUT_S} s"
    if result.returncode:
        said = [line.strip() for line in result.stderr.splitlines() if line.strip()][-1:]  # the last is the fatal one
        return f"`{shlex.join(command)}` failed (exit code {result.returncode}){': ' + said[0] if said else ''}"
    return result.stdout.splitlines()
