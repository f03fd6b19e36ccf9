"""Training one run with the paper's recipe (Sec. 3.4 and 4.2), resumable at any moment.

Everything is counted in iterations like the paper. Each epoch ends with a test pass, a CSV row, and
an atomic checkpoint; SIGTERM or SIGUSR1 (how Slurm preempts) checkpoint in the middle of an epoch
and exit with EXIT_PREEMPTED. The same command then resumes exactly where the run stopped.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from repro.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from repro.data import build_pipeline
from repro.distributed import Processes, close_processes, init_processes, sync_batchnorm
from repro.errors import ReproError
from repro.run_folder import IMAGENET_METRIC_COLUMNS, METRIC_COLUMNS, RunFolder, refuse_other_recipe, run_path
from repro.schedule import LearningRate
from repro.spec import Spec

EXIT_DIVERGED = 3  # the loss became non-finite: final.json says "diverged"; rerunning does nothing
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR1 after a checkpoint (EX_TEMPFAIL): run the command again
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


class StopSignals:
    """Remembers a SIGTERM or SIGUSR1 until the training loop can checkpoint at a step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def error_percent(wrong: float, count: float) -> float:
    return 100.0 * wrong / count


@torch.no_grad()
def evaluate(model: nn.Module, batches, autocast, processes: Processes, device: torch.device) -> dict:
    """Loss and top-1/top-5 error (%) over this process's share of the batches, summed over processes.
    A batch of shape [B, K, 3, H, W] holds K crops per image whose softmax scores are averaged."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 wrong, top-5 wrong, images
    for x, y in batches:
        crops = x.shape[1] if x.dim() == 5 else 1
        with autocast:
            logits = model(x.flatten(0, 1) if crops > 1 else x).float()
        probabilities = logits.softmax(1).view(len(y), crops, -1).mean(1)
        top5 = probabilities.topk(min(5, probabilities.shape[1]), 1).indices
        sums += torch.stack([
            F.nll_loss(probabilities.clamp_min(1e-12).log(), y, reduction="sum").double(),
            (top5[:, 0] != y).sum().double(),
            (top5 != y[:, None]).all(1).sum().double(),
            torch.tensor(len(y), dtype=torch.float64, device=device),
        ])
    loss, top1, top5, count = processes.sum(sums).tolist()
    model.train()
    return {"loss": loss / count, "error": error_percent(top1, count), "top5_error": error_percent(top5, count)}


class Trainer:
    """One run: the model, SGD with momentum and weight decay, the learning-rate schedule, and the
    state a checkpoint needs to continue as if nothing happened."""

    def __init__(self, spec: Spec, folder: RunFolder, data_root: str | None, processes: Processes,
                 device: torch.device):
        self.spec, self.folder, self.processes, self.device = spec, folder, processes, device
        self.imagenet = spec.data.dataset == "imagenet"
        self.columns = IMAGENET_METRIC_COLUMNS if self.imagenet else METRIC_COLUMNS
        torch.manual_seed(spec.seed)  # the same He initialisation on every process
        self.pipeline = build_pipeline(spec, data_root, device, processes)
        model = spec.model.build().to(device)
        if spec.run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if processes.distributed and spec.model.sync_bn:
            model = sync_batchnorm(model, device.type)
        self.model = model  # the plain module: its state_dict is what checkpoints hold
        if processes.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if spec.run.compile and device.type == "cuda":
            model = torch.compile(model)
        self.network = model  # what the training step calls
        optim = spec.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                         weight_decay=optim.weight_decay, nesterov=optim.nesterov)
        self.schedule = LearningRate(optim)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.run.bf16)
        # training state; the sums live on the device so that no step waits for the host
        self.iteration = 0
        self.epoch = 0  # index of the epoch in progress
        self.batch = 0  # next batch of that epoch
        self.rows: list[dict] = []
        self.epoch_sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * images, wrong
        self.epoch_images = 0  # this process's; counted on the host, which knows every batch size
        self.window_wrong = torch.zeros(1, dtype=torch.float64, device=device)  # warm-up window
        self.window_images = 0
        self.epoch_train_seconds = 0.0
        self.wall_seconds = 0.0

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "iteration": self.iteration, "epoch": self.epoch, "batch": self.batch,
            "rows": self.rows,
            "epoch_sums": self.totals(self.epoch_sums, self.epoch_images),
            "window_sums": self.totals(self.window_wrong, self.window_images),
            "epoch_train_seconds": self.epoch_train_seconds,
            "wall_seconds": self.wall_seconds,
            "rng": rng_states(),
            "config": self.spec.to_dict(),
        }

    def save(self) -> None:
        state = self.state_dict()  # collective: every process takes part
        if self.processes.is_main:
            save_checkpoint(self.folder.checkpoints, state)
            self.folder.write_metrics(self.rows, self.columns)
        self.processes.barrier()

    def resume(self) -> bool:
        state = load_checkpoint(self.folder.checkpoints, map_location=self.device)
        if state is None:
            return False
        refuse_other_recipe(state["config"], self.spec, self.folder.checkpoints)  # even without config.yaml
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.iteration, self.epoch, self.batch = state["iteration"], state["epoch"], state["batch"]
        self.rows = state["rows"]
        if self.processes.is_main:  # the saved sums are already totals over processes
            loss_sum, wrong, images = state["epoch_sums"]
            self.epoch_sums.copy_(torch.tensor([loss_sum, wrong], dtype=torch.float64))
            self.epoch_images = int(images)
            wrong, images = state["window_sums"]
            self.window_wrong.fill_(wrong)
            self.window_images = int(images)
            self.folder.write_metrics(self.rows, self.columns)  # drop rows written after the checkpoint
        self.epoch_train_seconds = state["epoch_train_seconds"]
        self.wall_seconds = state["wall_seconds"]
        restore_rng_states(state["rng"])
        return True

    # --- the recipe ----------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.at(self.iteration)
        with self.autocast:
            logits = self.network(x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        wrong = (logits.argmax(1) != y).sum().double()
        self.epoch_sums += torch.stack([loss.detach().double() * len(y), wrong])
        self.epoch_images += len(y)
        if self.schedule.warming_up:
            self.window_wrong += wrong
            self.window_images += len(y)
        self.iteration += 1
        self.batch += 1

    def totals(self, sums: torch.Tensor, images: int) -> list[float]:
        """Device sums and the image count, summed over processes: the one host sync of a period."""
        count = torch.tensor([float(images)], dtype=torch.float64, device=self.device)
        return self.processes.sum(torch.cat([sums, count])).tolist()

    def check_warmup(self) -> None:
        """Sec. 4.2: lr 0.01 until the training error falls below 80%, then back to 0.1."""
        if not self.schedule.warming_up or self.iteration % self.spec.optim.warmup_window:
            return
        wrong, count = self.totals(self.window_wrong, self.window_images)
        self.window_wrong.zero_()
        self.window_images = 0
        error = error_percent(wrong, count)
        if self.schedule.end_warmup_if_trained(self.iteration, error):
            self.log(f"warm-up ends at iteration {self.iteration}: training error {error:.1f}% "
                     f"< {self.spec.optim.warmup_until_train_error}%; lr back to {self.spec.optim.lr}")

    def end_epoch(self) -> dict:
        """Sum the epoch's training statistics, test, and append the epoch's row (its time comes after)."""
        loss_sum, wrong, count = self.totals(self.epoch_sums, self.epoch_images)
        train_seconds = self.epoch_train_seconds
        if self.processes.distributed:  # evaluate with rank 0's BN statistics on every process
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, 0)
        test = evaluate(self.model, self.pipeline.eval_batches(), self.autocast, self.processes, self.device)
        self.schedule.observe_validation(test["error"])
        row = {
            "epoch": self.epoch + 1, "iteration": self.iteration, "lr": self.schedule.at(self.iteration - 1),
            "train_loss": loss_sum / count, "train_error": error_percent(wrong, count),
            "test_loss": test["loss"], "test_error": test["error"],
            "epoch_seconds": None, "images_per_second": count / max(train_seconds, 1e-9),
        }
        if self.imagenet:
            row["test_top5_error"] = test["top5_error"]
        self.rows.append(row)
        self.epoch += 1
        self.batch = 0
        self.epoch_sums.zero_()
        self.epoch_images = 0
        self.epoch_train_seconds = 0.0
        return row

    def run(self, stop: StopSignals, progress) -> int:
        optim = self.spec.optim
        while self.iteration < optim.max_iters:
            epoch_start = time.perf_counter()
            train_start = epoch_start
            for x, y in progress(self.pipeline.train_batches(self.epoch, self.batch), self.epoch):
                self.train_step(x, y)
                self.check_warmup()
                if self.should_stop(stop):
                    self.epoch_train_seconds += time.perf_counter() - train_start
                    self.wall_seconds += time.perf_counter() - epoch_start
                    self.save()
                    self.log(f"stopped by signal {stop.received} at iteration {self.iteration}; "
                             "checkpoint saved, run the same command to resume")
                    return EXIT_PREEMPTED
                if self.iteration >= optim.max_iters:
                    break
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.epoch_train_seconds += time.perf_counter() - train_start
            row = self.end_epoch()
            epoch_seconds = time.perf_counter() - epoch_start
            row["epoch_seconds"] = epoch_seconds
            self.wall_seconds += epoch_seconds
            self.save()
            self.log(f"epoch {row['epoch']} iter {row['iteration']}/{optim.max_iters} lr {row['lr']:.4g} "
                     f"train loss {row['train_loss']:.4f} err {row['train_error']:.2f}% | test loss "
                     f"{row['test_loss']:.4f} err {row['test_error']:.2f}% | {row['images_per_second']:.0f} img/s")
            if not math.isfinite(row["train_loss"]):
                self.finish("diverged")
                self.log("the training loss is not finite: the run diverged (final.json says so)")
                return EXIT_DIVERGED
        self.finish("finished")
        return 0

    def should_stop(self, stop: StopSignals) -> bool:
        if not self.processes.distributed:
            return stop.received is not None
        if self.iteration % STOP_CHECK_EVERY:
            return False
        return self.processes.any(stop.received is not None, self.device)

    def finish(self, status: str) -> None:
        errors = [row["test_error"] for row in self.rows]
        best = min(range(len(errors)), key=lambda i: errors[i] if math.isfinite(errors[i]) else math.inf)
        summary = {
            "status": status,
            "final_test_error": errors[-1],
            "best_test_error": errors[best],
            "best_epoch": self.rows[best]["epoch"],
            "iterations": self.iteration,
            "wall_seconds": self.wall_seconds,
        }
        if self.imagenet and status == "finished":
            ten_crop = evaluate(self.model, self.pipeline.ten_crop_batches(), self.autocast, self.processes,
                                self.device)
            summary.update({
                "ten_crop_top1_error": ten_crop["error"], "ten_crop_top5_error": ten_crop["top5_error"],
                "center_top1_error": self.rows[-1]["test_error"],
                "center_top5_error": self.rows[-1]["test_top5_error"],
            })
        if self.processes.is_main:
            self.folder.write_final(summary)
        self.log(f"{status}: final test error {summary['final_test_error']:.2f}% after "
                 f"{self.iteration} iterations, {self.wall_seconds:.0f} s")

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


def train(spec: Spec, results: Path, data_root: str | None = None) -> int:
    """Train (or resume, or skip when finished) the run of `spec` under `results`. Returns the exit code."""
    folder = RunFolder(run_path(results, spec))
    folder.check_recipe(spec)
    if folder.finished():
        print(f"{folder.path} is finished (final.json exists): nothing to do")
        return 0
    processes = init_processes("cuda" if spec.run.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        device = resolve_device(spec.run.device, processes.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        trainer = Trainer(spec, folder, data_root, processes, device)  # writes nothing: bad data stops here
        if processes.is_main:
            folder.claim(spec)
        processes.barrier()
        resumed = trainer.resume()
        if processes.is_main:
            folder.record_start(device, processes.world_size)
        trainer.log(f"{'resuming' if resumed else 'starting'} {spec.name} seed {spec.seed} at iteration "
                    f"{trainer.iteration} on {device} x{processes.world_size}")
        progress = progress_display(spec.run.progress, trainer.pipeline.batches_per_epoch, processes.is_main)
        with StopSignals() as stop:
            return trainer.run(stop, progress)
    finally:
        close_processes(processes)
