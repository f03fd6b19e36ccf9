"""The paper's figures from run folders: Fig. 6 (CIFAR-10 training and test error of plain nets and
ResNets), Fig. 4 (ImageNet, 18 and 34 layers) and Fig. 7 (layer responses).

Sized for a paper: each panel is one column wide (3.3 in) with 7-8 pt text. Curves are the mean over
the seeds drawn, with a light band from the lowest to the highest seed. Figures are built with the
object-oriented API (no pyplot): nothing global changes and nothing is left open.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from repro.reports.runs import IN_PROGRESS, Network, Run, curve_over_seeds, curve_runs, label_of

PANEL_SIZE = (3.3, 2.5)  # inches per panel: one column of a two-column paper, legend above the axes
DPI = 200  # PNG resolution; the PDF is vector
ITERATIONS_UNIT = 1e4  # the paper's x-axes read "iter. (1e4)" (Figs. 1, 4, 6); shorter runs use iterations
STYLE = {  # text of at least 7 pt at the printed size
    "font.size": 7.5, "axes.labelsize": 7.5, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
    "legend.handlelength": 2.2, "legend.columnspacing": 1.0, "pdf.fonttype": 42,
}
# One colour per depth, the same in every figure (matplotlib's tab10 palette).
DEPTH_COLOURS = {
    18: "#1f77b4", 20: "#1f77b4", 32: "#ff7f0e", 34: "#d62728", 44: "#2ca02c", 56: "#d62728",
    110: "#9467bd", 1202: "#8c564b",
}
OTHER_COLOUR = "#7f7f7f"
BAND_ALPHA = 0.18  # the min-max band over seeds: light, so the mean curves stay in front
TEST_WIDTH, TRAIN_WIDTH = 1.6, 0.8  # bold test (validation) curves, thin training curves

# Fig. 6: training error dashed, test error bold; y from 0 to 20 %. Fig. 4: training error thin,
# center-crop validation error bold, both solid; y from 20 to 60 %.
FIG6 = {"train_style": "--", "paper_ylim": (0.0, 20.0), "test_label": "test error"}
FIG4 = {"train_style": "-", "paper_ylim": (20.0, 60.0), "test_label": "val. error (center crop)"}


@dataclass(frozen=True)
class ErrorSeries:
    """One network in an error panel: curves over seeds (iteration, mean, low, high)."""

    label: str
    colour: str
    train: pd.DataFrame
    test: pd.DataFrame


def colour_of(network: Network) -> str:
    return DEPTH_COLOURS.get(network.model.depth, OTHER_COLOUR)


def error_series(name: str, runs: list[Run]) -> ErrorSeries | None:
    """The curves of a spec's finished runs (or of its runs in progress before any has finished)."""
    drawn = curve_runs(runs)
    if not drawn:
        return None
    network = drawn[0].network
    label = network.label + (" (running)" if drawn[0].state == IN_PROGRESS else "")
    return ErrorSeries(label, colour_of(network), curve_over_seeds(drawn, "train_error"),
                       curve_over_seeds(drawn, "test_error"))


def error_ylim(series: list[ErrorSeries], paper_ylim: tuple[float, float]) -> tuple[float, float]:
    """The paper's y-range, widened to 10 % steps where the curves end above it or dip below it
    (short smoke runs end at high error)."""
    low, high = paper_ylim
    ends = [c["mean"].iloc[-1] for s in series for c in (s.train, s.test)]
    lowest = min(c["low"].min() for s in series for c in (s.train, s.test))
    if max(ends) > 0.9 * high:
        high = min(100.0, 10 * math.ceil(max(ends) * 1.15 / 10))
    if lowest < low:
        low = max(0.0, 10 * math.floor(lowest / 10))
    return low, high


def _legend_above(ax, handles: list, labels: list[str]) -> None:
    """A legend above the axes, where it hides no curve: two columns for up to four entries, else three."""
    ax.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.02), ncol=2 if len(labels) <= 4 else 3,
              frameon=False, borderaxespad=0, handletextpad=0.5)


def _draw_curve(ax, curve: pd.DataFrame, colour: str, linestyle: str, width: float, unit: float) -> None:
    x = curve["iteration"] / unit
    ax.fill_between(x, curve["low"], curve["high"], color=colour, alpha=BAND_ALPHA, linewidth=0)
    # a run of one epoch has one point: a marker keeps it visible
    ax.plot(x, curve["mean"], color=colour, linestyle=linestyle, linewidth=width,
            marker="o" if len(x) == 1 else None, markersize=3)


def error_figure(panels: list[list[str]], runs_by_name: dict[str, list[Run]], *, train_style: str,
                 paper_ylim: tuple[float, float], test_label: str) -> Figure | None:
    """One panel per list of spec names: training error (thin or dashed) and test error (bold) against
    iterations, one colour per depth. None when no panel has a run to draw."""
    panel_series = [[s for name in names if (s := error_series(name, runs_by_name.get(name, [])))]
                    for names in panels]
    drawn = [s for series in panel_series for s in series]
    if not drawn:
        return None
    ylim = error_ylim(drawn, paper_ylim)
    longest = max(s.test["iteration"].max() for s in drawn)
    unit, xlabel = (ITERATIONS_UNIT, "iter. (1e4)") if longest >= ITERATIONS_UNIT else (1, "iter.")
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), layout="constrained")
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        for ax, names, series in zip(axes, panels, panel_series):
            for s in series:
                _draw_curve(ax, s.train, s.colour, train_style, TRAIN_WIDTH, unit)
                _draw_curve(ax, s.test, s.colour, "-", TEST_WIDTH, unit)
            ax.set_ylim(*ylim)
            ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 5, 10]))  # 0, 5, ..., 20 as the paper
            ax.set_xlim(left=0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("error (%)")
            ax.grid(True, linewidth=0.3, alpha=0.5)
            if not series:
                not_run = ", ".join(label_of(n, runs_by_name) for n in names) or "none in the suite"
                ax.text(0.5, 0.5, f"not run:\n{not_run}", ha="center", va="center", transform=ax.transAxes,
                        color=OTHER_COLOUR)
                continue
            # Above the axes, so that no curve is hidden: one entry per depth, then the two line styles.
            handles = [Line2D([], [], color=s.colour, linewidth=TEST_WIDTH) for s in series]
            handles += [Line2D([], [], color="black", linestyle=train_style, linewidth=TRAIN_WIDTH),
                        Line2D([], [], color="black", linewidth=TEST_WIDTH)]
            _legend_above(ax, handles, [s.label for s in series] + ["training error", test_label])
    return figure


def response_figure(responses: pd.DataFrame, networks: list[Network]) -> Figure | None:
    """Fig. 7: each 3x3 layer's response std (averaged over seeds) in network order (top) and sorted
    in descending order (bottom). Plain nets dashed, ResNets solid, one colour per depth.
    `responses` has columns model (the spec name), layer_index, std (pooled over the layer's channels,
    the reading the figure draws). None when none of `networks` has responses."""
    present = [n for n in networks if (responses["model"] == n.spec).any()]
    if not present:
        return None
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(PANEL_SIZE[0], 2 * PANEL_SIZE[1]), layout="constrained")
        top, bottom = figure.subplots(2, 1)
        for network in present:
            stds = responses[responses["model"] == network.spec].sort_values("layer_index")["std"].to_numpy()
            style = {"color": colour_of(network), "linestyle": "-" if network.model.residual else "--",
                     "linewidth": 1.0, "label": network.label}
            top.plot(range(1, len(stds) + 1), stds, **style)
            bottom.plot(range(1, len(stds) + 1), sorted(stds, reverse=True), **style)
        for ax, xlabel in ((top, "layer index (original)"), (bottom, "layer index (sorted by magnitude)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("std")
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
            ax.grid(True, linewidth=0.3, alpha=0.5)
        _legend_above(top, *top.get_legend_handles_labels())
    return figure


def save_figure(figure: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """`stem.png` (DPI dots per inch) and `stem.pdf` (vector) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    with matplotlib.rc_context(STYLE):  # tick labels are made at drawing time, with these sizes
        # Lay out once and keep it: a second constrained-layout pass collapses axes whose legend sits
        # above them (matplotlib 3.11), which would make the second file differ from the first.
        figure.draw_without_rendering()
        figure.set_layout_engine("none")
        for path in paths:
            figure.savefig(path, dpi=DPI)
    return paths
