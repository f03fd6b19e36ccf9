"""Training speed of the CIFAR recipe under each combination of speed switches.

Each candidate is a real Trainer (the engine's own step, augmentation and data path) on a generated
dataset. Candidates are timed in interleaved rounds in one process, so that a slow moment of the
machine hits all of them alike; the median round counts.
"""
from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from repro.data.cifar import write_cifar10
from repro.distributed import Processes
from repro.engine import Trainer, resolve_device
from repro.run_folder import RunFolder
from repro.spec import validate

SWITCHES = ("channels_last", "bf16", "compile", "data_on_device")
CPU_SWITCHES = ("channels_last", "bf16")  # compile is CUDA-only here; data is on the CPU anyway


def switch_sets(names: tuple[str, ...]) -> list[dict[str, bool]]:
    """Every on/off combination of the named switches, the other switches off."""
    return [{switch: dict(zip(names, combo)).get(switch, False) for switch in SWITCHES}
            for combo in itertools.product((False, True), repeat=len(names))]


def label(switches: dict[str, bool]) -> str:
    on = [name for name, value in switches.items() if value]
    return "+".join(on) if on else "eager_fp32"


def bench_cifar(models: list[str], switch_names: tuple[str, ...], device: str = "auto", batch_size: int = 128,
                warmup_steps: int = 5, steps: int = 20, rounds: int = 5) -> pd.DataFrame:
    """Training images/s of each (model, switches) candidate, after `warmup_steps`, as the median of
    `rounds` interleaved rounds of `steps` iterations."""
    device = resolve_device(device, 0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as scratch:
        data = write_cifar10(Path(scratch) / "data", n_train=batch_size * (warmup_steps + steps), n_test=100)
        candidates = []
        for model, switches in itertools.product(models, switch_sets(switch_names)):
            depth = int(model.removeprefix("cifar_resnet"))
            spec = validate({"name": "bench", "model": {"depth": depth},
                             "data": {"root": str(data), "verify_checksums": False},
                             "optim": {"batch_size": batch_size},
                             "run": {"device": str(device), "progress": "log", **switches}}, "bench")
            trainer = Trainer(spec, RunFolder(Path(scratch) / label(switches)), None, Processes(), device)
            candidates.append((model, switches, trainer))

        def run_steps(trainer: Trainer, count: int) -> float:
            batches = trainer.pipeline.train_batches(0)
            sync()
            start = time.perf_counter()
            for _, (x, y) in zip(range(count), batches):
                trainer.train_step(x, y)
            sync()
            return time.perf_counter() - start

        for _, _, trainer in candidates:
            run_steps(trainer, warmup_steps)  # compilation, autotuning, allocator warm-up
        seconds = {id(t): [] for _, _, t in candidates}
        for _ in range(rounds):
            for _, _, trainer in candidates:
                seconds[id(trainer)].append(run_steps(trainer, steps))

    rows = []
    for model, switches, trainer in candidates:
        median = statistics.median(seconds[id(trainer)])
        rows.append({"model": model, "switches": label(switches), **switches,
                     "images_per_second": batch_size * steps / median,
                     "seconds_per_64k_iterations": median / steps * 64_000,
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "threads": torch.get_num_threads(), "batch_size": batch_size,
                     "steps": steps, "rounds": rounds})
    frame = pd.DataFrame(rows)
    baseline = frame[frame.switches == "eager_fp32"].set_index("model").images_per_second
    frame["speedup_vs_eager_fp32"] = frame.images_per_second / frame.model.map(baseline)
    return frame


def write_bench(frame: pd.DataFrame, out_dir: str | Path) -> Path:
    device = "cpu" if frame.device.iloc[0] == "cpu" else frame.device.iloc[0].lower().replace(" ", "_")
    out = Path(out_dir) / f"cifar_{device}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.4g")
    return out
