"""Training one run with the paper's recipe (Sec. 3.4 and 4.2), resumable at any moment.

Everything is counted in iterations like the paper: SGD with momentum 0.9 and weight decay 1e-4 on
mini-batches of a fixed size, the learning rate from its schedule (and the warm-up of ResNet-110),
a test pass and a CSV row after every epoch, until `max_iters`. Each epoch ends with an atomic
checkpoint; a stop signal (how Slurm preempts) checkpoints in the middle of an epoch and exits with
EXIT_PREEMPTED, and the same command then resumes exactly where the run stopped.

The speed switches (layout, compilation, CUDA graphs, precision) are resolved in repro/hardware.py
and applied around the recipe in `Trainer.__init__`; the loop below does not depend on them.
"""
from __future__ import annotations

import itertools
import math
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from repro.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from repro.contract import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, PRECISE_BN, STOP_SIGNALS, metric_columns
from repro.data import build_pipeline
from repro.distributed import (Processes, close_processes, group_batchnorm, init_processes, launched_processes,
                               sync_batchnorm)
from repro.errors import ReproError
from repro.hardware import Switches, probe, resolve_switches, set_backends
from repro.precise_bn import precise_statistics, statistics_in_use
from repro.run_folder import RunFolder, RunLocked, refuse_other_recipe
from repro.run_network import build_network
from repro.scalars import Scalars
from repro.schedule import LearningRate
from repro.spec import Spec

STOP_CHECK_EVERY = 10  # iterations between the cross-process checks for a stop signal (a host sync)


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ReproError(f"run.device={requested} but this machine has no CUDA device "
                             "(set run.device=cpu or auto)")
        if requested == "cuda":
            requested = f"cuda:{local_rank}"
        if torch.device(requested).index >= torch.cuda.device_count():
            raise ReproError(f"run.device={requested} but only {torch.cuda.device_count()} CUDA devices exist")
    return torch.device(requested)


def refuse_uneven_batch(spec: Spec, processes: Processes) -> None:
    """Each process trains on an equal share of the mini-batch: DDP averages the processes' gradients
    with equal weights, so unequal shares would not be the gradient of the mini-batch. (Evaluation
    batches need not divide: evaluation sums over images.)"""
    if spec.optim.batch_size % processes.world_size:
        raise ReproError(f"optim.batch_size {spec.optim.batch_size} does not divide over {processes.world_size} "
                         f"processes: each process takes an equal share of a mini-batch; set optim.batch_size "
                         f"to a multiple of {processes.world_size} or start another number of processes")


class StopSignals:
    """Remembers a stop signal until the training loop can checkpoint at a step boundary."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def cause(self) -> str:
        """What stopped the run, as this process knows it: a process stops when any process of the run
        received a signal (Trainer.should_stop), and the main process that logs it may not be that one."""
        if self.received is None:
            return "a stop signal that another process received"
        return f"signal {signal.Signals(self.received).name}"

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def error_percent(wrong: float, count: float) -> float:
    return 100.0 * wrong / count


class DeviceSums:
    """Sums kept on the device, so that no training step waits for the host, with an image count
    kept on the host (which knows every batch size). `totals` is the one host sync of a period."""

    def __init__(self, size: int, device: torch.device):
        self.values = torch.zeros(size, dtype=torch.float64, device=device)
        self.images = 0

    def add(self, values: torch.Tensor, images: int) -> None:
        self.values += values
        self.images += images

    def totals(self, processes: Processes) -> list[float]:
        """[*sums, images], summed over processes (a collective: every process calls it)."""
        count = torch.tensor([float(self.images)], dtype=torch.float64, device=self.values.device)
        return processes.sum(torch.cat([self.values, count])).tolist()

    def restore(self, totals: list[float], is_main: bool) -> None:
        """Saved totals go to the main process alone, so that the next sum over processes is right."""
        self.reset()
        if is_main:
            self.values.copy_(torch.tensor(totals[:-1], dtype=torch.float64))
            self.images = int(totals[-1])

    def reset(self) -> None:
        self.values.zero_()
        self.images = 0


def train_step(network: nn.Module, optimizer: torch.optim.Optimizer, autocast, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    """One SGD iteration on a mini-batch; returns [summed loss, wrong predictions] on the device."""
    with autocast:
        logits = network(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.stack([loss.detach().double() * len(y), (logits.argmax(1) != y).sum().double()])


@torch.no_grad()
def evaluate(model: nn.Module, batches, autocast, processes: Processes, device: torch.device) -> dict:
    """Loss and top-1/top-5 error (%) over this process's share of the batches, summed over processes.
    A batch of shape [B, K, 3, H, W] holds K crops per image whose softmax scores are averaged.
    Deviation (README): it runs under the training precision (`autocast`), bf16 included."""
    model.eval()
    sums = DeviceSums(3, device)  # loss, top-1 wrong, top-5 wrong
    for x, y in batches:
        if not len(y):  # a process's share of a last batch smaller than the number of processes
            continue
        crops = x.shape[1] if x.dim() == 5 else 1
        with autocast:
            logits = model(x.flatten(0, 1) if crops > 1 else x).float()
        probabilities = logits.softmax(1).view(len(y), crops, -1).mean(1)
        top5 = probabilities.topk(min(5, probabilities.shape[1]), 1).indices
        sums.add(torch.stack([
            F.nll_loss(probabilities.clamp_min(1e-12).log(), y, reduction="sum").double(),
            (top5[:, 0] != y).sum().double(),
            (top5 != y[:, None]).all(1).sum().double(),
        ]), len(y))
    loss, top1, top5, count = sums.totals(processes)
    model.train()
    return {"loss": loss / count, "error": error_percent(top1, count), "top5_error": error_percent(top5, count)}


class TrainState:
    """Where a run stands, and everything a checkpoint needs to continue as if nothing had happened:
    the network, the optimizer (its momentum buffers), the schedule, the position in the recipe, the
    rows so far, the open epoch's sums and the RNG states."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: LearningRate,
                 device: torch.device):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.iteration = 0
        self.epoch = 0  # index of the epoch in progress
        self.batch = 0  # next batch of that epoch
        self.lr = schedule.at(0)  # the rate of the latest step: each CSV row shows its epoch's last
        self.rows: list[dict] = []
        self.epoch_sums = DeviceSums(2, device)  # loss * images, wrong
        self.window_sums = DeviceSums(1, device)  # wrong, over the warm-up window
        self.epoch_train_seconds = 0.0
        self.wall_seconds = 0.0

    def state_dict(self, processes: Processes) -> dict:
        """Collective: the sums are totalled over processes."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "iteration": self.iteration, "epoch": self.epoch, "batch": self.batch, "lr": self.lr,
            "rows": self.rows,
            "epoch_sums": self.epoch_sums.totals(processes),
            "window_sums": self.window_sums.totals(processes),
            "epoch_train_seconds": self.epoch_train_seconds,
            "wall_seconds": self.wall_seconds,
            "rng": rng_states(),
        }

    def load_state_dict(self, state: dict, is_main: bool) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.iteration, self.epoch, self.batch = state["iteration"], state["epoch"], state["batch"]
        self.lr = state.get("lr", self.schedule.at(max(self.iteration - 1, 0)))  # older checkpoints lack it
        self.rows = state["rows"]
        self.epoch_sums.restore(state["epoch_sums"], is_main)
        self.window_sums.restore(state["window_sums"], is_main)
        self.epoch_train_seconds = state["epoch_train_seconds"]
        self.wall_seconds = state["wall_seconds"]
        restore_rng_states(state["rng"])


class Trainer:
    """One run: the data, the network, SGD with momentum and weight decay, the learning-rate
    schedule, and its TrainState."""

    def __init__(self, spec: Spec, folder: RunFolder, data_root: str | None, processes: Processes,
                 device: torch.device, switches: Switches):
        self.spec, self.folder, self.processes, self.device, self.switches = spec, folder, processes, device, switches
        self.columns = metric_columns(spec.data.dataset)
        self.scalars = Scalars(spec.run.tensorboard, folder.path, processes.is_main)  # a view of the CSV, opt-in
        torch.manual_seed(spec.seed)  # the same He initialisation on every process
        self.pipeline = build_pipeline(spec, data_root, device, processes, switches)
        self.unreadable = getattr(self.pipeline, "unreadable", None)  # ImageNet: damaged files skipped
        self.logged_unreadable: set[str] = set()
        for kind in spec.eval.final:
            if not hasattr(self.pipeline, f"{kind}_batches"):
                raise ReproError(f"eval.final: {kind} is not available for {spec.data.dataset}")
        # build_network is spec.model.build() for every spec of the paper; a fine-tuning spec also
        # loads its source's weights and freezes what its strategy names (repro/run_network.py)
        model = build_network(spec).to(device)
        if switches.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if processes.distributed and spec.model.sync_bn:
            model = sync_batchnorm(model, device.type)
        if spec.model.bn_group is not None:
            per_process = spec.optim.batch_size // processes.world_size
            if per_process > spec.model.bn_group and per_process % spec.model.bn_group:
                raise ReproError(f"model.bn_group {spec.model.bn_group}: each of the {processes.world_size} processes "
                                 f"holds {per_process} images of a batch, not a whole number of groups; choose a "
                                 "group or a world size that divides them")
            # BN over fixed groups: the same network on any number of processes (repro/distributed.py); a
            # process holding no more than a group normalises its whole share
            model = group_batchnorm(model, min(spec.model.bn_group, per_process), processes)
        self.model = model  # the plain module: its state_dict is what checkpoints hold
        if processes.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if switches.compile:
            model = torch.compile(model)
        self.network = model  # what the training step calls
        optim = spec.optim
        # Deviation (README): PyTorch's SGD keeps v = m*v + g and steps by lr*v, so a change of lr
        # rescales the whole momentum at once; the paper's Caffe keeps v = m*v + lr*g, where it fades in.
        # Only parameters with requires_grad: a fine-tuning strategy freezes the others (repro/reuse).
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trained, lr=optim.lr, momentum=optim.momentum,
                                         weight_decay=optim.weight_decay, nesterov=optim.nesterov)
        self.schedule = LearningRate(optim)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=switches.precision == "bf16",
                                       cache_enabled=not switches.cuda_graphs)
        if switches.cuda_graphs:
            from repro.graphs import GraphedTrainStep

            self.step = GraphedTrainStep(self.network, self.optimizer, self.autocast, self._eager_step)
        else:
            self.step = self._eager_step
        self.state = TrainState(self.model, self.optimizer, self.schedule, device)
        # {"statistics": BN buffers, "images": n}: the precise BN statistics, once the pass after the last
        # iteration has computed them (kept in the checkpoint beside the moving averages)
        self.precise: dict | None = None

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return train_step(self.network, self.optimizer, self.autocast, x, y)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The TrainState, the recipe it belongs to, and the image files skipped so far."""
        state = {**self.state.state_dict(self.processes), "config": self.spec.to_dict(),
                 "unreadable_images": dict(self.unreadable.files) if self.unreadable is not None else {}}
        if self.precise is not None:
            state[PRECISE_BN] = self.precise
        return state

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state, self.processes.is_main)
        self.precise = state.get(PRECISE_BN)  # a stop after the precise-BN pass keeps its result
        if self.unreadable is not None:  # those an earlier start logged are not logged again
            self.logged_unreadable = set(state.get("unreadable_images", {}))
            self.unreadable.files.update(state.get("unreadable_images", {}))

    def save(self) -> None:
        state = self.state_dict()  # collective: every process takes part
        if self.processes.is_main:
            save_checkpoint(self.folder.checkpoints, state)
            self.folder.write_metrics(self.state.rows, self.columns)
            self.scalars.epochs(self.state.rows)
        self.processes.barrier()

    # --- the recipe ----------------------------------------------------------------------------
    def run(self, stop: StopSignals, progress) -> int:
        """Epochs of SGD until max_iters, each closed by a test pass, a CSV row and a checkpoint."""
        if self.should_stop(stop, every_iteration=True):  # a stop during start-up: nothing trained yet
            self.log(f"stopped by {stop.cause()} before training; run the same command to resume")
            return EXIT_PREEMPTED
        # `batch > 0` at max_iters: an epoch left open by an older version's stop on the last step
        while self.state.iteration < self.spec.optim.max_iters or self.state.batch > 0:
            epoch_start = time.perf_counter()
            stopped = self.train_one_epoch(stop, progress)
            if stopped:
                self.state.wall_seconds += time.perf_counter() - epoch_start
                self.save()
                self.log(f"stopped by {stop.cause()} at iteration {self.state.iteration}; "
                         "checkpoint saved, run the same command to resume")
                return EXIT_PREEMPTED
            row = self.end_epoch()
            row["epoch_seconds"] = time.perf_counter() - epoch_start
            self.state.wall_seconds += row["epoch_seconds"]
            self.save()
            self.log_epoch(row)
            if not math.isfinite(row["train_loss"]):
                self.finish("diverged")
                self.log("the training loss is not finite: the run diverged (final.json says so)")
                return EXIT_DIVERGED
            if self.state.iteration < self.spec.optim.max_iters and self.should_stop(stop, every_iteration=True):
                self.log(f"stopped by {stop.cause()} after epoch {row['epoch']}; run the same "
                         "command to resume")
                return EXIT_PREEMPTED
        return self.finish("finished", stop)

    def train_one_epoch(self, stop: StopSignals, progress) -> bool:
        """SGD steps from the epoch's next batch to its end or to max_iters; True when a stop signal
        interrupted it (the epoch stays open in the checkpoint)."""
        max_iters = self.spec.optim.max_iters
        start = time.perf_counter()
        try:
            for x, y in progress(self.pipeline.train_batches(self.state.epoch, self.state.batch), self.state.epoch):
                if self.state.iteration >= max_iters:
                    break
                self.state.lr = self.schedule.at(self.state.iteration)
                stats = self.step(x, y, self.state.lr)
                self.state.epoch_sums.add(stats, len(y))
                if self.schedule.warming_up:
                    self.state.window_sums.add(stats[1:], len(y))
                self.state.iteration += 1
                self.state.batch += 1
                self.scalars.step(self.state.iteration, self.state.lr, stats, len(y))
                self.check_warmup()
                # the last iteration closes its epoch first: a stop there would leave it open
                if self.state.iteration < max_iters and self.should_stop(stop):
                    return True
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return False
        finally:
            self.state.epoch_train_seconds += time.perf_counter() - start

    def check_warmup(self) -> None:
        """Sec. 4.2: lr 0.01 until the training error falls below 80%, then back to 0.1; at the latest
        at `warmup_max_iters` (our cap, logged and recorded in final.json)."""
        optim = self.spec.optim
        if not self.schedule.warming_up or (self.state.iteration % optim.warmup_window
                                            and self.state.iteration < optim.warmup_max_iters):
            return
        wrong, count = self.state.window_sums.totals(self.processes)
        self.state.window_sums.reset()
        error = error_percent(wrong, count)
        if self.schedule.end_warmup_if_trained(self.state.iteration, error):
            reason = (f"it reached its cap of {optim.warmup_max_iters} iterations with training error {error:.1f}%"
                      if self.schedule.warmup_capped else
                      f"training error {error:.1f}% < {optim.warmup_until_train_error}%")
            self.log(f"warm-up ends at iteration {self.state.iteration}: {reason}; lr back to the schedule "
                     f"({self.schedule.at(self.state.iteration):g})")

    def end_epoch(self) -> dict:
        """Sum the epoch's training statistics, test, and append the epoch's row (its time comes after)."""
        loss_sum, wrong, count = self.state.epoch_sums.totals(self.processes)
        if self.processes.distributed:  # evaluate with rank 0's BN statistics on every process
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, 0)
        test = evaluate(self.model, self.pipeline.eval_batches(), self.autocast, self.processes, self.device)
        if self.schedule.observe_validation(test["error"]):
            optim = self.spec.optim
            self.log(f"lr divided by {1 / optim.lr_factor:g} after epoch {self.state.epoch + 1} (drop "
                     f"{self.schedule.plateau_drops} of at most {optim.max_lr_drops}): validation error "
                     f"{test['error']:.2f}%, no improvement of {optim.plateau_threshold} points on the best "
                     f"{self.schedule.best_error:.2f}% for {optim.plateau_patience} epochs")
        row = {
            "epoch": self.state.epoch + 1, "iteration": self.state.iteration, "lr": self.state.lr,
            "train_images": int(count), "partial": int(self.state.batch < self.pipeline.batches_per_epoch),
            "train_loss": loss_sum / count, "train_error": error_percent(wrong, count),
            "test_loss": test["loss"], "test_error": test["error"],
            "epoch_seconds": None, "images_per_second": count / max(self.state.epoch_train_seconds, 1e-9),
        }
        if "test_top5_error" in self.columns:
            row["test_top5_error"] = test["top5_error"]
        self.state.rows.append(row)
        self.state.epoch += 1
        self.state.batch = 0
        self.state.epoch_sums.reset()
        self.state.epoch_train_seconds = 0.0
        return row

    def should_stop(self, stop: StopSignals, every_iteration: bool = False) -> bool:
        if not self.processes.distributed:
            return stop.received is not None
        if self.state.iteration % STOP_CHECK_EVERY and not every_iteration:
            return False
        return self.processes.any(stop.received is not None, self.device)

    def finish(self, status: str, stop: StopSignals | None = None) -> int:
        """Write final.json. A finished run's test errors are there under both BN statistics, its moving
        averages (`moving_bn`) and the precise ones (`precise_bn`, see precise_bn_pass), and at the top level
        under those of `eval.bn_stats`, which the tables read (`bn_stats` says which). Returns EXIT_OK, or
        EXIT_DIVERGED, or EXIT_PREEMPTED when a stop came during the precise pass (nothing written)."""
        last = self.state.rows[-1]
        summary = {"status": status, "final_test_error": last["test_error"], "iterations": self.state.iteration,
                   "wall_seconds": self.state.wall_seconds}
        if self.spec.optim.warmup_lr is not None:
            summary.update(warmup_ended_at=self.schedule.warmup_ended_at, warmup_capped=self.schedule.warmup_capped)
        if "test_top5_error" in last:
            summary.update(center_top1_error=last["test_error"], center_top5_error=last["test_top5_error"])
        if status == "finished":
            if self.spec.eval.precise_bn_images and self.precise is None:
                self.precise = self.precise_bn_pass(stop)
                if self.precise is None:
                    self.log(f"stopped by {stop.cause()} during the precise-BN pass after the last "
                             "iteration; run the same command to finish")
                    return EXIT_PREEMPTED
                self.save()  # the precise statistics beside the moving averages, for repro evaluate and others
            moving = self.final_errors(None)
            precise = None if self.precise is None else self.final_errors(self.precise["statistics"])
            chosen = self.spec.eval.bn_stats if precise is not None else "moving"
            summary.update(moving if chosen == "moving" else precise)
            summary.update(bn_stats=chosen, moving_bn=moving,
                           precise_bn=None if precise is None else {**precise, "images": self.precise["images"]})
            if precise is not None:
                self.log(f"precise BN statistics over {self.precise['images']} training images: test error "
                         f"{precise['final_test_error']:.2f}% (moving averages: {moving['final_test_error']:.2f}%)")
        if self.unreadable is not None:
            skipped = self.gather_unreadable()
            summary.update(unreadable_images=len(skipped), unreadable_files=sorted(skipped))
        if self.processes.is_main:
            self.folder.write_final(summary)
        statistics = f" ({summary['bn_stats']} BN statistics)" if "bn_stats" in summary else ""
        self.log(f"{status}: final test error {summary['final_test_error']:.2f}%{statistics} after "
                 f"{self.state.iteration} iterations, {self.state.wall_seconds:.0f} s")
        return EXIT_OK if status == "finished" else EXIT_DIVERGED

    def precise_bn_pass(self, stop: StopSignals | None) -> dict | None:
        """The precise BN statistics of the final network: averaged over the first `eval.precise_bn_images`
        training images (whole batches, at most one epoch) of the epoch that would come next, augmented as
        in training; None when a stop signal came first. Deterministic, so a rerun finds the same."""
        batches = -(-self.spec.eval.precise_bn_images // self.spec.optim.batch_size)
        batches = min(batches, self.pipeline.batches_per_epoch)
        sample = itertools.islice(self.pipeline.train_batches(self.state.epoch, 0), batches)
        should_stop = (lambda: False) if stop is None else (lambda: self.should_stop(stop, every_iteration=True))
        result = precise_statistics(self.model, sample, self.processes, self.autocast, should_stop)
        if result is None:
            return None
        statistics, images = result
        return {"statistics": statistics, "images": images}

    def final_errors(self, statistics: dict | None) -> dict:
        """The final network's test errors under `statistics` (None: its moving averages, whose per-epoch
        test is the last row's): the per-epoch test's error, and each of `eval.final`."""
        last = self.state.rows[-1]
        with statistics_in_use(self.model, statistics):
            if statistics is None:
                errors = {"final_test_error": last["test_error"]}
                if "test_top5_error" in last:
                    errors.update(center_top1_error=last["test_error"], center_top5_error=last["test_top5_error"])
            else:
                test = evaluate(self.model, self.pipeline.eval_batches(), self.autocast, self.processes, self.device)
                errors = {"final_test_error": test["error"]}
                if "test_top5_error" in last:
                    errors.update(center_top1_error=test["error"], center_top5_error=test["top5_error"])
            for kind in self.spec.eval.final:
                result = evaluate(self.model, getattr(self.pipeline, f"{kind}_batches")(), self.autocast,
                                  self.processes, self.device)
                errors.update({f"{kind}_top1_error": result["error"], f"{kind}_top5_error": result["top5_error"]})
        return errors

    def log_unreadable(self) -> None:
        """From now on each skipped image file is a line of the log; those met before the run folder
        was claimed (by the mean image) are logged now."""
        if self.unreadable is not None:
            for path, reason in self.unreadable.files.items():
                if path not in self.logged_unreadable:
                    self.log(f"skipped unreadable image {path}: {reason}")
            self.unreadable.report = self.log

    def gather_unreadable(self) -> set[str]:
        """The image files every process skipped (each meets only its share of the data)."""
        files = [set(self.unreadable.files)]
        if self.processes.distributed:
            files = [None] * self.processes.world_size
            torch.distributed.all_gather_object(files, set(self.unreadable.files))
        return set().union(*files)

    def log_epoch(self, row: dict) -> None:
        self.log(f"epoch {row['epoch']} iter {row['iteration']}/{self.spec.optim.max_iters} lr {row['lr']:.4g} "
                 f"train loss {row['train_loss']:.4f} err {row['train_error']:.2f}% | test loss "
                 f"{row['test_loss']:.4f} err {row['test_error']:.2f}% | {row['images_per_second']:.0f} img/s")

    def log(self, message: str) -> None:
        if self.processes.is_main:
            self.folder.log(message)


def progress_display(mode: str, total: int, is_main: bool):
    """A bar per epoch on a terminal; nothing extra otherwise (the epoch's log line says it all)."""
    show_bar = is_main and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))

    def wrap(batches, epoch):
        if not show_bar:
            return batches
        from tqdm import tqdm

        return tqdm(batches, total=total, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)

    return wrap


def train(spec: Spec, results: Path, data_root: str | None = None, restart: bool = False) -> int:
    """Train (or resume, or skip when finished) the run of `spec` under `results`. Returns the exit code.

    Nothing is written before every check has passed: the spec against the folder's recipe, the lock
    (one process per run), the data, and the checkpoint's recipe."""
    folder = RunFolder.of(results, spec)
    with StopSignals() as stop:  # from the first moment: a stop during start-up also exits 75
        processes = launched_processes()
        refuse_uneven_batch(spec, processes)
        device = resolve_device(spec.run.device, processes.local_rank)
        if device.type == "cuda":  # before the process group, whose NCCL communicator binds to it
            torch.cuda.set_device(device)
        processes = init_processes(processes, device)
        try:
            if restart and processes.is_main and (kept := folder.restart()):
                print(f"kept the earlier run folder as {kept}; starting over")
            processes.barrier()
            folder.check_recipe(spec)
            if folder.finished():
                print(f"{folder.path} is finished ({folder.final.name} exists): nothing to do")
                return EXIT_OK
            capabilities = probe(device)
            switches = resolve_switches(spec.run, capabilities, spec.data.dataset, processes.distributed)
            backends = set_backends(switches)  # before the network and the data touch the device
            with _exclusive(folder, processes, device):
                trainer = Trainer(spec, folder, data_root, processes, device, switches)  # bad data stops here
                resumed = _resume(trainer, folder, processes)
                if processes.is_main:
                    folder.claim(spec)
                    folder.record_start({"device": str(device), "device_name": capabilities.name,
                                         "cpu_capability": capabilities.cpu_capability,
                                         "native_bf16": capabilities.native_bf16,
                                         "world_size": processes.world_size, "switches": switches.as_dict(),
                                         "backends": backends})
                trainer.log(f"{'resuming' if resumed else 'starting'} {spec.name} seed {spec.seed} at iteration "
                            f"{trainer.state.iteration} on {device} x{processes.world_size} ({capabilities.name}): "
                            f"{switches.describe()}")
                trainer.log_unreadable()
                progress = progress_display(spec.run.progress, trainer.pipeline.batches_per_epoch,
                                            processes.is_main)
                with trainer.scalars.open(trainer.state.iteration, trainer.state.rows):
                    code = trainer.run(stop, progress)
                # every process done with its collectives before any tears the process group down: a gloo
                # rank that closed its connections while a peer finished the last one aborted it at exit
                processes.barrier()
                return code
        except OSError as error:  # a full or read-only disk: atomic writes left the last good files
            where = f" {error.filename}" if error.filename else ""
            raise ReproError(f"I/O error on{where}: {error.strerror or error}. The run folder keeps its last "
                             "complete checkpoint; fix the cause and run the same command to resume.") from None
        finally:
            close_processes(processes)


@contextmanager
def _exclusive(folder: RunFolder, processes: Processes, device: torch.device):
    """The run's lock, held by the main process for the whole run; every process learns whether it
    was had, so that all of them stop when another run holds it."""
    with ExitStack() as held:
        error = None
        if processes.is_main:
            try:
                held.enter_context(folder.lock())
            except RunLocked as locked:
                error = locked
        if processes.any(error is not None, device):
            raise error or RunLocked(f"{folder.path} is being trained by another process")
        yield


def _resume(trainer: Trainer, folder: RunFolder, processes: Processes) -> bool:
    """Load the newest readable checkpoint (the main process first: it moves damaged files aside)
    after checking its recipe; False for a fresh start. Results without a checkpoint are an error.
    It is read onto the CPU, wherever it was saved: the RNG states must be CPU tensors, and
    load_state_dict copies the network's and the optimizer's tensors to the device of the parameters."""
    def use(state: dict) -> None:  # a checkpoint that fails to load is damaged; one of another recipe is refused
        refuse_other_recipe(state["config"], trainer.spec, folder.checkpoints)  # even without config.yaml
        trainer.load_state_dict(state)

    state = None
    for turn in (True, False):  # the main process, then the others
        if processes.is_main == turn:
            state = load_checkpoint(folder.checkpoints, map_location="cpu", move_damaged=turn, use=use)
        processes.barrier()
    if state is None:
        if processes.is_main:
            folder.refuse_results_without_checkpoint()
        return False
    if processes.is_main:
        folder.write_metrics(trainer.state.rows, trainer.columns)  # drop rows written after the checkpoint
    return True
