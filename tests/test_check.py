"""`repro check` (issue 9): each item's message and fix when something is missing or wrong (data,
checksums, disk, Slurm), the network sizes and the projection the GPU-hours come from, the cleanup
after a failed or interrupted burst, and one real burst end to end on generated data."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from repro.check import burst, data, machine
from repro.check.items import FAIL, NOTE, OK
from repro.check.suite import NetworkSize, PlannedSpec, network_size, planned_specs
from repro.cli import main
from repro.data import cifar
from repro.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "experiments" / "suite.yaml"
REPRO = [sys.executable, "-m", "repro"]


def make_data(*arguments: str) -> None:
    subprocess.run(REPRO + ["make-data", *arguments], check=True, capture_output=True)


@pytest.fixture(scope="module")
def generated_cifar(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cifar")
    make_data("cifar10", "--out", str(out), "--train", "20", "--test", "10")
    return out


def canonical(monkeypatch, root: Path) -> None:
    """Make the generated copy under `root` the canonical one, as far as load_cifar10's md5s go."""
    folder = root / cifar.CIFAR_DIRNAME
    monkeypatch.setattr(cifar, "CHECKSUMS", {name: hashlib.md5((folder / name).read_bytes()).hexdigest()
                                             for name in cifar.CHECKSUMS})


def planned(name: str, runs: int = 1) -> PlannedSpec:
    path = next(ROOT.glob(f"experiments/*/{name.split('_', 1)[1]}.yaml"))
    return PlannedSpec(name, path, load_spec(path), runs)


# --- data -------------------------------------------------------------------------------------------

def test_no_data_folder_says_which_flag_or_variable_to_set():
    for dataset, check in (("cifar10", data.cifar10(None)), ("imagenet", data.imagenet(None)[0])):
        assert check.status == FAIL and check.detail == "no data folder given"
        assert data.DATA_FLAGS[dataset] in check.fix and "REPRO_DATA" in check.fix


def test_a_missing_cifar_folder_fails_naming_the_path_tried(tmp_path):
    check = data.cifar10(tmp_path / "nowhere")
    assert check.status == FAIL
    assert "CIFAR-10 not found" in check.detail and str(tmp_path / "nowhere") in check.detail
    assert "--data-cifar" in check.fix


def test_a_checksum_mismatch_fails_naming_the_file(generated_cifar):
    check = data.cifar10(generated_cifar)  # generated files differ from the canonical download
    assert check.status == FAIL
    assert "data_batch_1" in check.detail and "md5 mismatch" in check.detail
    assert "canonical download" in check.fix


def test_cifar_with_the_canonical_checksums_passes(generated_cifar, monkeypatch):
    canonical(monkeypatch, generated_cifar)
    check = data.cifar10(generated_cifar)
    assert check.status == OK and "the md5 of all 6 files match" in check.detail and "20 training" in check.detail


def test_imagenet_counts_are_compared_with_ilsvrc2012_and_a_broken_file_is_named(tmp_path):
    make_data("imagenet", "--out", str(tmp_path), "--classes", "3", "--train", "2", "--val", "1")
    broken = next((tmp_path / "val").rglob("*.JPEG"))
    broken.write_bytes(b"not a JPEG")
    checks = {check.name: check for check in data.imagenet(tmp_path)}
    assert checks["imagenet classes"].status == FAIL and "3 class folders" in checks["imagenet classes"].detail
    assert checks["imagenet train"].detail == "6 images: 1,281,161 fewer than ILSVRC2012's 1,281,167"
    assert checks["imagenet val"].detail == "3 images: 49,997 fewer than ILSVRC2012's 50,000"
    assert checks["imagenet train decode"].status == OK  # the sample holds every file of so small a set
    assert checks["imagenet val decode"].status == FAIL and str(broken) in checks["imagenet val decode"].detail
    assert all(check.fix for check in checks.values() if check.status == FAIL)


def test_a_missing_imagenet_split_fails_with_the_layout_expected(tmp_path):
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "train" / "n01440764" / "n01440764_1.JPEG").write_bytes(b"")
    [check] = data.imagenet(tmp_path)
    assert check.status == FAIL and "val folder not found" in check.detail and "--data-imagenet" in check.fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU passes this item")
def test_no_gpu_is_a_note_but_fails_with_local():
    [gpu] = [item for item in machine.devices(need_gpu=False) if item.name == "gpu"]
    assert gpu.status == NOTE and gpu.detail.startswith("none: ") and "measures the CPU" in gpu.detail
    [gpu] = [item for item in machine.devices(need_gpu=True) if item.name == "gpu"]
    assert gpu.status == FAIL and gpu.fix.startswith("run on a GPU machine")
    [cpu] = [item for item in machine.devices(need_gpu=True) if item.name == "cpu"]
    assert torch.backends.cpu.get_cpu_capability() in cpu.detail


# --- disk -------------------------------------------------------------------------------------------

def test_too_little_disk_fails_with_the_space_needed(monkeypatch, tmp_path):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2 ** 30, 10 * 2 ** 30 - 2 ** 20, 2 ** 20))
    check = machine.disk(tmp_path / "results", [10_000_000] * 3)
    assert check.status == FAIL
    # 7 checkpoints (2 a run, and one being written) of 10M weights and as many momentum values, in fp32
    assert "0.0 GiB free on" in check.detail and "the 3 runs' checkpoints need 0.55 GiB" in check.detail
    assert check.fix == "free 0.55 GiB there, or pass --results DIR on a larger disk"


def test_the_disk_estimate_is_two_checkpoints_a_run_and_one_being_written(tmp_path):
    check = machine.disk(tmp_path / "not" / "yet", [1_000_000, 2_000_000])
    assert check.status == OK and f"free on {tmp_path}" in check.detail  # the nearest folder that exists
    needed = 2 * machine.checkpoint_bytes(1_000_000) + 3 * machine.checkpoint_bytes(2_000_000)
    assert f"need {needed / 2 ** 30:.2f} GiB" in check.detail
    assert machine.checkpoint_bytes(1_000_000) >= 2 * 4 * 1_000_000  # fp32 weights and momentum at least


# --- Slurm ------------------------------------------------------------------------------------------

def fake_commands(folder: Path, **outputs: str) -> None:
    """Stand-ins that print `outputs[name]` (sinfo's or sacctmgr's answer)."""
    folder.mkdir(exist_ok=True)
    for name, output in outputs.items():
        path = folder / name
        path.write_text(f"#!/bin/sh\nprintf '{output}'\n")
        path.chmod(0o755)


def test_a_missing_sinfo_fails_saying_where_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm command on it
    [check] = machine.slurm("gpu", "lab")
    assert check.status == FAIL and check.name == "sinfo" and "not on PATH" in check.detail
    assert "login node" in check.fix


def test_slurm_partition_and_account(monkeypatch, tmp_path):
    fake_commands(tmp_path / "bin", sinfo="gpu* up\\ncpu down\\n", sbatch="")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    checks = {check.name: check for check in machine.slurm(None, None)}
    assert checks["sinfo"].status == OK and checks["partition"].detail == "gpu (the default) is up"
    assert checks["account"].status == NOTE
    [partition] = [c for c in machine.slurm("a100", None) if c.name == "partition"]
    assert partition.status == FAIL and partition.fix == "pass --partition, one of cpu, gpu"
    [partition] = [c for c in machine.slurm("cpu", None) if c.name == "partition"]
    assert partition.status == FAIL and partition.detail == "cpu is down"
    [account] = [c for c in machine.slurm("gpu", "lab") if c.name == "account"]
    assert account.status == NOTE and "sacctmgr is not on PATH" in account.detail
    fake_commands(tmp_path / "bin", sacctmgr="")  # no association of this user with the account
    [account] = [c for c in machine.slurm("gpu", "lab") if c.name == "account"]
    assert account.status == FAIL and "no association with the account lab" in account.detail
    fake_commands(tmp_path / "bin", sacctmgr="lab\\n")
    [account] = [c for c in machine.slurm("gpu", "lab") if c.name == "account"]
    assert account.status == OK


def test_sinfo_that_cannot_reach_the_controller_fails_with_its_error(monkeypatch, tmp_path):
    (tmp_path / "sinfo").write_text("#!/bin/sh\necho 'sinfo: error: first' >&2\necho 'sinfo: fatal: no controller' >&2\n"
                                    "exit 1\n")
    (tmp_path / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    [check] = machine.slurm(None, None)
    assert check.status == FAIL and check.detail.endswith("failed (exit code 1): sinfo: fatal: no controller")
    assert "scontrol ping" in check.fix


@pytest.mark.slurm
def test_a_real_cluster_answers_with_its_partitions(tmp_path, monkeypatch):
    from slurm_cluster import cluster_unavailable_reason, local_slurm_cluster

    reason = cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with local_slurm_cluster(tmp_path / "cluster") as cluster:
        for key, value in cluster.env.items():
            monkeypatch.setenv(key, value)
        checks = {check.name: check for check in machine.slurm(None, "lab")}
        [wrong] = [check for check in machine.slurm("nope", None) if check.name == "partition"]
    assert checks["sinfo"].status == OK and checks["partition"].detail == f"{cluster.partition} (the default) is up"
    assert checks["account"].status == NOTE  # this cluster has no accounting database to ask
    assert wrong.status == FAIL and wrong.fix == f"pass --partition, one of {cluster.partition}"


def test_run_all_sh_passes_check_and_its_flags_on(tmp_path):
    bin_dir = tmp_path / "bin"  # PATH without Slurm: --slurm must report the missing sinfo
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    env = {**os.environ, "PATH": str(bin_dir), "REPRO_PYTHON": sys.executable}
    result = subprocess.run([shutil.which("bash"), str(ROOT / "run_all.sh"), "--slurm", "--check", "--no-burst",
                             "--only", "cifar_resnet20", "--data-cifar", str(tmp_path / "none"),
                             "--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "sinfo is not on PATH" in result.stdout and "CIFAR-10 not found" in result.stdout
    report = json.loads(next((tmp_path / "out").glob("check-*.json")).read_text())
    assert report["failed"] == 2 and {i["name"] for i in report["items"] if i["status"] == FAIL} == {"sinfo", "cifar10"}


# --- what the projection is made of -----------------------------------------------------------------

def test_network_sizes_equal_fvcores_counts():
    # results/tables/complexity.csv (fvcore): params and multiply-adds of the nets the suite trains
    assert network_size(planned("cifar_resnet20").spec.model) == NetworkSize(269_722, 40_551_040)
    assert network_size(planned("imagenet_resnet34").spec.model) == NetworkSize(21_623_848, 3_644_493_824)


def test_planned_specs_follow_the_suite_and_its_options():
    names = {spec.name: spec.runs for spec in planned_specs(SUITE, ["cifar_resnet1*"], False, None)}
    assert names == {"cifar_resnet110": 5, "cifar_resnet1202": 5}
    assert {spec.runs for spec in planned_specs(SUITE, ["imagenet_*"], True, 2)} == {2}


def test_the_burst_trains_the_smallest_planned_resnet():
    specs = [planned("cifar_plain20"), planned("cifar_resnet56"), planned("cifar_resnet32")]
    assert burst.burst_spec(specs, "cifar10").name == "cifar_resnet32"


def test_projection_scales_the_measured_speed_by_multiply_adds():
    measured = burst.Speed("cifar_resnet20", network_size(planned("cifar_resnet20").spec.model).multiply_adds,
                           images_per_second=1000.0, device="test")
    rows = {row["spec"]: row for row in burst.project([planned("cifar_resnet20", 5), planned("cifar_resnet56", 5)],
                                                      {"cifar10": measured})}
    # 64k iterations of 128 images, plus a forward pass (a third of a step) over the 10k test images
    # after each of the 163.84 epochs
    images = 64_000 * 128 * (1 + 10_000 / 50_000 / 3)
    assert rows["cifar_resnet20"]["hours_per_run"] == pytest.approx(images / 1000 / 3600)
    assert rows["cifar_resnet56"]["hours_per_run"] == pytest.approx(images / 1000 / 3600 * 125_485_696 / 40_551_040)
    assert rows["cifar_resnet56"]["device_hours"] == pytest.approx(5 * rows["cifar_resnet56"]["hours_per_run"])


# --- the bursts: cleanup whatever happens, and one for real ------------------------------------------

def repro_check(tmp_path: Path, *arguments: str) -> int:
    return main(["check", "--suite", str(SUITE), "--only", "cifar_resnet20", "--results", str(tmp_path / "results"),
                 "--out", str(tmp_path / "out"), *arguments])


def test_a_failed_burst_keeps_its_output_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(burst, "REPRO", [sys.executable, "-c", "print('the trainer broke'); raise SystemExit(3)"])
    assert repro_check(tmp_path, "--data-cifar", str(tmp_path / "none")) == 1
    report = json.loads(next((tmp_path / "out").glob("check-*.json")).read_text())
    [failed] = [item for item in report["items"] if item["name"] == "cifar10 burst"]
    assert failed["status"] == FAIL and "exited with 3; its last line: the trainer broke" in failed["detail"]
    kept = Path(failed["fix"].removeprefix("read the whole output in "))
    assert kept.read_text().strip() == "the trainer broke"
    assert list((tmp_path / "results").iterdir()) == []  # the temporary folder is gone
    assert "cleanup" in capsys.readouterr().out


def test_a_stop_signal_during_a_burst_still_removes_its_folder(tmp_path, monkeypatch):
    def stopped(planned, device_type, real_root, scratch, kept_log):
        (scratch / "half-written").write_text("")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not stop the burst")

    monkeypatch.setattr(burst, "run_burst", stopped)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        repro_check(tmp_path, "--data-cifar", str(tmp_path / "none"))
    assert stop.value.code == 128 + signal.SIGTERM
    assert list((tmp_path / "results").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_a_real_burst_on_generated_data_trains_stops_resumes_and_projects(tmp_path, generated_cifar, monkeypatch,
                                                                          capsys):
    canonical(monkeypatch, generated_cifar)  # so that every item passes, and the exit code is 0
    assert repro_check(tmp_path, "--data-cifar", str(generated_cifar)) == 0
    out = capsys.readouterr().out
    report = json.loads(next((tmp_path / "out").glob("check-*.json")).read_text())
    items = {item["name"]: item for item in report["items"]}
    assert items["cifar10 burst"]["status"] == NOTE  # a CPU trains on generated data, and says why
    assert "generated data (a real epoch is 50,000 images" in items["cifar10 burst"]["detail"]
    assert "switches: fp32" in items["cifar10 burst"]["detail"]
    assert items["cifar10 loss"]["status"] == OK and "finite and falling" in items["cifar10 loss"]["detail"]
    assert items["cifar10 resume"]["status"] == OK and items["cleanup"]["status"] == OK
    assert report["failed"] == 0 and report["speeds"]["cifar10"]["images_per_second"] > 0
    [row] = report["projection"]
    assert (row["spec"], row["runs"], row["iterations"]) == ("cifar_resnet20", 5, 64_000)
    assert report["device_hours"] == pytest.approx(5 * row["hours_per_run"])
    assert "the whole suite" in out and "cifar10 resume" in out
    assert list((tmp_path / "results").iterdir()) == []  # no run, data or process of the burst is left


def imagenet_check_items(tmp_path: Path) -> dict:
    """`repro check` of ImageNet ResNet-18 on generated data (there is no ImageNet here: exit code 1)."""
    assert main(["check", "--suite", str(SUITE), "--only", "imagenet_resnet18", "--results", str(tmp_path / "results"),
                 "--out", str(tmp_path / "out"), "--data-imagenet", str(tmp_path / "none")]) == 1
    report = json.loads(next((tmp_path / "out").glob("check-*.json")).read_text())
    return {item["name"]: item for item in report["items"]}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's path; GPUs have their own test below")
def test_imagenet_gets_a_two_process_burst_through_the_launcher_and_an_all_reduce(tmp_path, capsys):
    """On the CPU over gloo, what two GPUs would run over NCCL: a SIGTERM to the launcher of
    `run-all --local` stops both ranks with exit 75, and the rerun resumes and finishes."""
    items = imagenet_check_items(tmp_path)
    assert items["all_reduce"]["status"] == OK and "2 CPU processes (gloo)" in items["all_reduce"]["detail"]
    multi = items["imagenet 2-process burst"]
    assert multi["status"] == NOTE and "in 2 processes" in multi["detail"], multi  # generated data, two ranks
    assert items["imagenet 2-process resume"]["status"] == OK, items["imagenet 2-process resume"]
    assert items["imagenet resume"]["status"] == OK and items["cleanup"]["status"] == OK
    assert list((tmp_path / "results").iterdir()) == []


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across GPUs needs two or more GPUs")
def test_on_several_gpus_the_two_process_burst_and_the_all_reduce_run_over_nccl(tmp_path):
    items = imagenet_check_items(tmp_path)
    assert items["all_reduce"]["status"] == OK
    assert f"{torch.cuda.device_count()} GPUs (nccl)" in items["all_reduce"]["detail"]
    assert "in 2 processes" in items["imagenet 2-process burst"]["detail"]
    assert items["imagenet 2-process resume"]["status"] == OK, items["imagenet 2-process resume"]
