"""What this machine can do, and the speed switches a run resolves from it.

A switch that leaves the numbers unchanged (memory layout, compilation, CUDA graphs) is on by
default where it measures faster; one that changes them (bf16) is used only when a spec asks for it.
The choices were measured with `repro bench cifar` (results/bench/): a switch that is 2x faster on
one CPU can be 15x slower on another, so they are decided from the device, never assumed.
"""
from __future__ import annotations

import platform
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from repro.errors import ReproError
from repro.spec import RunSpec


@dataclass(frozen=True)
class Capabilities:
    """The probes the switches are decided from."""

    device_type: str  # cpu or cuda
    name: str  # the GPU's or the CPU's model name
    cpu_capability: str  # the widest vector ISA torch's CPU kernels use: DEFAULT, AVX2, AVX512, ...
    native_bf16: bool  # bf16 convolutions run on native kernels (CUDA: Ampere+; CPU: oneDNN's AVX512-BF16/AMX)


def probe(device: torch.device) -> Capabilities:
    if device.type == "cuda":
        # including_emulation=False: without it, pre-Ampere GPUs, which emulate bf16 slowly, count too
        return Capabilities("cuda", torch.cuda.get_device_name(device), torch.backends.cpu.get_cpu_capability(),
                            torch.cuda.is_bf16_supported(including_emulation=False))
    return Capabilities("cpu", cpu_model(), torch.backends.cpu.get_cpu_capability(),
                        bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Switches:
    """The resolved speed switches of one start of a run (written to env.json and the log)."""

    precision: str
    channels_last: bool
    compile: bool
    cuda_graphs: bool
    data_on_device: bool

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.precision}, {'channels_last' if self.channels_last else 'contiguous'}"
                + "".join(f", {name}" for name in ("compile", "cuda_graphs") if getattr(self, name)))


def channels_last_pays(capabilities: Capabilities) -> bool:
    """NHWC is the layout of cuDNN's tensor-core kernels and of oneDNN's vectorised CPU kernels. On a
    2-core AVX2 AMD EPYC, `repro bench cifar` measured it 1.18x (ResNet-20), 1.46x (ResNet-56) and
    1.32x (ResNet-110) the speed of NCHW (results/bench/cifar_cpu.csv); without AVX2 there is no
    vectorised NHWC kernel to win with, so the CPU keeps NCHW there."""
    return capabilities.device_type == "cuda" or capabilities.cpu_capability.startswith(("AVX2", "AVX512"))


def resolve_switches(run: RunSpec, capabilities: Capabilities, dataset: str, distributed: bool = False) -> Switches:
    """`auto` decided from the hardware; an explicit value always wins (where the device has it)."""
    cuda = capabilities.device_type == "cuda"
    if run.precision == "bf16" and not capabilities.native_bf16:
        warnings.warn(f"run.precision=bf16 on {capabilities.name}, which has no native bf16 kernels: bf16 "
                      "runs through slow fallbacks here (measured 12-17x slower than fp32 on an AVX2 CPU)",
                      stacklevel=2)
    data_on_device = run.data_on_device and dataset == "cifar10"
    if run.cuda_graphs is True and (distributed or dataset != "cifar10"):
        raise ReproError(f"run.cuda_graphs=true graphs the CIFAR step of one process; this run is "
                         f"{'distributed (DDP)' if distributed else dataset}: set run.cuda_graphs=auto or false")
    # One graph replays a CIFAR step's ~470 kernel launches at once; it needs static input buffers (the
    # device-resident data) and one process (DDP's hooks inside a graph are not worth their risk here).
    cuda_graphs = (cuda and data_on_device and not distributed) if run.cuda_graphs == "auto" else (
        run.cuda_graphs and cuda)
    return Switches(
        precision=run.precision,
        channels_last=channels_last_pays(capabilities) if run.channels_last == "auto" else run.channels_last,
        # Inductor on the CPU is not measured here; with graphs, compile + graphs is not measured yet
        compile=(cuda and not cuda_graphs) if run.compile == "auto" else (run.compile and cuda),
        cuda_graphs=cuda_graphs,
        data_on_device=data_on_device,
    )
