"""The paper's result tables from finished runs: Table 6 (CIFAR-10 test error) and Tables 2 and 3
(ImageNet 10-crop error), each beside the paper's numbers. Written through `repro.tables.write_table`.

Every entry is a final-epoch error as mean +- sample std over the finished seeds, with the best run and
n beside it (the paper's Table 6 convention for ResNet-110); runs that diverged or are still going are
named in a column of their own and never enter the statistics.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import pandas as pd

from repro import paper
from repro.complexity import count_parameters
from repro.models import build_model, model_name
from repro.reports.runs import (
    Run, SeedStats, Suite, display_name, final_test_error, finished, not_counted, stats_over_seeds,
)
from repro.tables import write_table

# Captions avoid LaTeX's special characters (%, _): write_table escapes cells and notes, not captions.
TABLE6_CAPTION = "CIFAR-10 test error of plain nets and ResNets (Table 6)"
IMAGENET_CAPTIONS = {
    "table2": "ImageNet validation error, plain nets and ResNets of 18 and 34 layers (Table 2)",
    "table3": "ImageNet validation error of the deeper and projection ResNets (Table 3)",
}
TABLE6_NOTE = (
    "Test error (%): final-epoch error on the CIFAR-10 test set, mean ± sample std (ddof=1) over the "
    "finished seeds; Best: the lowest of those runs; n: finished of expected seeds; Diff: mean - paper "
    "in percentage points. Paper: Table 6; ResNet-110 is printed there as mean ± std of 5 runs (best "
    "6.43), the other rows as one number. Runs that diverged or are in progress are listed and not counted."
)
IMAGENET_NOTE = (
    "Errors (%) on the ImageNet validation set at the end of training: 10-crop (4 corners, center, "
    "and their flips) and center crop, mean ± sample std over the finished seeds; Diff: 10-crop top-1 "
    "minus the paper's, in percentage points. Paper: Table 2 (top-1) and Table 3 (top-1/top-5); "
    "Table 2's ResNets use option A shortcuts. Runs that diverged or are in progress are listed and "
    "not counted."
)


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _number(value: float | None, fmt: str = "{:.2f}") -> str:
    return "" if _missing(value) else fmt.format(value)


def format_mean_std(mean: float | None, std: float | None) -> str:
    """"8.91 ± 0.12" over several seeds, "8.91" for one (no std), "" for none."""
    if _missing(mean):
        return ""
    return f"{mean:.2f}" if _missing(std) else f"{mean:.2f} ± {std:.2f}"


def _not_counted_text(runs: list[Run]) -> str:
    return "; ".join(f"seed {r.seed}: {r.describe()}" for r in not_counted(runs))


def _difference(stats: SeedStats | None, paper_value: float | None) -> float | None:
    return None if stats is None or paper_value is None else stats.mean - paper_value


def _stats_columns(prefix: str, stats: SeedStats | None) -> dict[str, float | None]:
    fields = ("mean", "std", "best")
    return {f"{prefix}_{f}": (None if stats is None else getattr(stats, f)) for f in fields}


@lru_cache(maxsize=None)
def _parameters_of(registry_name: str, shortcut: str | None) -> int:
    return count_parameters(build_model(registry_name, shortcut=shortcut))


def parameter_count(name: str, runs: list[Run]) -> int | None:
    """Parameters of the network a spec trains: the model its runs' config describes (architecture,
    depth, plain or residual, shortcut option), else the registry network of the spec's name; None
    for a spec that is neither."""
    model = next((r.config["model"] for r in runs if r.config and "model" in r.config), None)
    try:
        if model is None:
            return _parameters_of(name, None)
        return _parameters_of(model_name(model["arch"], model["depth"], model["residual"]),
                              model.get("shortcut") if model["residual"] else None)
    except ValueError:
        return None


def table6_frame(runs_by_name: dict[str, list[Run]], names: list[str]) -> pd.DataFrame:
    """One row per CIFAR spec: params, n, test error mean/std/best, the paper's value and the difference."""
    records = []
    for name in names:
        runs = runs_by_name.get(name, [])
        stats = stats_over_seeds(runs, final_test_error)
        paper_value = paper.TABLE6_TEST_ERROR.get(name)
        is_110 = name == "cifar_resnet110"  # the one row Table 6 prints over 5 runs
        records.append({
            "model": name, "params": parameter_count(name, runs),
            "n": 0 if stats is None else stats.n, "seeds_expected": len(runs),
            **_stats_columns("test_error", stats),
            "paper": paper_value,
            "paper_std": paper.TABLE6_RESNET110_STD if is_110 else None,
            "paper_best": paper.TABLE6_RESNET110_BEST if is_110 else None,
            "diff": _difference(stats, paper_value),
            "not_counted": _not_counted_text(runs),
        })
    return pd.DataFrame.from_records(records)


def _paper_table6_text(row: pd.Series) -> str:
    if pd.isna(row.paper):
        return ""
    if pd.isna(row.paper_std):
        return f"{row.paper:.2f}"
    return f"{row.paper:.2f} ± {row.paper_std:.2f} (best {row.paper_best:.2f})"


def write_table6(frame: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    shown = pd.DataFrame({
        "Model": frame.model.map(display_name),
        "Params": frame.params.map(lambda p: "" if pd.isna(p) else f"{p / 1e6:.2f}M"),
        "Test error (%)": [format_mean_std(m, s) for m, s in zip(frame.test_error_mean, frame.test_error_std)],
        "Best": frame.test_error_best.map(_number),
        "n": [f"{n}/{e}" for n, e in zip(frame.n, frame.seeds_expected)],
        "Paper": frame.apply(_paper_table6_text, axis=1),
        "Diff": frame["diff"].map(lambda d: _number(d, "{:+.2f}")),
        "Not counted": frame.not_counted,
    })
    return write_table(out_dir, "table6", frame, shown=shown, note=TABLE6_NOTE,
                       caption=TABLE6_CAPTION)


def paper_imagenet_errors(name: str) -> tuple[float | None, float | None]:
    """The paper's 10-crop (top-1, top-5) error of a spec: top-1 from Table 2 where it is printed
    there, else Table 3; top-5 from Table 3, whose option-A ResNet-34 is Table 2's ResNet-34."""
    top1_top5 = paper.TABLE3_TOP1_TOP5_ERROR.get(name) or paper.TABLE3_TOP1_TOP5_ERROR.get(f"{name}_A")
    top1 = paper.TABLE2_TOP1_ERROR.get(name, top1_top5[0] if top1_top5 else None)
    return top1, (top1_top5[1] if top1_top5 else None)


def imagenet_names(suite: Suite, stem: str) -> list[str]:
    """The rows of an ImageNet table. table2: the suite's table2 list. table3: the networks of the
    suite whose Table 3 row the paper prints (plain-34, ResNet-34 A/B/C, 50, 101, 152), made only when
    the suite runs some beyond Table 2's."""
    if stem == "table2":
        return suite.table("table2")
    extras = [n for n in suite.extras if paper_imagenet_errors(n)[1] is not None]
    if not extras:
        return []
    return [n for n in suite.table("table2") if paper_imagenet_errors(n)[1] is not None] + extras


# (column prefix, final.json key) of the ImageNet evaluations a finished run records.
IMAGENET_ERRORS = (
    ("ten_crop_top1", "ten_crop_top1_error"), ("ten_crop_top5", "ten_crop_top5_error"),
    ("center_top1", "center_top1_error"), ("center_top5", "center_top5_error"),
)


def imagenet_frame(runs_by_name: dict[str, list[Run]], names: list[str]) -> pd.DataFrame:
    records = []
    for name in names:
        runs = runs_by_name.get(name, [])
        paper_top1, paper_top5 = paper_imagenet_errors(name)
        record = {"model": name, "n": len(finished(runs)), "seeds_expected": len(runs)}
        for prefix, key in IMAGENET_ERRORS:
            stats = stats_over_seeds(runs, lambda run: run.final_value(key))
            record.update(_stats_columns(prefix, stats))
            if prefix == "ten_crop_top1":
                record["diff"] = _difference(stats, paper_top1)
        records.append({**record, "paper_top1": paper_top1, "paper_top5": paper_top5,
                        "not_counted": _not_counted_text(runs)})
    return pd.DataFrame.from_records(records)


def write_imagenet_table(frame: pd.DataFrame, out_dir: str | Path, stem: str) -> list[Path]:
    """Table 2 or Table 3 (`stem`) from `imagenet_frame`."""
    def errors(prefix: str) -> list[str]:
        return [format_mean_std(m, s) for m, s in zip(frame[f"{prefix}_mean"], frame[f"{prefix}_std"])]

    shown = pd.DataFrame({
        "Model": frame.model.map(display_name),
        "10-crop top-1": errors("ten_crop_top1"),
        "Paper top-1": frame.paper_top1.map(_number),
        "Diff": frame["diff"].map(lambda d: _number(d, "{:+.2f}")),
        "10-crop top-5": errors("ten_crop_top5"),
        "Paper top-5": frame.paper_top5.map(_number),
        "Center top-1": errors("center_top1"),
        "Center top-5": errors("center_top5"),
        "n": [f"{n}/{e}" for n, e in zip(frame.n, frame.seeds_expected)],
        "Not counted": frame.not_counted,
    })
    return write_table(out_dir, stem, frame, shown=shown, note=IMAGENET_NOTE,
                       caption=IMAGENET_CAPTIONS[stem])
