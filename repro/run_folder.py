"""A run is a folder: the resolved spec, the environment, the metrics CSV, a log, checkpoints, and
`final.json` written last. One process at a time trains it (an flock held for the process's life and
released by the OS when it dies). Reports read these folders; nothing here trains."""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from repro.contract import (CHECKPOINTS, CONFIG, ENV, FINAL, LOCK, LOG, METRICS, EXIT_LOCKED, atomic_write,
                            run_path, set_aside)
from repro.errors import ReproError
from repro.spec import Spec

# Keys that may change between a run's starts without changing its result: where the data lies and
# how fast the hardware goes. Everything else must match the config the folder was started with.
RESUMABLE_DIFFERENCES = ("run", "data.root", "data.workers", "data.eval_batch_size", "data.download",
                         "data.decode",
                         # the tests after the last iteration: they change no step of training
                         "eval.bn_stats", "eval.precise_bn_images", "eval.ten_crop")


class RunLocked(ReproError):
    """Another live process trains this run."""

    exit_code = EXIT_LOCKED


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
    and `spec` differ; keys in RESUMABLE_DIFFERENCES may differ. A key that an older version of this
    suite did not write counts as its default value."""
    defaults = _flatten(Spec(name=spec.name).to_dict())
    saved, wanted = {**defaults, **_flatten(saved)}, _flatten(spec.to_dict())
    differences = [key for key in sorted(set(saved) | set(wanted))
                   if saved.get(key) != wanted.get(key)
                   and not any(key == p or key.startswith(p + ".") for p in RESUMABLE_DIFFERENCES)]
    if differences:
        details = "; ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in differences)
        raise ReproError(f"{where} holds a run of a different recipe ({details}). Give the spec another "
                         "name, or move that folder away to start over.")


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / CONFIG
        self.env = self.path / ENV
        self.metrics = self.path / METRICS
        self.log_file = self.path / LOG
        self.final = self.path / FINAL
        self.checkpoints = self.path / CHECKPOINTS
        self.lock_file = self.path / LOCK

    @classmethod
    def of(cls, results: str | Path, spec: Spec) -> "RunFolder":
        return cls(run_path(results, spec.name, spec.seed))

    def finished(self) -> bool:
        if self.final.exists() and not self.final.is_file():
            raise ReproError(f"{self.final} is not a file: the run folder is damaged; move it away to resume the run")
        return self.final.exists()

    def saved_config(self) -> dict[str, Any] | None:
        """config.yaml as written by an earlier start; None when absent or damaged (a damaged one is
        moved aside by `claim`, and the checkpoint's copy of the config is checked instead)."""
        if not self.config.exists():
            return None
        try:
            config = yaml.safe_load(self.config.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            config = None
        if not isinstance(config, dict):
            print(f"warning: {self.config} is damaged; the recipe is checked against the checkpoint and "
                  "the file is rewritten", file=sys.stderr)
            return None
        return config

    def check_recipe(self, spec: Spec) -> None:
        """Refuse a spec whose recipe differs from the one this folder was started with: a different
        run must never overwrite or extend this one's results."""
        saved = self.saved_config()
        if saved is not None:
            refuse_other_recipe(saved, spec, self.path)

    @contextmanager
    def lock(self):
        """Hold the run's exclusive lock for the block: a second process gets RunLocked, naming the
        holder, and has written nothing. Folders made only to hold the lock are removed again when
        the block fails before anything else was written (bad data, say)."""
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunLocked(f"{self.path} is being trained by another process ({holder}); this one "
                            "wrote nothing. Wait for it to finish or stop it first.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {platform.node()} pid {os.getpid()}\n")
        handle.flush()
        ok = False
        try:
            yield
            ok = True
        finally:
            if not ok and created and [p.name for p in self.path.iterdir()] == [LOCK]:
                self.lock_file.unlink()
                for folder in created:
                    folder.rmdir()
            handle.close()  # releases the flock; the file stays, naming the last holder

    def refuse_results_without_checkpoint(self) -> None:
        """Called when no checkpoint exists: epochs in metrics.csv then are damage, never a fresh start."""
        try:
            rows = len(self.metrics.read_text().splitlines()) - 1 if self.metrics.exists() else 0
        except (OSError, UnicodeDecodeError):
            rows = 0
        if rows > 0:
            raise ReproError(f"{self.metrics} has epochs but {self.checkpoints} holds no checkpoint to "
                             "resume them from: the run folder is damaged. Rerun with --restart to keep "
                             "this folder under another name and start the run over.")

    def claim(self, spec: Spec) -> None:
        """Write config.yaml (the resolved spec); called once every check has passed."""
        if self.config.exists() and self.saved_config() is None:
            set_aside(self.config, "damaged")
        atomic_write(self.config, yaml.safe_dump(spec.to_dict(), sort_keys=False))

    def restart(self) -> Path | None:
        """Keep this folder under a new name (`seed<K>.restarted-<time>`) so the run starts over."""
        if not self.path.exists():
            return None
        with self.lock():
            return set_aside(self.path, "restarted")

    def record_start(self, entry: dict[str, Any]) -> None:
        """Append this start's environment to env.json (a resumed run has several). env.json is a log:
        a damaged one is kept beside it and a new one begun."""
        starts = []
        if self.env.exists():
            try:
                starts = json.loads(self.env.read_text())["starts"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                kept = set_aside(self.env, "damaged")
                print(f"warning: {self.env} was damaged; kept as {kept.name}, a new one begins", file=sys.stderr)
        starts.append({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "git_commit": _git_commit(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            **entry,
        })
        atomic_write(self.env, json.dumps({"starts": starts}, indent=2))

    def write_metrics(self, rows: list[dict[str, float]], columns: tuple[str, ...]) -> None:
        """Rewrite the CSV from the rows the checkpoint holds, so that it never runs ahead of it."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.metrics, text.getvalue())

    def write_final(self, summary: dict[str, Any]) -> None:
        atomic_write(self.final, json.dumps(summary, indent=2), durable=True)

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
