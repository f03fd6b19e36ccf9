"""`repro check`'s all_reduce over every visible GPU (NCCL), or over two CPU processes (gloo) where
there is none, started by the launcher a multi-GPU run uses (repro/suite/launch.py).

`python -m repro.check.collective` is one rank: it joins the group as a trainer does
(repro/distributed.py), sums rank + 1 over all ranks on its device, and exits 0 when every element
of the sum is right, 1 otherwise.
"""
from __future__ import annotations

import sys

from repro.check.items import Item, fail, note, ok

CPU_RANKS = 2  # gloo on a machine without GPUs: the code path of a multi-GPU run, cheaply
ELEMENTS = 2 ** 20  # 4 MiB of fp32: large enough for NCCL to use its real ring, not its short-message path


def all_reduce() -> Item:
    import torch

    from repro.suite.launch import launch

    gpus = torch.cuda.device_count()
    ranks, over = (gpus, f"{gpus} GPUs (nccl)") if gpus else (CPU_RANKS, f"{CPU_RANKS} CPU processes (gloo)")
    if gpus == 1:
        return note("devices", "all_reduce", "one GPU visible: no collective to check")
    code = launch([sys.executable, "-m", "repro.check.collective"], ranks)
    if code:
        return fail("devices", "all_reduce", f"an all_reduce over {over} failed (exit code {code}); its output is "
                                             "above the table",
                    "check the GPUs' interconnect and NCCL (NCCL_DEBUG=INFO python -m repro.check.collective "
                    "under the launcher shows where it stops)")
    return ok("devices", "all_reduce", f"over {over}: the sum is right on every rank")


def main() -> int:
    import torch
    import torch.distributed as dist

    from repro.distributed import close_processes, init_processes, launched_processes

    processes = launched_processes()
    device = torch.device("cuda", processes.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group, as the trainer does (init_processes)
    processes = init_processes(processes, device)
    values = torch.full((ELEMENTS,), float(processes.rank + 1), device=device)
    dist.all_reduce(values)
    expected = processes.world_size * (processes.world_size + 1) / 2
    right = bool((values == expected).all())
    if not right:
        print(f"rank {processes.rank}: all_reduce gave {values[:4].tolist()}..., expected {expected}", flush=True)
    close_processes(processes)
    return 0 if right else 1


if __name__ == "__main__":
    sys.exit(main())
