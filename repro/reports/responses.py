"""Figure 7's numbers: the standard deviation of each 3x3 layer's response on the CIFAR-10 test set.

A layer's response is its BN's output: after BN, before the ReLU and before the residual addition
(Sec. 4.2, Fig. 7). The paper does not say over what its std is taken, so it is read two ways from the
same hooks, both over the whole test set: pooled over every element of every channel (`std`, which the
figure and the claims use), and each channel's std averaged over the channels (`mean_channel_std`). One
streaming pass adds up each channel's sum and sum of squares in float64; both readings follow from them.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, NamedTuple

import pandas as pd
import torch
from torch import nn

from repro.run_network import load_run_model
from repro.contract import CONFIG, atomic_write
from repro.errors import ReproError
from repro.models import response_layers
from repro.reports.runs import Run, finished, find_runs, read_suite

RESPONSES_CSV = "fig7_responses.csv"  # in <results>/tables/
RESPONSE_COLUMNS = ["model", "seed", "layer_index", "layer", "std", "mean_channel_std"]
BATCH_SIZE = 500  # test images per forward pass; changes memory only, not the result


class LayerResponse(NamedTuple):
    layer: str  # the BN's module name
    std: float  # over every element of every channel (pooled): the reading Fig. 7 is drawn from
    mean_channel_std: float  # each channel's std over its elements, averaged over the channels


def _std(total: torch.Tensor, total_squares: torch.Tensor, count: int) -> torch.Tensor:
    mean = total / count
    # Rounding can leave a tiny negative variance for a constant response; it is zero.
    return (total_squares / count - mean.square()).clamp(min=0).sqrt()


@torch.no_grad()
def layer_response_stds(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[LayerResponse]:
    """Both readings of the response std over all batches, for each 3x3 layer in network order.
    Runs the model as it is (a checkpoint loads in eval mode: BN uses its running statistics)."""
    layers = response_layers(model)
    sums = [torch.zeros(bn.num_features, dtype=torch.float64) for _, bn in layers]  # per channel
    squares = [torch.zeros(bn.num_features, dtype=torch.float64) for _, bn in layers]
    counts = [0] * len(layers)  # elements per channel

    def accumulate(index: int):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            values = output.detach().double().transpose(0, 1).flatten(1)  # channels x elements
            sums[index] += values.sum(dim=1).cpu()
            squares[index] += values.square().sum(dim=1).cpu()
            counts[index] += values.shape[1]
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
    return [LayerResponse(name, _std(total.sum(), total_squares.sum(), count * len(total)).item(),
                          _std(total, total_squares, count).mean().item())
            for (name, _), total, total_squares, count in zip(layers, sums, squares, counts)]


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
    layer, std, mean_channel_std. A run whose checkpoints or config cannot be read (or hold another
    network) is left out with a warning naming it; ReproError when every run is."""
    test_images = _TestImages(data_root)
    rows, problems = [], []
    for run in runs:
        try:
            model, config = load_run_model(run.path, device)
        except ReproError as error:  # one damaged run must not cost the others their numbers
            problems.append(f"{run.path}: {error}")
            print(f"warning: left out of Fig. 7: {problems[-1]}", file=sys.stderr)
            continue
        responses = layer_response_stds(model, test_images.batches(config, run.path / CONFIG, batch_size, device))
        rows += [{"model": run.name, "seed": run.seed, "layer_index": index, **response._asdict()}
                 for index, response in enumerate(responses)]
    if not rows and problems:
        raise ReproError(f"no Fig. 7 run could be read ({len(problems)} damaged), e.g. {problems[0]}")
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
    # in one step: a half-written CSV would stop every later report
    atomic_write(path, response_frame(runs, data_root, device=device, batch_size=batch_size).to_csv(index=False))
    return path


def read_responses(path: str | Path) -> pd.DataFrame | None:
    """The responses CSV, or None when `repro responses` has not written it yet."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ReproError(f"{path}: not a readable CSV ({error}); rerun `repro responses`") from None
    missing = [c for c in RESPONSE_COLUMNS if c not in frame.columns]
    if missing:
        raise ReproError(f"{path}: missing column(s) {', '.join(missing)}; rerun `repro responses`")
    return frame


def mean_over_seeds(responses: pd.DataFrame) -> pd.DataFrame:
    """Each layer's stds (both readings) averaged over the seeds of its model: model, layer_index, layer,
    std, mean_channel_std, seeds."""
    grouped = responses.groupby(["model", "layer_index", "layer"], sort=False)
    return grouped.agg(std=("std", "mean"), mean_channel_std=("mean_channel_std", "mean"),
                       seeds=("std", "count")).reset_index()
