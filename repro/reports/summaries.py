"""The paper's result tables from finished runs: Table 6 (CIFAR-10 test error), Tables 2 and 3
(ImageNet 10-crop error) and Table 4 (ImageNet multi-scale error, from RUN/evaluations/multi_scale.json,
which `repro evaluate` writes), each beside the paper's numbers. Written through `repro.tables.write_table`.

Every entry is the error of the final network as mean +- sample std over the finished seeds, with the
best run and n beside it (the paper's Table 6 convention for ResNet-110; its other numbers are single
runs, which the notes say); runs that diverged, are damaged or are still going are named in a column of
their own and never enter the statistics. The Model column is the paper's name of the network each
spec trains (runs.Network.label).
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import pandas as pd

from repro import paper
from repro.complexity import count_parameters
from repro.reports.runs import (
    Run, SeedStats, Suite, final_test_error, finished, label_of, multi_scale_evaluation, network_of, not_counted,
    seed_stats, stats_over_seeds,
)
from repro.spec import ModelSpec
from repro.tables import write_table

# Captions avoid LaTeX's special characters (%, _): write_table escapes cells and notes, not captions.
TABLE6_CAPTION = "CIFAR-10 test error of plain nets and ResNets (Table 6)"
IMAGENET_CAPTIONS = {
    "table2": "ImageNet validation error, plain nets and ResNets of 18 and 34 layers (Table 2)",
    "table3": "ImageNet validation error of the deeper and projection ResNets (Table 3)",
    "table4": "ImageNet validation error with the multi-scale test (Table 4)",
}
PAPER_RUNS_NOTE = (
    "The paper's numbers are single runs, except ResNet-110, which Table 6 prints over "
    f"{paper.TABLE6_RESNET110_RUNS} runs: mean ± std {paper.TABLE6_TEST_ERROR['cifar_resnet110']:.2f} ± "
    f"{paper.TABLE6_RESNET110_STD:.2f}, best {paper.TABLE6_RESNET110_BEST:.2f}. Ours are means over seeds, "
    "so every other comparison sets our mean beside one run of the paper: our best run is shown beside "
    "each mean, so that both readings are possible."
)
TABLE6_NOTE = (
    "Test error (%): error of the final network (at the last iteration) on the CIFAR-10 test set, mean ± "
    "sample std (ddof=1) over the finished seeds; Best: the lowest of those runs; n: finished of expected "
    "seeds; Diff: mean - paper in percentage points. Paper: Table 6. " + PAPER_RUNS_NOTE + " Runs that "
    "diverged, are damaged or are in progress are listed and not counted."
)
IMAGENET_NOTE = (
    "Errors (%) on the ImageNet validation set at the end of training: 10-crop (4 corners, center, "
    "and their flips, in the 256 resize: the corners of the whole resize unless eval.ten_crop says "
    "center_square) and center crop, mean ± sample std over the finished seeds; Diff: 10-crop top-1 "
    "minus the paper's, in percentage points. Paper: Table 2 (top-1) and Table 3 (top-1/top-5); "
    "Table 2's ResNets use option A shortcuts; the paper's ImageNet numbers are single runs. Runs that "
    "diverged, are damaged or are in progress are listed and not counted."
)


TABLE4_NOTE = (
    "Errors (%) of the final network on the ImageNet validation set with Table 4's test (Sec. 3.4): the whole "
    "image through the network (fully convolutional), softmax scores averaged over shorter sides of "
    f"{', '.join(map(str, paper.TABLE4_SCALES))} pixels and their horizontal flips; mean ± sample std over the "
    "finished seeds that `repro evaluate RUN --protocol multi_scale` has tested; Diff: top-1 minus the "
    "paper's, in percentage points. Paper: Table 4 (single runs). The 10-crop top-1 of the same runs is beside "
    "it. Finished runs not yet tested are listed as not evaluated."
)


BN_STATS_NOTE = (
    " BN: the BN statistics of the final network the errors read (its spec's eval.bn_stats): precise, a true "
    "average over training images after the last iteration, as the authors computed them for their released "
    "models; moving, PyTorch's moving averages. final.json holds the errors under both."
)
TABLE6_NOTE += BN_STATS_NOTE
IMAGENET_NOTE += BN_STATS_NOTE
TABLE4_NOTE += BN_STATS_NOTE


def bn_stats_text(records: list[dict | None]) -> str:
    """The BN statistics that final.json files (or evaluations) say they read, once each: "precise",
    "moving", or both; a record older than the choice read the moving averages."""
    return ", ".join(sorted({(record or {}).get("bn_stats") or "moving" for record in records}))


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
def parameter_count(model: ModelSpec) -> int:
    """Parameters of the network a validated model spec builds (ResNet-1202 takes seconds: built once)."""
    return count_parameters(model.build())


def table6_frame(runs_by_name: dict[str, list[Run]], names: list[str]) -> pd.DataFrame:
    """One row per CIFAR spec: params, n, test error mean/std/best, the paper's value and the difference."""
    records = []
    for name in names:
        runs = runs_by_name.get(name, [])
        stats = stats_over_seeds(runs, final_test_error)
        paper_value = paper.TABLE6_TEST_ERROR.get(name)
        network = network_of(name, runs_by_name)
        is_110 = name == "cifar_resnet110"  # the one row Table 6 prints over 5 runs
        records.append({
            "model": name, "label": label_of(name, runs_by_name),
            "params": None if network is None else parameter_count(network.model),
            "n": 0 if stats is None else stats.n, "seeds_expected": len(runs),
            **_stats_columns("test_error", stats),
            "paper": paper_value,
            "paper_std": paper.TABLE6_RESNET110_STD if is_110 else None,
            "paper_best": paper.TABLE6_RESNET110_BEST if is_110 else None,
            "diff": _difference(stats, paper_value),
            "bn_stats": bn_stats_text([run.final for run in finished(runs)]),
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
        "Model": frame.label,
        "Params": frame.params.map(lambda p: "" if pd.isna(p) else f"{p / 1e6:.2f}M"),
        "Test error (%)": [format_mean_std(m, s) for m, s in zip(frame.test_error_mean, frame.test_error_std)],
        "Best": frame.test_error_best.map(_number),
        "n": [f"{n}/{e}" for n, e in zip(frame.n, frame.seeds_expected)],
        "Paper": frame.apply(_paper_table6_text, axis=1),
        "Diff": frame["diff"].map(lambda d: _number(d, "{:+.2f}")),
        "BN": frame.bn_stats,
        "Not counted": frame.not_counted,
    })
    return write_table(out_dir, "table6", frame, shown=shown, note=TABLE6_NOTE,
                       caption=TABLE6_CAPTION)


def paper_imagenet_errors(name: str) -> tuple[float | None, float | None]:
    """The paper's 10-crop (top-1, top-5) error of a spec: top-1 from Table 2 where it is printed
    there, else Table 3; top-5 from Table 3."""
    top1_top5 = paper.TABLE3_TOP1_TOP5_ERROR.get(name)
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
        record = {"model": name, "label": label_of(name, runs_by_name), "n": len(finished(runs)),
                  "seeds_expected": len(runs)}
        for prefix, key in IMAGENET_ERRORS:
            stats = stats_over_seeds(runs, lambda run: run.final_value(key))
            record.update(_stats_columns(prefix, stats))
            if prefix == "ten_crop_top1":
                record["diff"] = _difference(stats, paper_top1)
        records.append({**record, "paper_top1": paper_top1, "paper_top5": paper_top5,
                        "bn_stats": bn_stats_text([run.final for run in finished(runs)]),
                        "not_counted": _not_counted_text(runs)})
    return pd.DataFrame.from_records(records)


def _errors(frame: pd.DataFrame, prefix: str) -> list[str]:
    """The column pair `<prefix>_mean`, `<prefix>_std` as "mean +- std" cells."""
    return [format_mean_std(m, s) for m, s in zip(frame[f"{prefix}_mean"], frame[f"{prefix}_std"])]


def write_imagenet_table(frame: pd.DataFrame, out_dir: str | Path, stem: str) -> list[Path]:
    """Table 2 or Table 3 (`stem`) from `imagenet_frame`."""
    shown = pd.DataFrame({
        "Model": frame.label,
        "10-crop top-1": _errors(frame, "ten_crop_top1"),
        "Paper top-1": frame.paper_top1.map(_number),
        "Diff": frame["diff"].map(lambda d: _number(d, "{:+.2f}")),
        "10-crop top-5": _errors(frame, "ten_crop_top5"),
        "Paper top-5": frame.paper_top5.map(_number),
        "Center top-1": _errors(frame, "center_top1"),
        "Center top-5": _errors(frame, "center_top5"),
        "n": [f"{n}/{e}" for n, e in zip(frame.n, frame.seeds_expected)],
        "BN": frame.bn_stats,
        "Not counted": frame.not_counted,
    })
    return write_table(out_dir, stem, frame, shown=shown, note=IMAGENET_NOTE,
                       caption=IMAGENET_CAPTIONS[stem])


def table4_names(suite: Suite, runs_by_name: dict[str, list[Run]], extras: bool = False) -> list[str]:
    """The networks of Table 4 that the suite runs, in the paper's order; none until they were asked for
    (`extras`, run-all --extras) or one of them has a finished run (each is then NOT RUN until its
    multi-scale test exists)."""
    names = [n for n in paper.TABLE4_TOP1_TOP5_ERROR if n in suite.names()]
    return names if extras or any(finished(runs_by_name.get(n, [])) for n in names) else []


def multi_scale_stats(runs: list[Run], key: str) -> SeedStats | None:
    """`key` (top1_error or top5_error) of the multi-scale tests of the finished runs, over seeds."""
    return seed_stats([record[key] for run in finished(runs) if (record := multi_scale_evaluation(run))])


def not_evaluated(runs: list[Run]) -> list[Run]:
    return [run for run in finished(runs) if multi_scale_evaluation(run) is None]


def table4_frame(runs_by_name: dict[str, list[Run]], names: list[str]) -> pd.DataFrame:
    records = []
    for name in names:
        runs = runs_by_name.get(name, [])
        paper_top1, paper_top5 = paper.TABLE4_TOP1_TOP5_ERROR[name]
        top1, top5 = multi_scale_stats(runs, "top1_error"), multi_scale_stats(runs, "top5_error")
        ten_crop = seed_stats([r.final["ten_crop_top1_error"] for r in finished(runs)
                               if "ten_crop_top1_error" in (r.final or {})])
        missing = "; ".join([f"seed {r.seed}: not evaluated" for r in not_evaluated(runs)]
                            + ([_not_counted_text(runs)] if not_counted(runs) else []))
        records.append({"model": name, "label": label_of(name, runs_by_name), "n": 0 if top1 is None else top1.n,
                        "seeds_expected": len(runs), **_stats_columns("multi_scale_top1", top1),
                        **_stats_columns("multi_scale_top5", top5), "diff": _difference(top1, paper_top1),
                        "paper_top1": paper_top1, "paper_top5": paper_top5,
                        "ten_crop_top1_mean": None if ten_crop is None else ten_crop.mean,
                        "bn_stats": bn_stats_text([multi_scale_evaluation(r) for r in finished(runs)
                                                   if multi_scale_evaluation(r)]),
                        "not_counted": missing})
    return pd.DataFrame.from_records(records)


def write_table4(frame: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    shown = pd.DataFrame({
        "Model": frame.label,
        "Multi-scale top-1": _errors(frame, "multi_scale_top1"),
        "Paper top-1": frame.paper_top1.map(_number),
        "Diff": frame["diff"].map(lambda d: _number(d, "{:+.2f}")),
        "Multi-scale top-5": _errors(frame, "multi_scale_top5"),
        "Paper top-5": frame.paper_top5.map(_number),
        "10-crop top-1": frame.ten_crop_top1_mean.map(_number),
        "n": [f"{n}/{e}" for n, e in zip(frame.n, frame.seeds_expected)],
        "BN": frame.bn_stats,
        "Not counted": frame.not_counted,
    })
    return write_table(out_dir, "table4", frame, shown=shown, note=TABLE4_NOTE, caption=IMAGENET_CAPTIONS["table4"])
