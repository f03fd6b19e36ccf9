"""Speed switches resolved from the hardware (issue 14): fp32 unless bf16 is asked for, a warning
when bf16 has no native kernels, channels_last where it measured no slower, explicit values win."""
import warnings

import pytest
import torch

from repro.errors import ReproError
from repro.hardware import Capabilities, probe, resolve_switches
from repro.spec import RunSpec

AVX2 = Capabilities("cpu", "AMD EPYC", "AVX2", native_bf16=False)
NO_AVX2 = Capabilities("cpu", "Intel Atom", "DEFAULT", native_bf16=False)
AVX512_BF16 = Capabilities("cpu", "Intel Xeon Platinum 8480+", "AVX512", native_bf16=True)
H100 = Capabilities("cuda", "NVIDIA H100 80GB HBM3", "AVX512", native_bf16=True)


def resolve(capabilities, dataset="cifar10", **run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        switches = resolve_switches(RunSpec(**run), capabilities, dataset)
    return switches, [str(w.message) for w in caught]


@pytest.mark.parametrize("capabilities", [AVX2, AVX512_BF16, H100], ids=["avx2", "avx512", "cuda"])
def test_the_default_precision_is_fp32_everywhere(capabilities):
    assert resolve(capabilities)[0].precision == "fp32"


def test_channels_last_follows_the_layout_probe():
    assert resolve(AVX2)[0].channels_last is True  # measured 1.18-1.46x on an AVX2 EPYC
    assert resolve(AVX512_BF16)[0].channels_last is True
    assert resolve(NO_AVX2)[0].channels_last is False
    assert resolve(H100)[0].channels_last is True


def test_an_explicit_value_wins_over_the_probe():
    assert resolve(NO_AVX2, channels_last=True)[0].channels_last is True
    assert resolve(AVX2, channels_last=False)[0].channels_last is False
    assert resolve(H100, channels_last=False)[0].channels_last is False
    assert resolve(H100, cuda_graphs=False)[0].cuda_graphs is False


def test_bf16_without_native_kernels_warns_once_with_the_reason_and_is_obeyed():
    switches, messages = resolve(AVX2, precision="bf16")
    assert switches.precision == "bf16"
    assert len(messages) == 1 and "no native bf16 kernels" in messages[0] and "AMD EPYC" in messages[0]
    switches, messages = resolve(AVX512_BF16, precision="bf16")
    assert switches.precision == "bf16" and messages == []


def test_cuda_only_switches_stay_off_on_a_cpu_and_graphs_need_device_resident_cifar():
    cpu = resolve(AVX2, compile=True, cuda_graphs=True)[0]
    assert not cpu.compile and not cpu.cuda_graphs
    gpu = resolve(H100)[0]
    assert gpu.cuda_graphs and not gpu.compile  # graphs remove the launch cost; compile+graphs not measured
    assert not resolve(H100, data_on_device=False)[0].cuda_graphs
    imagenet = resolve(H100, dataset="imagenet")[0]
    assert imagenet.compile and not imagenet.cuda_graphs and not imagenet.data_on_device


@pytest.mark.parametrize("dataset, distributed", [("imagenet", False), ("cifar10", True)], ids=["imagenet", "ddp"])
def test_explicit_cuda_graphs_are_refused_where_the_graphed_step_does_not_apply(dataset, distributed):
    with pytest.raises(ReproError, match="run.cuda_graphs=true") as refused:
        resolve_switches(RunSpec(cuda_graphs=True), H100, dataset, distributed)
    assert "\n" not in str(refused.value)
    assert not resolve_switches(RunSpec(), H100, dataset, distributed).cuda_graphs  # auto: simply off


def test_the_old_bf16_key_names_its_replacement():
    with pytest.raises(ValueError, match="run.precision"):
        RunSpec(bf16=True)


def test_the_probe_reads_this_machine():
    here = probe(torch.device("cpu"))
    assert here.device_type == "cpu" and here.name and here.cpu_capability
    assert here.native_bf16 == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_a_gpu_that_emulates_bf16_has_no_native_bf16(monkeypatch):
    """Issue 18: is_bf16_supported() counts emulation, which pre-Ampere GPUs (a V100, a T4) have."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert probe(torch.device("cuda", 0)).native_bf16 is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="probing a GPU needs a CUDA GPU")
def test_the_probe_reads_native_bf16_from_the_gpus_architecture():
    assert probe(torch.device("cuda", 0)).native_bf16 == (torch.cuda.get_device_capability(0) >= (8, 0))
