"""`repro check --acceptance` (`./run_all.sh --acceptance`): the GPU path proved and timed by one
command, in at most 10 minutes on one H100, its figures written under results/bench/.

A GPU is lent to this project now and then, for minutes. This command is what to run then, with
nothing to decide. Its stages, in this order, each an existing command run as a child process with
a time budget (seconds on one H100; a stage past its budget is stopped and reported, and the next
one starts):

1. the GPU tests (`pytest -m gpu`): every test that skips without CUDA, their pass/fail lines kept;
2. `repro check` on generated data: both bursts, each stopped and resumed on the device, and the
   suite's projected GPU-hours; its ImageNet burst is ResNet-18 trained from JPEGs;
3. `repro bench cifar`: ResNet-20/56/110 at batch 128 under each switch, images/s and minutes per
   64k-iteration run, warm-up (compilation, capture) reported apart; then torch.compile, then
   run.deterministic, each in a stage of its own;
4. `repro bench cifar --processes`: 1, 2 and 4 runs sharing the device, aggregate images/s;
5. `repro bench bf16`: fp32 and bf16 loss curves of ResNet-110 and ResNet-1202, and a verdict;
6. `repro bench imagenet-data`: each decoding path with 1, 4 and 8 workers.
Then a summary table, printed and written as Markdown.

Every file goes to <out>/acceptance-<device>/, named after the device too, replaced as a set when the
command ends: a rerun starts over in a fresh temporary folder and leaves nothing of the last one. On a
machine without CUDA the GPU-only stages say "skipped: no CUDA" and the others run at a reduced size
(CI runs it so: tests/test_acceptance.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from repro.contract import EXIT_FAILED, EXIT_OK, STOP_SIGNALS

TOTAL_BUDGET_S = 600  # the whole command on one H100
CIFAR = [f"experiments/cifar10/resnet{depth}.yaml" for depth in (20, 56, 110)]
# The switches, each against eager fp32, and what `auto` runs on a GPU. Compilation (a minute or more
# per network) and deterministic mode (whose kernels might refuse an op) are stages of their own, so
# that neither can cost the others' figures.
SWITCHES = ["channels_last", "cuda_graphs", "cudnn_benchmark", "bf16", "channels_last+cuda_graphs+cudnn_benchmark"]
TARGETS = {"cifar_resnet56": 3.0, "cifar_resnet110": 6.0}  # minutes per 64k iterations on one H100 (issue 22)


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float  # on one H100
    arguments: list[str] | None  # after `python -m`; None: skipped on this device
    skipped: str = ""


@dataclass
class Outcome:
    stage: Stage
    status: str  # passed, failed, timed out, skipped
    seconds: float = 0.0
    result: str = ""
    files: list[Path] = field(default_factory=list)


def stages(cuda: bool, work: Path) -> list[Stage]:
    """The stages at full size on a GPU, reduced (and without the GPU-only ones) on a CPU."""
    repro = ["repro"]
    no_cuda = "skipped: no CUDA"
    bench = repro + ["bench", "cifar", "--specs", *CIFAR, "--warmup", "5", "--steps", "20", "--rounds", "3"]
    if cuda:
        return [
            Stage("gpu-tests", 90, ["pytest", "-m", "gpu", "-rA", "-q", "-p", "no:cacheprovider", "tests"]),
            Stage("check", 130, repro + ["check", "--data-cifar", str(work / "none"), "--data-imagenet",
                                         str(work / "none"), "--results", str(work / "check-runs")]),
            Stage("cifar", 80, bench + ["--switches", *SWITCHES]),
            Stage("cifar-compile", 80, bench + ["--switches", "compile"]),
            Stage("cifar-deterministic", 30, bench + ["--switches", "deterministic"]),
            Stage("cifar-shared", 40, repro + ["bench", "cifar", "--specs", CIFAR[1], "--processes", "1", "2", "4",
                                               "--warmup", "10", "--steps", "50"]),
            Stage("bf16", 60, repro + ["bench", "bf16", "--steps", "300"]),
            Stage("imagenet-data", 60, repro + ["bench", "imagenet-data", "--workers", "1", "4", "8",
                                                "--steps", "8", "--rounds", "2"]),
        ]
    small = ["--batch-size", "8"]
    return [
        Stage("gpu-tests", 0, None, no_cuda),
        # the bursts need minutes on a CPU; tests/test_check.py runs them there
        Stage("check", 120, repro + ["check", "--no-burst", "--data-cifar", str(work / "none"),
                                     "--data-imagenet", str(work / "none"), "--results", str(work / "check-runs")]),
        Stage("cifar", 120, repro + ["bench", "cifar", "--specs", CIFAR[0], "--switches", "channels_last",
                                     "--warmup", "1", "--steps", "1", "--rounds", "1", *small]),
        Stage("cifar-compile", 0, None, no_cuda),
        Stage("cifar-deterministic", 0, None, no_cuda),
        Stage("cifar-shared", 0, None, no_cuda),
        Stage("bf16", 120, repro + ["bench", "bf16", "--specs", CIFAR[0], "--steps", "4", *small]),
        Stage("imagenet-data", 120, repro + ["bench", "imagenet-data", "--data", str(work / "imagenet"),
                                             "--workers", "1", "--steps", "1", "--rounds", "1"]),
    ]


def run_acceptance(out: Path, results: Path) -> int:
    import torch

    from repro.hardware import cpu_model

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU {cpu_model()}"
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    results.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".acceptance-", dir=results))
    handlers = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    started = time.monotonic()
    outcomes = []
    try:
        if not cuda:  # the reduced ImageNet stand-in: one batch of 32 small images an epoch
            from repro.data.generated import write_imagenet

            write_imagenet(work / "imagenet", classes=2, n_train=16, n_val=1, short_side=(64, 96))
        for stage in stages(cuda, work):
            left = TOTAL_BUDGET_S - (time.monotonic() - started)
            if stage.arguments is None:
                outcomes.append(Outcome(stage, "skipped", result=stage.skipped))
            elif cuda and left < 10:
                outcomes.append(Outcome(stage, "skipped", result=f"skipped: the {TOTAL_BUDGET_S} s budget is spent"))
            else:
                budget = min(stage.budget_s, left) if cuda else stage.budget_s
                print(f"repro check --acceptance: {stage.name} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
                outcomes.append(_run_stage(stage, budget, work / stage.name))
        summary = _summary(outcomes, device, time.monotonic() - started)
        print(summary)
        final = _publish(outcomes, summary, out, slug)
        print(f"\nwrote {final}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return EXIT_FAILED if any(o.status in ("failed", "timed out") for o in outcomes) else EXIT_OK


def _run_stage(stage: Stage, budget: float, folder: Path) -> Outcome:
    """The stage's command with its files going to `folder`; stopped with its children at `budget`."""
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", *stage.arguments]
    if stage.arguments[0] == "repro":
        command += ["--out", str(folder)]
    log = folder / f"{stage.name}.log"
    start = time.monotonic()
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=Path(__file__).resolve().parents[2])
        try:
            code = process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # the stage's group, with whatever it left running (data-loader workers, a trainer)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    outcome = Outcome(stage, "timed out" if code is None else "passed", time.monotonic() - start,
                      files=sorted(p for p in folder.iterdir() if p.is_file()))
    text = log.read_text(errors="replace")
    if code is None:
        outcome.result = f"stopped at its budget of {budget:.0f} s"
    else:
        outcome.result, failed = RESULTS[stage.name](folder, text, code)
        outcome.status = "failed" if failed else "passed"
    return outcome


def _pytest_result(folder: Path, text: str, code: int) -> tuple[str, bool]:
    counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text.splitlines()[-1] if text else "")
    return (", ".join(f"{n} {word}" for n, word in counts) or f"pytest exited {code}"), code not in (0, 5)


def _check_result(folder: Path, text: str, code: int) -> tuple[str, bool]:
    reports = list(folder.glob("check-*.json"))
    if not reports:
        return f"no report (exit {code})", True
    report = json.loads(reports[0].read_text())
    # there is no real dataset on the machine: its data items fail by design, the bursts use generated data
    failed = [f"{i['section']}/{i['name']}" for i in report["items"] if i["status"] == "FAIL" and i["section"] != "data"]
    speeds = report["speeds"]
    parts = [f"{speed['spec']} {speed['images_per_second']:,.0f} img/s"
             + (" (fed from JPEGs)" if dataset == "imagenet" else "") for dataset, speed in speeds.items()]
    cifar_hours = sum(row["device_hours"] for row in report["projection"] if row["spec"].startswith("cifar"))
    if report["projection"]:
        parts.append(f"projected: CIFAR suite {cifar_hours:.1f} device-hours, whole suite "
                     f"{report['device_hours']:.0f}")
    return "; ".join([f"failed: {', '.join(failed)}" if failed else "all items passed but the absent data"]
                     + parts), bool(failed)


def _cifar_result(folder: Path, text: str, code: int) -> tuple[str, bool]:
    import pandas as pd

    tables = list(folder.glob("cifar_*.csv"))
    if code or not tables:
        return f"exit {code}: see the log", True
    frame = pd.read_csv(tables[0])
    if "processes" in frame:
        return ", ".join(f"{row.processes} at once: {row.images_per_second:,.0f} img/s"
                         for row in frame.itertuples()), False
    best = frame.loc[frame.groupby("spec").images_per_second.idxmax()]
    return "; ".join(f"{row.spec} best {row.switches} {row.images_per_second:,.0f} img/s, "
                     f"{row.seconds_per_64k_iterations / 60:.1f} min/64k" for row in best.itertuples()), False


def _bf16_result(folder: Path, text: str, code: int) -> tuple[str, bool]:
    verdicts = [line for line in text.splitlines() if line.startswith("bf16 ")]
    return (verdicts[-1] if verdicts and not code else f"exit {code}: see the log"), bool(code)


def _imagenet_result(folder: Path, text: str, code: int) -> tuple[str, bool]:
    import pandas as pd

    tables = list(folder.glob("imagenet_data_*.csv"))
    if code or not tables:
        return f"exit {code}: see the log", True
    frame = pd.read_csv(tables[0])
    return "; ".join(f"{row.path} x{row.workers} {row.images_per_s:,.0f} img/s" for row in frame.itertuples()), False


RESULTS = {"gpu-tests": _pytest_result, "check": _check_result, "cifar": _cifar_result,
           "cifar-compile": _cifar_result, "cifar-deterministic": _cifar_result, "cifar-shared": _cifar_result, "bf16": _bf16_result, "imagenet-data": _imagenet_result}


def _summary(outcomes: list[Outcome], device: str, seconds: float) -> str:
    """The Markdown summary: one line per stage, then the CIFAR speeds per switch against the targets."""
    import torch

    lines = [f"# Acceptance on {device}", "",
             f"{time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, {seconds:.0f} s in all "
             f"(budget {TOTAL_BUDGET_S} s on one H100)", "",
             "| stage | status | seconds | budget | result |", "|---|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.stage.name} | {o.status} | {o.seconds:.0f} | {o.stage.budget_s:.0f} | "
                     f"{o.result.replace('|', '/')} |")
    tables = [p for o in outcomes if o.stage.name.startswith("cifar") and o.stage.name != "cifar-shared"
              and o.status == "passed" for p in o.files if p.suffix == ".csv"]
    if tables:
        import pandas as pd

        # each stage times its own eager fp32 baseline: the first one stands
        frame = pd.concat([pd.read_csv(path) for path in tables]).drop_duplicates(["spec", "switches"])
        frame["cell"] = [f"{r.images_per_second:,.0f} img/s, {r.seconds_per_64k_iterations / 60:.1f} min "
                         f"(warm-up {r.warmup_seconds:.1f} s)" for r in frame.itertuples()]
        table = frame.pivot(index="switches", columns="spec", values="cell").reindex(frame.switches.unique())
        lines += ["", f"Training speed at batch {frame.batch_size.iloc[0]} (minutes: projected per 64k-iteration "
                  "run); targets on one H100: " + ", ".join(f"{spec} <= {minutes:g} min" for spec, minutes in TARGETS.items()), "",
                  table.to_markdown()]
    return "\n".join(lines) + "\n"


def _publish(outcomes: list[Outcome], summary: str, out: Path, slug: str) -> Path:
    """Every stage's files as <out>/acceptance-<slug>/<stage>-<slug>.<ext>, the folder replacing the
    last run's at once (two renames in one folder)."""
    final = out / f"acceptance-{slug}"
    staged, old = (out / f".acceptance-{slug}.{kind}-{os.getpid()}" for kind in ("new", "old"))
    staged.mkdir(parents=True)
    for o in outcomes:
        for path in o.files:  # a stage writes at most one file of each kind
            shutil.copy2(path, staged / f"{o.stage.name}-{slug}{path.suffix}")
    (staged / f"summary-{slug}.md").write_text(summary)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _stop(signum: int, frame) -> None:
    """A stop signal unwinds the stages, so that the temporary folder is removed."""
    raise SystemExit(128 + signum)
