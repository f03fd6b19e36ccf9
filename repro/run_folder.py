"""A run is a folder: the resolved spec, the environment, the metrics CSV, a log, checkpoints, and
`final.json` written last. Reports read these folders; nothing here trains."""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from repro.errors import ReproError
from repro.spec import Spec

METRIC_COLUMNS = ["epoch", "iteration", "lr", "train_loss", "train_error", "test_loss", "test_error",
                  "epoch_seconds", "images_per_second"]
IMAGENET_METRIC_COLUMNS = METRIC_COLUMNS[:7] + ["test_top5_error"] + METRIC_COLUMNS[7:]

# Keys that may change between a run's starts without changing its result: where the data lies and
# how fast the hardware goes. Everything else must match the config the folder was started with.
RESUMABLE_DIFFERENCES = ("run", "data.root", "data.workers", "data.eval_batch_size", "data.download")


def run_path(results: Path, spec: Spec) -> Path:
    return results / "runs" / spec.name / f"seed{spec.seed}"


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def refuse_other_recipe(saved: dict[str, Any], spec: Spec, where: Path) -> None:
    """ReproError naming every recipe key on which `saved` (a config written by an earlier start)
    and `spec` differ; keys in RESUMABLE_DIFFERENCES may differ."""
    saved, wanted = _flatten(saved), _flatten(spec.to_dict())
    differences = [key for key in sorted(set(saved) | set(wanted))
                   if saved.get(key) != wanted.get(key)
                   and not any(key == p or key.startswith(p + ".") for p in RESUMABLE_DIFFERENCES)]
    if differences:
        details = "; ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in differences)
        raise ReproError(f"{where} holds a run of a different recipe ({details}). Give the spec another "
                         "name, or move that folder away to start over.")


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.env = self.path / "env.json"
        self.metrics = self.path / "metrics.csv"
        self.log_file = self.path / "log.txt"
        self.final = self.path / "final.json"
        self.checkpoints = self.path / "checkpoints"

    def finished(self) -> bool:
        return self.final.exists()

    def check_recipe(self, spec: Spec) -> None:
        """Refuse a spec whose recipe differs from the one this folder was started with: a different
        run must never overwrite or extend this one's results."""
        if self.config.exists():
            refuse_other_recipe(yaml.safe_load(self.config.read_text()) or {}, spec, self.path)

    def claim(self, spec: Spec) -> None:
        """Write config.yaml (the resolved spec) for a new or resumed run of the same recipe."""
        self.check_recipe(spec)
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.config, yaml.safe_dump(spec.to_dict(), sort_keys=False))

    def record_start(self, device: torch.device, world_size: int) -> None:
        """Append this start's environment to env.json (a resumed run has several)."""
        starts = json.loads(self.env.read_text())["starts"] if self.env.exists() else []
        starts.append({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "world_size": world_size,
            "git_commit": _git_commit(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        })
        _atomic_write(self.env, json.dumps({"starts": starts}, indent=2))

    def write_metrics(self, rows: list[dict[str, float]], columns: list[str]) -> None:
        """Rewrite the CSV from the rows the checkpoint holds, so that it never runs ahead of it."""
        partial = self.metrics.with_name("metrics.csv.partial")
        with open(partial, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, self.metrics)

    def write_final(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.final, json.dumps(summary, indent=2))

    def log(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        with open(self.log_file, "a") as handle:
            handle.write(line + "\n")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
