"""Figure 7's numbers: the standard deviation of each 3x3 layer's response on the CIFAR-10 test set.

A layer's response is its BN's output: after BN, before the ReLU and before the residual addition
(Sec. 4.2, Fig. 7). Its std is taken over every element of that output across the whole test set, in
one streaming pass that adds up the sum and the sum of squares in float64.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import pandas as pd
import torch
from torch import nn

from repro.checkpoint import load_run_model
from repro.errors import ReproError
from repro.models import response_layers
from repro.reports.runs import Run, finished, find_runs, read_suite

RESPONSES_CSV = "fig7_responses.csv"  # in <results>/tables/
RESPONSE_COLUMNS = ["model", "seed", "layer_index", "layer", "std"]
BATCH_SIZE = 500  # test images per forward pass; changes memory only, not the result


@torch.no_grad()
def layer_response_stds(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[tuple[str, float]]:
    """(layer name, std of its response over all batches) for each 3x3 layer, in network order.
    Runs the model as it is (a checkpoint loads in eval mode: BN uses its running statistics)."""
    layers = response_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    squares = torch.zeros(len(layers), dtype=torch.float64)
    counts = [0] * len(layers)

    def accumulate(index: int):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            values = output.detach().double()
            sums[index] += values.sum().cpu()
            squares[index] += values.square().sum().cpu()
            counts[index] += values.numel()
        return hook

    handles = [bn.register_forward_hook(accumulate(i)) for i, (_, bn) in enumerate(layers)]
    try:
        for images in batches:
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    if not counts or counts[0] == 0:
        raise ReproError("no images reached the network: the test set is empty")
    stds = []
    for (name, _), total, total_squares, count in zip(layers, sums.tolist(), squares.tolist(), counts):
        mean = total / count
        # Rounding can leave a tiny negative variance for a constant response; it is zero.
        stds.append((name, math.sqrt(max(total_squares / count - mean * mean, 0.0))))
    return stds


class _TestImages:
    """The CIFAR-10 test images of a run's data folder, preprocessed as in training (per-pixel mean of
    the training images subtracted, Sec. 4.2). Loaded once per data folder."""

    def __init__(self, data_root: str | None):
        self.data_root = data_root
        self.loaded: dict[tuple[Path, bool, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def batches(self, config: dict, source: Path, batch_size: int,
                device: str | torch.device) -> Iterable[torch.Tensor]:
        from repro.data import resolve_data_root
        from repro.data.cifar import load_cifar10, normalize, pixel_mean, split_validation
        from repro.spec import validate

        spec = validate(config, str(source))
        root = resolve_data_root(spec, self.data_root)
        key = (root, spec.data.verify_checksums, spec.data.validation_split)
        if key not in self.loaded:
            arrays = load_cifar10(root, verify_checksums=spec.data.verify_checksums)
            # The mean the run subtracted: over the 45k images it trained on when it held 5k out.
            train = split_validation(arrays).train_images if spec.data.validation_split else arrays.train_images
            self.loaded[key] = (arrays.test_images, pixel_mean(train))
        images, mean = self.loaded[key]
        for start in range(0, len(images), batch_size):
            yield torch.as_tensor(normalize(images[start:start + batch_size], mean), dtype=torch.float32).to(device)


def response_frame(runs: list[Run], data_root: str | None = None, *, device: str | torch.device = "cpu",
                   batch_size: int = BATCH_SIZE) -> pd.DataFrame:
    """One row per (run, 3x3 layer) for the final checkpoint of each run: model, seed, layer_index,
    layer, std."""
    test_images = _TestImages(data_root)
    rows = []
    for run in runs:
        model, config = load_run_model(run.path, device)
        stds = layer_response_stds(model, test_images.batches(config, run.path / "config.yaml", batch_size, device))
        rows += [{"model": run.name, "seed": run.seed, "layer_index": index, "layer": layer, "std": std}
                 for index, (layer, std) in enumerate(stds)]
    return pd.DataFrame(rows, columns=RESPONSE_COLUMNS)


def compute_responses(results_dir: str | Path, suite_path: str | Path = "experiments/suite.yaml",
                      data_root: str | None = None, *, out_dir: str | Path | None = None,
                      device: str | torch.device = "cpu", batch_size: int = BATCH_SIZE) -> Path:
    """`repro responses`: the layer responses of every finished run of the suite's `fig7` networks,
    written to <out_dir or results_dir>/tables/fig7_responses.csv. Returns the CSV's path."""
    suite = read_suite(suite_path)
    names = suite.figure("fig7")
    runs_by_name = find_runs(results_dir, suite)
    runs = [run for name in names for run in finished(runs_by_name[name])]
    if not runs:
        raise ReproError(f"no finished run of the Fig. 7 networks ({', '.join(names) or 'none listed'}) "
                         f"under {Path(results_dir) / 'runs'}; train them first, or check --results "
                         f"and the fig7 entry of {suite.path}")
    path = Path(out_dir or results_dir) / "tables" / RESPONSES_CSV
    path.parent.mkdir(parents=True, exist_ok=True)
    response_frame(runs, data_root, device=device, batch_size=batch_size).to_csv(path, index=False)
    return path


def read_responses(path: str | Path) -> pd.DataFrame | None:
    """The responses CSV, or None when `repro responses` has not written it yet."""
    path = Path(path)
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    missing = [c for c in RESPONSE_COLUMNS if c not in frame.columns]
    if missing:
        raise ReproError(f"{path}: missing column(s) {', '.join(missing)}; rerun `repro responses`")
    return frame


def mean_over_seeds(responses: pd.DataFrame) -> pd.DataFrame:
    """Each layer's std averaged over the seeds of its model: model, layer_index, layer, std, seeds."""
    grouped = responses.groupby(["model", "layer_index", "layer"], sort=False)["std"]
    return grouped.agg(std="mean", seeds="count").reset_index()
