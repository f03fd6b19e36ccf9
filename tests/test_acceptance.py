"""`repro check --acceptance` on a CPU (issue 22): the GPU-only stages say "skipped: no CUDA", the
others run at a reduced size, the summary is printed and every file lands in one folder named after
the device; a second run replaces the first's files as a set."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def acceptance(tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "run_all.sh"), "--acceptance", "--out", str(tmp_path / "bench"),
                           "--results", str(tmp_path / "results")], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "REPRO_PYTHON": sys.executable})


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's reduced run; a GPU runs the full one")
def test_the_acceptance_command_on_a_cpu_skips_the_gpu_stages_and_runs_the_rest(tmp_path):
    done = acceptance(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (folder,) = (tmp_path / "bench").iterdir()
    slug = folder.name.removeprefix("acceptance-")
    assert slug.startswith("cpu_")
    summary = (folder / f"summary-{slug}.md").read_text()
    assert summary in done.stdout
    lines = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| ")}
    for stage in ("gpu-tests", "cifar-compile", "cifar-deterministic", "cifar-shared"):
        assert "skipped: no CUDA" in lines[stage]
    for stage in ("check", "cifar", "bf16", "imagenet-data"):
        assert f"| {stage} | passed |" in lines[stage], summary
    assert "bf16 tracks fp32" in lines["bf16"] or "bf16 departs from fp32" in lines["bf16"]
    assert "| eager_fp32 " in summary and "| channels_last " in summary  # the speed table
    names = {path.name for path in folder.iterdir()}
    assert {f"{stage}-{slug}{suffix}" for stage, suffix in [
        ("check", ".json"), ("cifar", ".csv"), ("bf16", ".csv"), ("bf16", ".png"), ("imagenet-data", ".csv"),
        ("summary", ".md")]} <= names
    assert all(slug in name for name in names)
    assert list((tmp_path / "results").iterdir()) == []  # the temporary runs are gone


def test_a_rerun_replaces_the_files_as_a_set(tmp_path):
    from repro.check.acceptance import Outcome, Stage, _publish

    first = tmp_path / "first.csv"
    first.write_text("a\n")
    stage = Stage("cifar", 1, ["repro"])
    folder = _publish([Outcome(stage, "passed", files=[first])], "one\n", tmp_path / "bench", "gpu")
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-gpu.csv", "summary-gpu.md"]
    again = _publish([Outcome(Stage("bf16", 1, ["repro"]), "passed", files=[first])], "two\n", tmp_path / "bench",
                     "gpu")
    assert again == folder and sorted(p.name for p in folder.iterdir()) == ["bf16-gpu.csv", "summary-gpu.md"]
    assert (folder / "summary-gpu.md").read_text() == "two\n"
    assert [p.name for p in (tmp_path / "bench").iterdir()] == ["acceptance-gpu"]  # nothing left beside it
