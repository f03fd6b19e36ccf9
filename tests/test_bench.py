"""The CIFAR speed benchmark runs the engine's own step for every candidate on this device and says
which one `auto` picks (no timing is asserted: speeds are measured by `repro bench`, not by tests)."""
from pathlib import Path

import pytest

from repro.bench_cifar import bench_cifar, candidates, write_bench
from repro.errors import ReproError

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "cifar10" / "plain20.yaml"


def test_candidates_are_fp32_eager_and_each_switch_with_cuda_only_ones_on_cuda():
    cpu, cuda = candidates(cuda=False), candidates(cuda=True)
    assert list(cpu) == ["eager_fp32", "channels_last", "bf16", "channels_last+bf16"]
    assert cpu["eager_fp32"].precision == "fp32" and not cpu["eager_fp32"].channels_last
    assert cpu["channels_last+bf16"].precision == "bf16" and cpu["channels_last+bf16"].channels_last
    assert {"compile", "cuda_graphs"} <= set(cuda) and not any(s.cuda_graphs or s.compile for s in cpu.values())


def test_bench_times_a_plain_net_and_marks_the_auto_choice(tmp_path):
    frame = bench_cifar([str(SPEC)], device="cpu", batch_size=16, warmup_steps=1, steps=1, rounds=1,
                        only=["bf16"])
    assert frame.switches.tolist() == ["eager_fp32", "bf16"] and frame.spec.tolist() == ["cifar_plain20"] * 2
    assert (frame.images_per_second > 0).all()
    assert frame.loc[frame.switches == "eager_fp32", "speedup_vs_eager_fp32"].item() == 1.0
    assert frame.auto_choice.sum() <= 1 and not frame.loc[frame.switches == "bf16", "auto_choice"].item()
    path = write_bench(frame, tmp_path)
    assert path.name == "cifar_cpu.csv" and path.read_text().startswith("spec,switches")


def test_an_unknown_or_cuda_only_candidate_on_a_cpu_is_refused_before_any_timing():
    with pytest.raises(ReproError, match="cuda_graphs is not a candidate on cpu.*channels_last"):
        bench_cifar([str(SPEC)], device="cpu", only=["cuda_graphs"])
