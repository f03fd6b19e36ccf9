"""The runs `repro check` plans for, chosen from the suite file as `repro run-all` chooses them, and each
network's size, which the disk estimate and the projected wall times are made from."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from repro.errors import SpecError
from repro.spec import ModelSpec, Spec, load_spec


@dataclass(frozen=True)
class PlannedSpec:
    name: str
    path: Path
    spec: Spec  # as the suite trains it: the spec file without overrides
    runs: int  # seeds

    @property
    def dataset(self) -> str:
        return self.spec.data.dataset


def planned_specs(suite_file: str | Path, only: list[str], extras: bool, seeds: int | None) -> list[PlannedSpec]:
    """The specs of the suite's figures and tables (and extras), filtered by --only, each with its
    number of seeds: --seeds, else the suite file's count for its dataset."""
    from repro.suite.plan import read_suite, select_names, spec_index

    suite = read_suite(suite_file)
    index = spec_index(suite.path.parent)
    planned = []
    for name in select_names(suite, only, extras):
        if name not in index:
            raise SpecError(f"{suite.path} names the spec {name!r}, but no {suite.path.parent}/*/*.yaml has "
                            f"`name: {name}`")
        spec = load_spec(index[name])
        planned.append(PlannedSpec(name, index[name], spec, seeds or suite.seed_count(spec.data.dataset)))
    return planned


@dataclass(frozen=True)
class NetworkSize:
    parameters: int
    multiply_adds: int  # per image: the convolutions and fully connected layers (the paper's FLOPs)


@functools.lru_cache(maxsize=None)
def network_size(model: ModelSpec) -> NetworkSize:
    """Counted on the meta device, which tracks shapes and computes nothing: ResNet-1202 takes seconds
    where fvcore's trace of it takes a minute on 2 cores. The counts equal fvcore's
    (results/tables/complexity.csv); torch counts a multiply-add as two flops."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from repro.data.cifar import SIZE
    from repro.data.imagenet import CROP

    side = SIZE if model.arch == "cifar" else CROP
    with torch.device("meta"):
        network = model.build().eval()  # BN's inference form: the meta device runs it fastest, same convs
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(torch.zeros(1, 3, side, side))
    return NetworkSize(sum(p.numel() for p in network.parameters()), counter.get_total_flops() // 2)
