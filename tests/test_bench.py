"""The CIFAR speed benchmark runs the engine's own step for every candidate on this device and says
which one `auto` picks (no timing is asserted: speeds are measured by `repro bench`, not by tests)."""
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from repro.bench_cifar import (bench_cifar, bench_shared, bf16_verdict, candidates, plot_precision_curves,
                               precision_curves, write_bench)
from repro.errors import ReproError
from repro.hardware import Capabilities, resolve_switches
from repro.spec import RunSpec

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "cifar10" / "plain20.yaml"
H100 = Capabilities("cuda", "NVIDIA H100 80GB HBM3", "AVX512", native_bf16=True)


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


def test_cuda_candidates_include_the_autotuner_and_the_cost_of_deterministic_mode():
    cuda = candidates(cuda=True)
    assert cuda["cudnn_benchmark"].cudnn_benchmark and not cuda["eager_fp32"].cudnn_benchmark
    assert cuda["deterministic"].deterministic and not cuda["deterministic"].cudnn_benchmark
    # the combination `auto` resolves to on a GPU is among them, so the table can mark it
    assert cuda["channels_last+cuda_graphs+cudnn_benchmark"] == replace(
        resolve_switches(RunSpec(), H100, "cifar10"), data_on_device=True)


def test_bf16_curves_start_from_the_same_network_and_batches_and_the_verdict_reads_them(tmp_path):
    curves = precision_curves([str(SPEC)], device="cpu", batch_size=8, iterations=3)
    assert curves.groupby("precision").iteration.apply(list).to_dict() == {"bf16": [1, 2, 3], "fp32": [1, 2, 3]}
    first = curves[curves.iteration == 1].set_index("precision").train_loss
    assert abs(first["bf16"] - first["fp32"]) < 0.05 * first["fp32"]  # same weights and batch, bf16 rounding
    assert plot_precision_curves(curves, tmp_path / "curves.png").stat().st_size > 0


def test_the_bf16_verdict_compares_the_last_quarter_of_the_curves():
    def curves(bf16_tail):
        rows = [{"spec": "s", "precision": p, "iteration": i, "train_loss": 2.0} for p in ("fp32", "bf16")
                for i in range(1, 9)]
        for row in rows:
            if row["precision"] == "bf16" and row["iteration"] > 6:
                row["train_loss"] = bf16_tail
        return pd.DataFrame(rows)

    assert bf16_verdict(curves(2.02)).startswith("bf16 tracks fp32 within 3% over 8 iterations")
    assert "s +1.0%" in bf16_verdict(curves(2.02))
    assert bf16_verdict(curves(2.2)).startswith("bf16 departs from fp32") and bf16_verdict(curves(2.2)).endswith(
        "keep fp32")
    assert "s not finite" in bf16_verdict(curves(float("nan")))


@pytest.mark.slow
def test_runs_sharing_a_device_are_timed_together_and_summed(tmp_path):
    frame = bench_shared(str(SPEC), [1, 2], device="cpu", batch_size=8, warmup_steps=1, steps=2)
    assert frame.processes.tolist() == [1, 2] and (frame.images_per_second > 0).all()
    assert frame.images_per_second.tolist() == pytest.approx((frame.processes * frame.images_per_second_per_process)
                                                             .tolist())
    assert write_bench(frame, tmp_path, "cifar_shared").name == "cifar_shared_cpu.csv"
