"""Training speed of the CIFAR recipe under each speed switch, against fp32 eager, on this machine.

Each candidate is a real Trainer (the engine's own step, augmentation and data path) on a generated
dataset. Candidates are timed in interleaved rounds in one process, so that a slow moment of the
machine hits all of them alike; the median round counts. The table also says which choice `auto`
makes here (repro/hardware.py), so that a default can be checked against the measurement.
"""
from __future__ import annotations

import statistics
from dataclasses import replace
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from repro.data.generated import write_cifar10
from repro.distributed import Processes
from repro.engine import Trainer, resolve_device
from repro.errors import ReproError
from repro.hardware import Switches, probe, resolve_switches
from repro.run_folder import RunFolder
from repro.spec import RunSpec, load_spec

DEFAULT_SPECS = [f"experiments/cifar10/resnet{depth}.yaml" for depth in (20, 56, 110)]
BASELINE = Switches(precision="fp32", channels_last=False, compile=False, cuda_graphs=False, data_on_device=True)


def candidates(cuda: bool) -> dict[str, Switches]:
    """fp32 eager, each switch alone, and the combinations worth knowing; CUDA-only ones on CUDA."""
    changes = {"eager_fp32": {}, "channels_last": {"channels_last": True}, "bf16": {"precision": "bf16"},
               "channels_last+bf16": {"channels_last": True, "precision": "bf16"}}
    if cuda:
        changes.update({"compile": {"compile": True}, "cuda_graphs": {"cuda_graphs": True},
                        "channels_last+cuda_graphs": {"channels_last": True, "cuda_graphs": True},
                        "channels_last+compile+cuda_graphs": {"channels_last": True, "compile": True,
                                                              "cuda_graphs": True}})
    return {name: replace(BASELINE, **change) for name, change in changes.items()}


def bench_cifar(spec_paths: list[str], device: str = "auto", batch_size: int = 128, warmup_steps: int = 5,
                steps: int = 20, rounds: int = 5, only: list[str] | None = None) -> pd.DataFrame:
    """Training images/s of each (spec, switches) candidate, after `warmup_steps`, as the median of
    `rounds` interleaved rounds of `steps` iterations."""
    device = resolve_device(device, 0)
    capabilities = probe(device)
    auto = resolve_switches(RunSpec(), capabilities, "cifar10")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    named = candidates(device.type == "cuda")
    if only:
        unknown = sorted(set(only) - set(named))
        if unknown:
            raise ReproError(f"--switches: {', '.join(unknown)} is not a candidate on {device.type}; the candidates "
                             f"here are {', '.join(named)}")
        named = {name: switches for name, switches in named.items() if name in only or name == "eager_fp32"}
    with tempfile.TemporaryDirectory() as scratch:
        data = write_cifar10(Path(scratch) / "data", n_train=batch_size * (warmup_steps + steps), n_test=100)
        trainers = []
        for path in spec_paths:
            for name, switches in named.items():
                spec = load_spec(path, {"data": {"root": str(data), "verify_checksums": False},
                                        "optim": {"batch_size": batch_size}, "run": {"device": str(device)}})
                if spec.data.dataset != "cifar10":
                    raise ReproError(f"--specs: {path} is not a CIFAR spec (it trains on {spec.data.dataset}); "
                                     "`repro bench imagenet-data` measures ImageNet's data loading")
                folder = RunFolder(Path(scratch) / spec.name / name)
                trainers.append((spec.name, name, switches, Trainer(spec, folder, None, Processes(), device, switches)))

        def run_steps(trainer: Trainer, count: int) -> float:
            batches = trainer.pipeline.train_batches(0)
            sync()
            start = time.perf_counter()
            for _, (x, y) in zip(range(count), batches):
                trainer.step(x, y, 0.1)
            sync()
            return time.perf_counter() - start

        for *_, trainer in trainers:
            run_steps(trainer, warmup_steps)  # compilation, graph capture, autotuning, allocator warm-up
        seconds = {id(trainer): [] for *_, trainer in trainers}
        for _ in range(rounds):
            for *_, trainer in trainers:
                seconds[id(trainer)].append(run_steps(trainer, steps))

    rows = []
    for spec_name, name, switches, trainer in trainers:
        median = statistics.median(seconds[id(trainer)])
        rows.append({"spec": spec_name, "switches": name, **switches.as_dict(),
                     "images_per_second": batch_size * steps / median,
                     "seconds_per_64k_iterations": median / steps * 64_000,
                     "auto_choice": _matches(switches, auto),
                     "device_type": device.type,
                     "device": capabilities.name,
                     "cpu_capability": capabilities.cpu_capability, "native_bf16": capabilities.native_bf16,
                     "threads": torch.get_num_threads(), "batch_size": batch_size, "steps": steps, "rounds": rounds})
    frame = pd.DataFrame(rows)
    baseline = frame[frame.switches == "eager_fp32"].set_index("spec").images_per_second
    frame["speedup_vs_eager_fp32"] = frame.images_per_second / frame.spec.map(baseline)
    return frame


def _matches(switches: Switches, auto: Switches) -> bool:
    """Whether `auto` (with the paper's fp32) resolves to this candidate on this machine."""
    return switches.as_dict() == {**auto.as_dict(), "data_on_device": True}


def write_bench(frame: pd.DataFrame, out_dir: str | Path) -> Path:
    cuda = frame.device_type.iloc[0] == "cuda"
    out = Path(out_dir) / (f"cifar_{frame.device.iloc[0].lower().replace(' ', '_')}.csv" if cuda else "cifar_cpu.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.4g")
    return out
