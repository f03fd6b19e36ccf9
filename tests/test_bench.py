"""The CIFAR speed benchmark runs the engine's own step for every switch combination (no timing is
asserted: speeds are measured by `repro bench`, not by tests)."""
from repro.bench_cifar import bench_cifar, switch_sets, write_bench


def test_switch_sets_cover_every_combination_of_the_named_switches():
    sets = switch_sets(("channels_last", "bf16"))
    assert len(sets) == 4 and {(s["channels_last"], s["bf16"]) for s in sets} == {(False, False), (False, True),
                                                                                 (True, False), (True, True)}
    assert not any(s["compile"] or s["data_on_device"] for s in sets)


def test_bench_writes_one_row_per_model_and_switch_set(tmp_path):
    frame = bench_cifar(["cifar_resnet8"], ("bf16",), device="cpu", batch_size=16, warmup_steps=1, steps=1, rounds=1)
    assert frame.switches.tolist() == ["eager_fp32", "bf16"]
    assert (frame.images_per_second > 0).all()
    assert frame.loc[frame.switches == "eager_fp32", "speedup_vs_eager_fp32"].item() == 1.0
    path = write_bench(frame, tmp_path)
    assert path.name == "cifar_cpu.csv" and path.read_text().startswith("model,switches")
