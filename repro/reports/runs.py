"""Reading what training left on disk: the suite (which runs a report expects), the run folders
RESULTS/runs/<spec name>/seed<K>/ and their state, and statistics over seeds.

Nothing here trains or writes. A run's state follows from its files: final.json says finished or
diverged; metrics.csv without final.json is a run in progress (or killed); neither is not started.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from repro.errors import ReproError

FINISHED, DIVERGED, IN_PROGRESS, NOT_STARTED = "finished", "diverged", "in progress", "not started"

# The metrics.csv columns a report reads (the run-folder contract has more).
METRICS_COLUMNS = ("epoch", "iteration", "train_error", "test_error")

_SEED_FOLDER = re.compile(r"seed(\d+)")
_NAME = re.compile(r"(cifar|imagenet)_(plain|resnet)(\d+)(?:_(\w+))?")


@dataclass(frozen=True)
class Suite:
    """experiments/suite.yaml: seeds per dataset, and the spec names behind each figure and table."""

    path: Path
    seeds: dict[str, int]
    figures: dict[str, list[str]]
    tables: dict[str, list[str]]
    extras: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        """Every spec the suite runs, once, in the order the suite lists them."""
        listed = [n for names in (*self.figures.values(), *self.tables.values(), self.extras) for n in names]
        return list(dict.fromkeys(listed))

    def figure(self, key: str) -> list[str]:
        return self.figures.get(key, [])

    def table(self, key: str) -> list[str]:
        return self.tables.get(key, [])

    def seed_count(self, name: str) -> int:
        return self.seeds.get(dataset_of(name), 1)


def read_suite(path: str | Path, *, smoke: bool = False) -> Suite:
    """The suite file; `smoke` takes the seed counts of its `smoke` section (the shrunk suite)."""
    path = Path(path)
    if not path.is_file():
        raise ReproError(f"suite file {path} does not exist; pass --suite experiments/suite.yaml "
                         "(or the path of your suite file)")
    try:
        mapping = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ReproError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(mapping, dict):
        raise ReproError(f"{path}: a suite is a mapping with keys seeds, figures, tables, extras")

    def section(key: str, kind: type) -> Any:
        value = mapping.get(key) or kind()
        if not isinstance(value, kind):
            raise ReproError(f"{path}: {key}: expected a {kind.__name__}, got {type(value).__name__}")
        return value

    seeds = section("seeds", dict)
    if smoke:
        seeds = (mapping.get("smoke") or {}).get("seeds")
        if not isinstance(seeds, dict):
            raise ReproError(f"{path}: smoke: seeds: expected a mapping of dataset to seed count")
    figures, tables = section("figures", dict), section("tables", dict)
    for key, names in [*figures.items(), *tables.items()]:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ReproError(f"{path}: {key}: expected a list of spec names, got {names!r}")
    return Suite(path, dict(seeds), figures, tables, list(section("extras", list)))


def dataset_of(name: str) -> str:
    """The dataset a spec trains on, from its registry-style name (cifar_* or imagenet_*, vgg*)."""
    return "cifar10" if name.startswith("cifar_") else "imagenet"


def depth_of(name: str) -> int | None:
    match = _NAME.fullmatch(name)
    return int(match.group(3)) if match else None


def display_name(name: str) -> str:
    """The paper's way of naming a network: cifar_resnet56 -> ResNet-56, imagenet_resnet34_B ->
    ResNet-34 B, cifar_plain20 -> plain-20. Names outside the pattern come back unchanged."""
    match = _NAME.fullmatch(name)
    if match is None:
        return name
    _, kind, depth, variant = match.groups()
    label = f"{'ResNet' if kind == 'resnet' else 'plain'}-{depth}"
    return f"{label} {variant}" if variant else label


@dataclass(frozen=True)
class Run:
    name: str
    seed: int
    path: Path
    state: str
    metrics: pd.DataFrame | None = None  # metrics.csv, None before the first epoch ends
    final: dict[str, Any] | None = None  # final.json, None until the run ends
    config: dict[str, Any] | None = None  # config.yaml

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
        """finished / diverged / in progress (iteration k of N) / not started."""
        if self.state == IN_PROGRESS:
            total = f" of {self.max_iters:,}" if self.max_iters else ""
            return f"{IN_PROGRESS} (iteration {self.iterations:,}{total})"
        if self.state == DIVERGED:
            return f"{DIVERGED} at iteration {self.iterations:,}"
        return self.state

    def final_value(self, key: str) -> float:
        """A number from final.json; a finished run without it is a broken run folder."""
        if self.final is None or key not in self.final:
            raise ReproError(f"{self.path / 'final.json'}: no key {key!r}; the run folder is incomplete, "
                             "rerun the spec to rewrite it")
        return float(self.final[key])

    def last_metric(self, column: str) -> float:
        """The column's value in the last metrics.csv row (the final epoch)."""
        if self.metrics is None or self.metrics.empty:
            raise ReproError(f"{self.path / 'metrics.csv'}: no rows")
        if column not in self.metrics:
            raise ReproError(f"{self.path / 'metrics.csv'}: no column {column!r}")
        return float(self.metrics[column].iloc[-1])


def _read_metrics(path: Path) -> pd.DataFrame:
    try:
        metrics = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ReproError(f"{path}: not a readable CSV ({error}); delete the run folder and rerun") from None
    missing = [c for c in METRICS_COLUMNS if c not in metrics.columns]
    if missing:
        raise ReproError(f"{path}: missing column(s) {', '.join(missing)}; expected the columns of the "
                         "run-folder format (epoch, iteration, lr, train_loss, train_error, ...)")
    return metrics


def read_run(run_dir: str | Path, name: str, seed: int) -> Run:
    path = Path(run_dir)
    config_path, metrics_path, final_path = path / "config.yaml", path / "metrics.csv", path / "final.json"
    try:
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    except yaml.YAMLError as error:
        raise ReproError(f"{config_path}: not valid YAML ({error}); delete the run folder and rerun") from None
    metrics = _read_metrics(metrics_path) if metrics_path.is_file() else None
    if final_path.is_file():
        try:
            final = json.loads(final_path.read_text())
        except json.JSONDecodeError as error:
            raise ReproError(f"{final_path}: not valid JSON ({error}); delete it and rerun the spec") from None
        if not isinstance(final, dict) or final.get("status") not in (FINISHED, DIVERGED):
            raise ReproError(f"{final_path}: expected a mapping whose status is {FINISHED!r} or "
                             f"{DIVERGED!r}; delete it and rerun the spec")
        return Run(name, seed, path, final["status"], metrics, final, config)
    return Run(name, seed, path, IN_PROGRESS if metrics is not None else NOT_STARTED, metrics, None, config)


def find_runs(results_dir: str | Path, suite: Suite) -> dict[str, list[Run]]:
    """Every run the suite expects, by spec name: seeds 0..K-1 (K from the suite's `seeds`, the
    default seed of a spec being 0), plus any other seed folder found beside them. A run with no
    folder is returned as not started."""
    runs_root = Path(results_dir) / "runs"
    found = {}
    for name in suite.names():
        seeds = set(range(suite.seed_count(name)))
        folder = runs_root / name
        if folder.is_dir():
            seeds |= {int(m.group(1)) for p in folder.iterdir() if (m := _SEED_FOLDER.fullmatch(p.name))}
        found[name] = [read_run(folder / f"seed{seed}", name, seed) for seed in sorted(seeds)]
    return found


def finished(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.state == FINISHED]


def not_counted(runs: list[Run]) -> list[Run]:
    """Runs that exist but do not count toward a result: diverged or still in progress."""
    return [r for r in runs if r.state in (DIVERGED, IN_PROGRESS)]


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
    """`value` over the finished runs only: diverged and unfinished runs never enter a statistic."""
    return seed_stats([value(r) for r in finished(runs)])


def final_test_error(run: Run) -> float:
    """The final-epoch test error (CIFAR) or center-crop validation error (ImageNet), never the best
    epoch: choosing an epoch on the test set would flatter the result."""
    return run.final_value("final_test_error")


def final_train_error(run: Run) -> float:
    """The running training error of the last epoch (the end of the paper's dashed curves)."""
    return run.last_metric("train_error")


def curve_runs(runs: list[Run]) -> list[Run]:
    """The runs a figure draws: the finished ones, or, before any has finished, those in progress
    (to watch them). Diverged runs are never drawn."""
    return finished(runs) or [r for r in runs if r.state == IN_PROGRESS and r.metrics is not None]


def curve_over_seeds(runs: list[Run], column: str) -> pd.DataFrame:
    """Mean, min and max of a metrics.csv column over runs, per iteration (the runs of one spec share
    their epoch ends). Columns: iteration, mean, low, high."""
    rows = pd.concat([r.metrics[["iteration", column]] for r in runs if r.metrics is not None])
    grouped = rows.groupby("iteration")[column]
    return pd.DataFrame({"mean": grouped.mean(), "low": grouped.min(), "high": grouped.max()}).reset_index()
