"""TensorBoard scalars of a run, opt-in with `run.tensorboard: true`: the numbers of each metrics.csv row
and each iteration's loss and learning rate, as event files in the run folder (`tensorboard --logdir
results/runs` shows every run by spec and seed).

metrics.csv stays the record; the events are a view of it. A start whose folder has no event files
writes the CSV's rows first (the per-iteration losses of earlier starts are not in the CSV and stay
missing); a resume opens a new event file that hides what an earlier start wrote after the checkpoint.
Needs the optional extra `tensorboard` (pip install 'repro[tensorboard]').
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from repro.contract import EVENTS
from repro.errors import ReproError

EXTRA = "pip install 'repro[tensorboard]' (or pip install tensorboard)"
EPOCH_TAG, ITERATION_TAG = "epoch", "iteration"  # tags: epoch/test_error, iteration/loss, ...
NOT_SCALARS = ("epoch", "iteration")  # the metrics.csv columns that place a row rather than measure it


class Scalars:
    """Called by the engine where it knows an iteration's loss and where it writes the CSV; does nothing
    unless `enabled`, and writes on the main process only (`write`)."""

    def __init__(self, enabled: bool, folder: Path, write: bool):
        self.folder, self.writer, self.written = folder, None, 0
        self.steps: list[tuple[int, float, torch.Tensor]] = []  # iteration, lr, loss: one host sync per save
        self.enabled = enabled and write
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ReproError(f"run.tensorboard: true needs the optional extra `tensorboard`, which is not "
                                 f"installed: {EXTRA}, or set run.tensorboard: false") from None
            self.summary_writer = SummaryWriter

    @contextmanager
    def open(self, iteration: int, rows: list[dict]):
        """Write events for the block, from a start at `iteration` with the CSV's `rows` so far."""
        if not self.enabled:
            yield
            return
        rebuild = not any(self.folder.glob(f"{EVENTS}*"))
        # A resume hides what an earlier start wrote after its checkpoint (from iteration + 1 on).
        self.writer = self.summary_writer(str(self.folder), purge_step=iteration + 1 if iteration else None)
        self.written = 0 if rebuild else len(rows)
        try:
            self.epochs(rows)
            yield
        finally:
            self.writer.close()
            self.writer = None

    def step(self, iteration: int, lr: float, sums: torch.Tensor, images: int) -> None:
        """An iteration's mean loss (`sums[0]` is summed over its `images`: the main process's share of the
        batch when distributed), kept on the device until `epochs`."""
        if self.writer is not None:
            self.steps.append((iteration, lr, sums[0] / images))

    def epochs(self, rows: list[dict]) -> None:
        """The iterations since the last call, and the rows not yet written (the CSV's, as just saved)."""
        if self.writer is None:
            return
        losses = torch.stack([loss for _, _, loss in self.steps]).tolist() if self.steps else []
        for (iteration, lr, _), loss in zip(self.steps, losses):
            self.writer.add_scalar(f"{ITERATION_TAG}/loss", loss, iteration)
            self.writer.add_scalar(f"{ITERATION_TAG}/lr", lr, iteration)
        self.steps = []
        for row in rows[self.written:]:
            for column, value in row.items():
                if column not in NOT_SCALARS and value is not None:
                    self.writer.add_scalar(f"{EPOCH_TAG}/{column}", value, row["iteration"])
        self.written = len(rows)
        self.writer.flush()
