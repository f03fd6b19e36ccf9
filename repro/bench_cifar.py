"""Training speed of the CIFAR recipe under each speed switch, against fp32 eager, on this machine.

Each candidate is a real Trainer (the engine's own step, augmentation and data path) on a generated
dataset. Candidates are timed in interleaved rounds in one process, so that a slow moment of the
machine hits all of them alike; the median round counts. The table also says which choice `auto`
makes here (repro/hardware.py), so that a default can be checked against the measurement.
"""
from __future__ import annotations

import math
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
from repro.hardware import Switches, probe, resolve_switches, set_backends
from repro.run_folder import RunFolder
from repro.spec import RunSpec, load_spec

DEFAULT_SPECS = [f"experiments/cifar10/resnet{depth}.yaml" for depth in (20, 56, 110)]
BF16_SPECS = [f"experiments/cifar10/resnet{depth}.yaml" for depth in (110, 1202)]
BASELINE = Switches(precision="fp32", channels_last=False, compile=False, cuda_graphs=False, data_on_device=True)


def candidates(cuda: bool) -> dict[str, Switches]:
    """fp32 eager, each switch alone, and the combinations worth knowing; CUDA-only ones on CUDA."""
    changes = {"eager_fp32": {}, "channels_last": {"channels_last": True}, "bf16": {"precision": "bf16"},
               "channels_last+bf16": {"channels_last": True, "precision": "bf16"}}
    if cuda:
        tuned = {"channels_last": True, "cudnn_benchmark": True}
        changes.update({"compile": {"compile": True}, "cuda_graphs": {"cuda_graphs": True},
                        "cudnn_benchmark": {"cudnn_benchmark": True},
                        # what run.deterministic costs (repro/hardware.py set_backends)
                        "deterministic": {"deterministic": True},
                        "channels_last+cuda_graphs+cudnn_benchmark": {**tuned, "cuda_graphs": True},
                        "channels_last+compile+cuda_graphs+cudnn_benchmark": {**tuned, "compile": True,
                                                                              "cuda_graphs": True}})
    return {name: replace(BASELINE, **change) for name, change in changes.items()}


def _trainers(spec_paths: list[str], named: dict[str, Switches], data: Path, scratch: Path, batch_size: int,
              device: torch.device) -> list[tuple[str, str, Switches, Trainer]]:
    """A real Trainer per (spec, candidate) on the generated data in `data`."""
    trainers = []
    for path in spec_paths:
        for name, switches in named.items():
            spec = load_spec(path, {"data": {"root": str(data), "verify_checksums": False},
                                    "optim": {"batch_size": batch_size}, "run": {"device": str(device)}})
            if spec.data.dataset != "cifar10":
                raise ReproError(f"--specs: {path} is not a CIFAR spec (it trains on {spec.data.dataset}); "
                                 "`repro bench imagenet-data` measures ImageNet's data loading")
            folder = RunFolder(Path(scratch) / spec.name / name)
            set_backends(switches)  # compilation and graph capture happen under the flags they run with
            trainers.append((spec.name, name, switches, Trainer(spec, folder, None, Processes(), device, switches)))
    return trainers


def _run_steps(trainer: Trainer, count: int, lr: float = 0.1) -> float:
    """Seconds for `count` training steps under the trainer's own numerics flags."""
    set_backends(trainer.switches)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    batches = trainer.pipeline.train_batches(0)
    sync()
    start = time.perf_counter()
    for _, (x, y) in zip(range(count), batches):
        trainer.step(x, y, lr)
    sync()
    return time.perf_counter() - start


def _choose(named: dict[str, Switches], only: list[str] | None, device: torch.device) -> dict[str, Switches]:
    if not only:
        return named
    unknown = sorted(set(only) - set(named))
    if unknown:
        raise ReproError(f"--switches: {', '.join(unknown)} is not a candidate on {device.type}; the candidates "
                         f"here are {', '.join(named)}")
    return {name: switches for name, switches in named.items() if name in only or name == "eager_fp32"}


def bench_cifar(spec_paths: list[str], device: str = "auto", batch_size: int = 128, warmup_steps: int = 5,
                steps: int = 20, rounds: int = 5, only: list[str] | None = None) -> pd.DataFrame:
    """Training images/s of each (spec, switches) candidate, after `warmup_steps` (their seconds, which
    hold compilation and graph capture, are reported apart), as the median of `rounds` interleaved
    rounds of `steps` iterations."""
    device = resolve_device(device, 0)
    capabilities = probe(device)
    auto = resolve_switches(RunSpec(), capabilities, "cifar10")
    named = _choose(candidates(device.type == "cuda"), only, device)
    with tempfile.TemporaryDirectory() as scratch:
        data = write_cifar10(Path(scratch) / "data", n_train=batch_size * (warmup_steps + steps), n_test=100)
        trainers = _trainers(spec_paths, named, data, Path(scratch), batch_size, device)
        warmup = {id(trainer): _run_steps(trainer, warmup_steps) for *_, trainer in trainers}
        seconds = {id(trainer): [] for *_, trainer in trainers}
        for _ in range(rounds):
            for *_, trainer in trainers:
                seconds[id(trainer)].append(_run_steps(trainer, steps))
        set_backends(auto)

    rows = []
    for spec_name, name, switches, trainer in trainers:
        median = statistics.median(seconds[id(trainer)])
        rows.append({"spec": spec_name, "switches": name, **switches.as_dict(),
                     "images_per_second": batch_size * steps / median,
                     "seconds_per_64k_iterations": median / steps * 64_000,
                     "warmup_seconds": warmup[id(trainer)],
                     "auto_choice": _matches(switches, auto),
                     "device_type": device.type,
                     "device": capabilities.name,
                     "cpu_capability": capabilities.cpu_capability, "native_bf16": capabilities.native_bf16,
                     "threads": torch.get_num_threads(), "batch_size": batch_size, "steps": steps, "rounds": rounds})
    frame = pd.DataFrame(rows)
    baseline = frame[frame.switches == "eager_fp32"].set_index("spec").images_per_second
    frame["speedup_vs_eager_fp32"] = frame.images_per_second / frame.spec.map(baseline)
    return frame


def bench_shared(spec_path: str, counts: list[int], device: str = "auto", batch_size: int = 128,
                 warmup_steps: int = 5, steps: int = 20) -> pd.DataFrame:
    """Aggregate training images/s of `count` runs at once on one device (as `repro run-all --per-gpu`
    packs small runs), for each count: each a process with its own Trainer under the switches `auto`
    resolves, timed together after every one has warmed up."""
    context = torch.multiprocessing.get_context("spawn")  # CUDA cannot be forked
    rows = []
    for count in counts:
        barrier, queue = context.Barrier(count), context.Queue()
        workers = [context.Process(target=_shared_worker, args=(spec_path, device, batch_size, warmup_steps, steps,
                                                                barrier, queue)) for _ in range(count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if any(worker.exitcode for worker in workers):
            raise ReproError(f"bench cifar --processes {count}: a process failed (exit codes "
                             f"{[worker.exitcode for worker in workers]})")
        spans = [queue.get() for _ in workers]
        seconds = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
        rows.append({"spec": spans[0][2]["spec"], "processes": count, "switches": spans[0][2]["switches"],
                     "images_per_second": count * batch_size * steps / seconds,
                     "images_per_second_per_process": batch_size * steps / seconds,
                     "device_type": spans[0][2]["device_type"], "device": spans[0][2]["device"],
                     "batch_size": batch_size, "steps": steps})
    frame = pd.DataFrame(rows)
    frame["speedup_vs_one_process"] = frame.images_per_second / frame.images_per_second.iloc[0]
    return frame


def _shared_worker(spec_path: str, device: str, batch_size: int, warmup_steps: int, steps: int, barrier,
                   queue) -> None:
    device = resolve_device(device, 0)
    capabilities = probe(device)
    auto = resolve_switches(RunSpec(), capabilities, "cifar10")
    with tempfile.TemporaryDirectory() as scratch:
        data = write_cifar10(Path(scratch) / "data", n_train=batch_size * (warmup_steps + steps), n_test=100)
        ((spec_name, _, _, trainer),) = _trainers([spec_path], {"auto": auto}, data, Path(scratch), batch_size, device)
        _run_steps(trainer, warmup_steps)
        barrier.wait()
        start = time.monotonic()  # one clock for every process
        _run_steps(trainer, steps)
        queue.put((start, time.monotonic(), {"spec": spec_name, "switches": auto.describe(),
                                             "device_type": device.type, "device": capabilities.name}))


# bf16 "tracks" fp32 when its mean training loss over the last quarter of the iterations is within this
# fraction of fp32's (a screening rule for an opt-in, not a claim about final accuracy)
BF16_TOLERANCE = 0.03


def precision_curves(spec_paths: list[str], device: str = "auto", batch_size: int = 128,
                     iterations: int = 300) -> pd.DataFrame:
    """The training loss of each of the first `iterations` steps of each spec in fp32 and in bf16 (the
    other switches as `auto` resolves them), from the same initialisation and the same batches."""
    device = resolve_device(device, 0)
    capabilities = probe(device)
    auto = resolve_switches(RunSpec(), capabilities, "cifar10")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = write_cifar10(Path(scratch) / "data", n_train=batch_size * min(iterations, 40), n_test=100)
        for path in spec_paths:
            named = {precision: replace(auto, precision=precision) for precision in ("fp32", "bf16")}
            for spec_name, precision, switches, trainer in _trainers([path], named, data, Path(scratch) / "curves",
                                                                     batch_size, device):
                set_backends(switches)
                losses, epoch = [], 0
                while len(losses) < iterations:
                    for x, y in trainer.pipeline.train_batches(epoch):
                        if len(losses) == iterations:
                            break
                        # the warm-up rate of ResNet-110/1202 holds for these first iterations
                        losses.append(trainer.step(x, y, trainer.schedule.at(len(losses)))[0].clone() / len(y))
                    epoch += 1
                rows += [{"spec": spec_name, "precision": precision, "iteration": i + 1, "train_loss": loss,
                          "device_type": device.type, "device": capabilities.name, "batch_size": batch_size}
                         for i, loss in enumerate(torch.stack(losses).tolist())]
        set_backends(auto)
    return pd.DataFrame(rows)


def bf16_verdict(curves: pd.DataFrame) -> str:
    """One line: whether bf16's loss tracks fp32's on every spec of `curves` (BF16_TOLERANCE)."""
    parts, tracks = [], True
    for spec, frame in curves.groupby("spec", sort=False):
        tail = frame[frame.iteration > frame.iteration.max() * 3 / 4].groupby("precision").train_loss.mean()
        change = (tail["bf16"] - tail["fp32"]) / tail["fp32"]
        finite = bool(frame.train_loss.map(math.isfinite).all())
        tracks &= finite and abs(change) <= BF16_TOLERANCE
        parts.append(f"{spec} {change:+.1%}" if finite else f"{spec} not finite")
    iterations = int(curves.iteration.max())
    head = (f"bf16 tracks fp32 within {BF16_TOLERANCE:.0%} over {iterations} iterations" if tracks else
            f"bf16 departs from fp32 by more than {BF16_TOLERANCE:.0%} over {iterations} iterations")
    advice = ("a candidate for a recommended opt-in where bench cifar measures it faster" if tracks
              else "keep fp32")
    return f"{head} (last-quarter mean loss, bf16 vs fp32: {', '.join(parts)}): {advice}"


def plot_precision_curves(curves: pd.DataFrame, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(dict.fromkeys(curves.spec))
    figure, axes = plt.subplots(1, len(specs), figsize=(5 * len(specs), 3.6), squeeze=False)
    for axis, spec in zip(axes[0], specs):
        for precision, color in (("fp32", "tab:blue"), ("bf16", "tab:orange")):
            frame = curves[(curves.spec == spec) & (curves.precision == precision)]
            window = max(1, len(frame) // 20)  # each batch's loss is noisy: its running mean is drawn over it
            axis.plot(frame.iteration, frame.train_loss, color=color, alpha=0.3, linewidth=0.7)
            axis.plot(frame.iteration, frame.train_loss.rolling(window, min_periods=1).mean(), color=color,
                      label=f"{precision} (mean of {window})", linewidth=1.5)
        axis.set(title=spec, xlabel="iteration", ylabel="training loss")
        axis.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _matches(switches: Switches, auto: Switches) -> bool:
    """Whether `auto` (with the paper's fp32) resolves to this candidate on this machine."""
    return switches.as_dict() == {**auto.as_dict(), "data_on_device": True}


def write_bench(frame: pd.DataFrame, out_dir: str | Path, stem: str = "cifar") -> Path:
    """<out_dir>/<stem>_<gpu name>.csv on CUDA, <stem>_cpu.csv on a CPU."""
    cuda = frame.device_type.iloc[0] == "cuda"
    out = Path(out_dir) / (f"{stem}_{frame.device.iloc[0].lower().replace(' ', '_')}.csv" if cuda else f"{stem}_cpu.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.4g")
    return out
