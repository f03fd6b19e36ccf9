"""What this machine can do, and the speed switches a run resolves from it.

A switch that leaves the numbers unchanged (memory layout, compilation, CUDA graphs) is on by
default where it measures faster; one that changes them (bf16) is used only when a spec asks for it.
The choices were measured with `repro bench cifar` (results/bench/): a switch that is 2x faster on
one CPU can be 15x slower on another, so they are decided from the device, never assumed.
"""
from __future__ import annotations

import os
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
    cudnn_benchmark: bool = False  # cuDNN times its algorithms for each new shape and keeps the fastest
    deterministic: bool = False  # run.deterministic: deterministic kernels only (set_backends)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.precision}, {'channels_last' if self.channels_last else 'contiguous'}"
                + "".join(f", {name}" for name in ("compile", "cuda_graphs", "cudnn_benchmark", "deterministic")
                          if getattr(self, name)))


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
        # a run's shapes never change, so cuDNN's timing pays once; its choice may differ between
        # starts, which deterministic mode rules out
        cudnn_benchmark=cuda and not run.deterministic,
        deterministic=run.deterministic,
    )


# TF32 (fp32 range, 10-bit mantissa) inside cuDNN's convolutions on Ampere and newer: PyTorch's own
# default for cuDNN, set here so that no import or earlier setting changes it unseen. Matmuls (only the
# final FC layer) stay in full fp32, also PyTorch's default.
CONV_TF32 = True
MATMUL_PRECISION = "highest"
# cuBLAS's deterministic workspace setting (CUDA's documentation: ":4096:8" or ":16:8")
CUBLAS_WORKSPACE = ":4096:8"


def set_backends(switches: Switches) -> dict:
    """Set torch's process-wide numerics flags for a run, before it builds its network (its first cuDNN or
    cuBLAS call), and return them for env.json. Deterministic mode is what makes a GPU run repeat bit for bit (a rerun, a resume): only
    deterministic kernels (an op that has none raises), cuDNN without autotuning, cuBLAS with fixed
    workspaces. Without it, cuDNN's autotuner and atomics may change the last bits between starts."""
    if switches.deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(switches.deterministic)
    torch.backends.cudnn.deterministic = switches.deterministic
    torch.backends.cudnn.benchmark = switches.cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = CONV_TF32
    torch.set_float32_matmul_precision(MATMUL_PRECISION)
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
