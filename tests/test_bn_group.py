"""`model.bn_group` ("ghost" BN, repro/distributed.py): one process normalising a batch of 256 in groups
of 32 trains the same network as 8 processes of 32 each (gloo on the CPU), to fp32 rounding."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from repro.distributed import GroupBatchNorm2d, Processes, group_batchnorm
from repro.spec import ModelSpec

WORLD, GROUP = 8, 32


def network(processes: Processes) -> nn.Module:
    torch.manual_seed(0)
    return group_batchnorm(ModelSpec(arch="cifar", depth=8).build(), GROUP, processes)  # a tiny ResNet


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * GROUP, 3, 12, 12, generator=generator), torch.randint(0, 10, (WORLD * GROUP,),
                                                                                      generator=generator)


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """(logits, gradients, BN buffers) of one training step's forward and backward."""
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return logits.detach(), grads, buffers


def one_process_of_eight(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = nn.parallel.DistributedDataParallel(network(Processes(rank, rank, WORLD)))  # averages gradients
    x, y = batch()
    logits, grads, buffers = step(model, x[rank * GROUP:(rank + 1) * GROUP], y[rank * GROUP:(rank + 1) * GROUP])
    gathered = [torch.empty_like(logits) for _ in range(WORLD)]
    dist.all_gather(gathered, logits)
    every_buffers = [None] * WORLD
    dist.all_gather_object(every_buffers, {name.removeprefix("module."): b for name, b in buffers.items()})
    if rank == 0:
        grads = {name.removeprefix("module."): g for name, g in grads.items()}
        torch.save({"logits": torch.cat(gathered), "grads": grads, "buffers": every_buffers}, out)
    dist.destroy_process_group()


def test_a_group_normalises_as_bn_over_that_group_alone():
    torch.manual_seed(0)
    ghost = GroupBatchNorm2d(5, 4, Processes())
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 2)
        ghost.bias.uniform_(-1, 1)
    plain = [copy.deepcopy(nn.BatchNorm2d(5)) for _ in range(3)]
    for bn in plain:
        bn.load_state_dict({k: v for k, v in ghost.state_dict().items()})
    x = torch.randn(12, 5, 3, 3) * 3 + 1
    out = ghost(x)
    for i, bn in enumerate(plain):
        torch.testing.assert_close(out[4 * i:4 * (i + 1)], bn(x[4 * i:4 * (i + 1)]))
    torch.testing.assert_close(ghost.running_mean, torch.stack([bn.running_mean for bn in plain]).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack([bn.running_var for bn in plain]).mean(0))
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert ghost(channels_last).is_contiguous(memory_format=torch.channels_last)
    ghost.eval()
    torch.testing.assert_close(ghost(x), nn.functional.batch_norm(x, ghost.running_mean, ghost.running_var,
                                                                  ghost.weight, ghost.bias))


@pytest.mark.slow
def test_one_process_in_groups_of_32_equals_8_gloo_processes_of_32(tmp_path):
    out = tmp_path / "ranks.pt"
    # forked, not spawned: 8 fresh interpreters importing torch would cost most of the test's time
    mp.start_processes(one_process_of_eight, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True,
                       start_method="fork")
    ranks = torch.load(out, weights_only=True)
    logits, grads, buffers = step(network(Processes()), *batch())
    torch.testing.assert_close(logits, ranks["logits"], rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ranks["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    for rank_buffers in ranks["buffers"]:  # every process holds the mean over all groups
        for name, value in buffers.items():
            torch.testing.assert_close(value, rank_buffers[name], rtol=1e-5, atol=1e-7, msg=name)
