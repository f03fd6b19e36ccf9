"""Reading what training left on disk: the suite (which runs a report expects), the run folders
RESULTS/runs/<spec name>/seed<K>/ and their state, and statistics over seeds.

Nothing here trains or writes. A run's state follows from its files: final.json says finished or
diverged; metrics.csv without final.json is a run in progress (or killed); neither is not started;
a file that cannot be read makes the run damaged, which a report names and leaves out of every number.
What a run trained (dataset, depth, plain or residual, shortcut) comes from its validated spec.
"""
from __future__ import annotations

import io
import json
import math
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from repro.arguments import shown
from repro.contract import CONFIG, FINAL, METRIC_COLUMNS, METRICS, run_path
from repro.errors import ReproError, SpecError
from repro.reuse import table4_record
from repro.spec import ModelSpec, Spec, load_spec, validate
# the one parser of the suite file, shared with run-all
from repro.suite.plan import SAFE_LOADER, Suite, read_suite, spec_index

FINISHED, DIVERGED, IN_PROGRESS, NOT_STARTED = "finished", "diverged", "in progress", "not started"
DAMAGED = "damaged"  # a file of the run folder cannot be read: the run is named and left out of every number

# The metrics.csv columns a report reads (the run-folder contract has more).
METRICS_COLUMNS = ("epoch", "iteration", "train_error", "test_error")

_SEED_FOLDER = re.compile(r"seed(\d+)")  # contract.run_path's last part


@dataclass(frozen=True)
class Network:
    """What a spec trains, as the reports name, colour and count it: read from its validated spec,
    never from its name."""

    spec: str  # the spec's name, which names its run folders
    dataset: str  # cifar10 or imagenet
    model: ModelSpec

    @classmethod
    def of(cls, spec: Spec) -> "Network":
        return cls(spec.name, spec.data.dataset, spec.model)

    @property
    def label(self) -> str:
        """The paper's name: plain-20, ResNet-56; a projection shortcut is named, as Table 3 names
        ResNet-34 B and C."""
        if not self.model.residual:
            return f"plain-{self.model.depth}"
        return f"ResNet-{self.model.depth}" + ("" if self.model.shortcut == "A" else f" {self.model.shortcut}")


def config_network(name: str, config: Any, source: str) -> Network:
    """The network a run's config.yaml describes. Only what a report reads is validated (the model and
    data.dataset), so that a folder written before a speed switch was renamed still reads."""
    model, data = (config.get(key) if isinstance(config, dict) else None for key in ("model", "data"))
    if not isinstance(model, dict) or not isinstance(data, dict):
        raise SpecError(f"{source}: expected the `model` and `data` mappings of a resolved spec")
    return Network.of(validate({"name": name, "model": model, "data": {"dataset": data.get("dataset")}}, source))


@dataclass(frozen=True)
class Run:
    name: str
    seed: int
    path: Path
    state: str
    network: Network | None = None  # read_run: its own config.yaml says; find_runs: the same for every seed
    metrics: pd.DataFrame | None = None  # metrics.csv, None before the first epoch ends
    final: dict[str, Any] | None = None  # final.json, None until the run ends
    config: dict[str, Any] | None = None  # config.yaml
    problem: str | None = None  # DAMAGED: the file that cannot be read, and why

    @property
    def iterations(self) -> int:
        if self.final is not None and "iterations" in self.final:
            return int(self.final["iterations"])
        if self.metrics is None or self.metrics.empty:
            return 0
        return int(self.metrics["iteration"].iloc[-1])

    @property
    def max_iters(self) -> int | None:
        return ((self.config or {}).get("optim") or {}).get("max_iters")

    def describe(self) -> str:
        """finished / diverged / in progress (iteration k of N) / damaged (why) / not started."""
        if self.state == IN_PROGRESS:
            total = f" of {self.max_iters:,}" if self.max_iters else ""
            return f"{IN_PROGRESS} (iteration {self.iterations:,}{total})"
        if self.state == DIVERGED:
            return f"{DIVERGED} at iteration {self.iterations:,}"
        if self.state == DAMAGED:
            return f"{DAMAGED} ({self.problem})"
        return self.state

    def final_value(self, key: str) -> float:
        """A number from final.json; a finished run without it is a broken run folder."""
        if self.final is None or key not in self.final:
            raise ReproError(f"{self.path / FINAL}: no key {key!r}; the run folder is incomplete, "
                             "rerun the spec to rewrite it")
        return float(self.final[key])

    def last_full_epoch(self) -> pd.Series:
        """The last metrics.csv row of a whole epoch. A last row with partial=1 covers an epoch cut short
        by max_iters (64k iterations end 40 iterations, 5,120 images, into epoch 165): its running
        training error says little, so the curves draw it and no claim reads it. A CSV written before
        the `partial` column existed cannot say, and counts as whole epochs."""
        metrics = self.metrics
        if metrics is not None and "partial" in metrics:
            metrics = metrics[metrics["partial"] == 0]
        if metrics is None or metrics.empty:
            raise ReproError(f"{self.path / METRICS}: no full epoch (the run ended at iteration "
                             f"{self.iterations:,}, inside its first epoch); the claims read full epochs only")
        return metrics.iloc[-1]


def _read_config(path: Path, name: str) -> tuple[dict[str, Any] | None, Network | None]:
    if not path.is_file():
        return None, None
    try:
        config = yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ReproError(f"{CONFIG}: not valid YAML ({str(error).strip()})") from None
    return config, config_network(name, config, CONFIG)


def tail_lines(path: Path, count: int, block: int = 4096) -> str:
    """The first line of a text file (a CSV's header) and its last `count` lines, read from its end: a
    file's size does not matter."""
    with open(path, "rb") as handle:
        header = handle.readline()
        end = handle.seek(0, io.SEEK_END)
        start, data = end, b""
        # one more line break than lines wanted: the first line read may be cut
        while start > len(header) and data.count(b"\n") <= count:
            start = max(len(header), start - block)
            handle.seek(start)
            data = handle.read(end - start)
    lines = data.splitlines(keepends=True)
    if start > len(header):
        lines = lines[1:]
    return (header + b"".join(lines[-count:])).decode()


def _read_metrics(path: Path, tail: int | None = None) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        metrics = pd.read_csv(path if tail is None else io.StringIO(tail_lines(path, tail)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ReproError(f"{METRICS}: not a readable CSV ({str(error).strip()})") from None
    missing = [c for c in METRICS_COLUMNS if c not in metrics.columns]
    if missing:
        raise ReproError(f"{METRICS}: no column {', '.join(missing)} (expected {', '.join(METRIC_COLUMNS)})")
    if metrics.empty:  # the header alone, as the trainer writes it for a run stopped in its first epoch
        return metrics
    not_numbers = [c for c in METRICS_COLUMNS if not pd.api.types.is_numeric_dtype(metrics[c])]
    if not_numbers:
        raise ReproError(f"{METRICS}: column {', '.join(not_numbers)} holds something other than numbers")
    return metrics


def _read_final(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    if not path.is_file():
        raise ReproError(f"{FINAL}: not a file")
    try:
        final = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise ReproError(f"{FINAL}: not valid JSON ({shown(str(error))[1:-1]})") from None
    if not isinstance(final, dict) or final.get("status") not in (FINISHED, DIVERGED):
        raise ReproError(f"{FINAL}: expected a mapping whose status is {FINISHED!r} or {DIVERGED!r}")
    error = final.get("final_test_error")
    if final["status"] == FINISHED and not (isinstance(error, (int, float)) and not isinstance(error, bool)
                                            and 0 <= error <= 100):
        raise ReproError(f"{FINAL}: a finished run without its final_test_error, a percentage "
                         f"(got {shown(error)})")
    return final


def read_run(run_dir: str | Path, name: str, seed: int, tail: int | None = None) -> Run:
    """A run's state from its files. A file that cannot be read makes the run DAMAGED, with the reason on
    one line: a report names it, leaves it out of every number and goes on with the others. `tail`: only
    the last rows of metrics.csv (what `repro status` shows)."""
    path = Path(run_dir)
    try:
        config, network = _read_config(path / CONFIG, name)
        metrics, final = _read_metrics(path / METRICS, tail), _read_final(path / FINAL)
    except ReproError as error:
        return Run(name, seed, path, DAMAGED, problem=" ".join(str(error).split()))
    if final is not None:
        return Run(name, seed, path, final["status"], network, metrics, final, config)
    return Run(name, seed, path, IN_PROGRESS if metrics is not None else NOT_STARTED, network, metrics, None, config)


def spec_file_network(suite: Suite, spec_files: dict[str, Path], name: str) -> Network:
    """The network of a spec as its file beside the suite defines it (experiments/<dataset>/*.yaml)."""
    if name not in spec_files:
        raise ReproError(f"{suite.path} names the spec {name!r}, but no run of it has a readable {CONFIG} "
                         f"and no {suite.path.parent}/*/*.yaml has `name: {name}`")
    return Network.of(load_spec(spec_files[name]))


def find_runs(results_dir: str | Path, suite: Suite, tail: int | None = None) -> dict[str, list[Run]]:
    """Every run the suite expects, by spec name: seeds 0..K-1 (K from the suite's `seeds` for the
    spec's dataset), plus any other seed folder found beside them; a run with no folder is not started.

    Every run of a spec carries the spec's Network: from the config.yaml of its first run that has a
    readable one (what was trained), else from the spec file beside the suite (nothing has started).
    `tail`: only the last rows of each metrics.csv."""
    results = Path(results_dir)
    if not results.is_dir():
        raise ReproError(f"results folder {results} does not exist; pass --results with the folder that "
                         "holds runs/ (default: results)")
    spec_files = spec_index(suite.path.parent)
    found = {}
    for name in suite.names():
        folder = results / "runs" / name
        started = [read_run(p, name, int(m.group(1)), tail) for p in sorted(folder.iterdir())
                   if (m := _SEED_FOLDER.fullmatch(p.name)) and p.is_dir()] if folder.is_dir() else []
        network = next((r.network for r in started if r.network is not None), None)
        network = network or spec_file_network(suite, spec_files, name)
        seen = {r.seed for r in started}
        waiting = [Run(name, seed, run_path(results, name, seed), NOT_STARTED)
                   for seed in range(suite.seed_count(network.dataset)) if seed not in seen]
        found[name] = sorted((replace(r, network=network) for r in started + waiting), key=lambda r: r.seed)
    return found


def network_of(name: str, runs_by_name: dict[str, list[Run]]) -> Network | None:
    """The network a spec trains, as find_runs read it; None for a spec the suite does not run."""
    runs = runs_by_name.get(name)
    return runs[0].network if runs else None


def label_of(name: str, runs_by_name: dict[str, list[Run]]) -> str:
    """The paper's name of a spec's network; the spec name for a spec the suite does not run."""
    network = network_of(name, runs_by_name)
    return network.label if network is not None else name


def network_labels(suite: Suite, runs_by_name: dict[str, list[Run]]) -> dict[str, str]:
    """Spec name -> the paper's name of its network, for the suite's specs (from their runs) and the other
    specs beside the suite file (a claim may cite a network the suite does not run)."""
    labels = {name: label_of(name, runs_by_name) for name in runs_by_name}
    for name, path in spec_index(suite.path.parent).items():
        if name not in labels:
            labels[name] = Network.of(load_spec(path)).label
    return labels


def finished(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.state == FINISHED]


def not_counted(runs: list[Run]) -> list[Run]:
    """Runs that exist but do not count toward a result: diverged, damaged or still in progress."""
    return [r for r in runs if r.state in (DIVERGED, DAMAGED, IN_PROGRESS)]


@dataclass(frozen=True)
class SeedStats:
    """A result over seeds: mean, sample standard deviation (ddof=1; NaN for one run), best (lowest
    error) and the number of runs, as the paper reports ResNet-110 in Table 6."""

    n: int
    mean: float
    std: float
    best: float


def seed_stats(values: list[float]) -> SeedStats | None:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return SeedStats(len(values), statistics.fmean(values), std, min(values))


def stats_over_seeds(runs: list[Run], value: Callable[[Run], float]) -> SeedStats | None:
    """`value` over the finished runs only: diverged, damaged and unfinished runs never enter a statistic."""
    return seed_stats([value(r) for r in finished(runs)])


def final_test_error(run: Run) -> float:
    """The test error (CIFAR) or center-crop validation error (ImageNet) of the final network, at
    max_iters, on the whole test set; never the best epoch: choosing an epoch on the test set would
    flatter the result."""
    return run.final_value("final_test_error")


def final_train_error(run: Run) -> float:
    """The running training error of the last full epoch (the end of the paper's dashed curves)."""
    return float(run.last_full_epoch()["train_error"])


def multi_scale_evaluation(run: Run) -> dict[str, Any] | None:
    """The multi-scale test of a finished run's final network (Table 4), as `repro evaluate RUN --protocol
    multi_scale` wrote it beside final.json; None when it has not been run (or not at Table 4's scales,
    or its file cannot be read: running the command again rewrites it)."""
    return table4_record(run.path) if run.state == FINISHED else None


def curve_runs(runs: list[Run]) -> list[Run]:
    """The runs a figure draws: the finished ones, or, before any has finished, those in progress
    (to watch them). Diverged runs are never drawn."""
    return finished(runs) or [r for r in runs if r.state == IN_PROGRESS and r.metrics is not None
                              and not r.metrics.empty]


def curve_over_seeds(runs: list[Run], column: str) -> pd.DataFrame:
    """Mean, min and max of a metrics.csv column over runs, per iteration (the runs of one spec share
    their epoch ends), the last row of an epoch cut short included. Columns: iteration, mean, low, high."""
    rows = pd.concat([r.metrics[["iteration", column]] for r in runs if r.metrics is not None])
    grouped = rows.groupby("iteration")[column]
    return pd.DataFrame({"mean": grouped.mean(), "low": grouped.min(), "high": grouped.max()}).reset_index()
