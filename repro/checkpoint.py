"""Checkpoints that survive being killed at any moment and never run code when read.

Each save is written atomically and the previous one kept (last.pt, prev.pt). They are read with
`torch.load(weights_only=True)`, which unpickles only tensors and plain containers: a crafted file in
a shared results folder cannot run code, it is merely unreadable. Unreadable files are moved into
checkpoints/damaged/ (never deleted, never rotated over a good one), and a run whose checkpoints are
all damaged stops with an error instead of silently starting over.
"""
from __future__ import annotations

import io
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from repro.arguments import shown
from repro.contract import CHECKPOINTS, DAMAGED, IMAGENET_METRIC_COLUMNS, LATEST, PREVIOUS, atomic_write
from repro.errors import ReproError

REQUIRED_KEYS = ("model", "optimizer", "schedule", "iteration", "epoch", "batch", "rows", "rng", "config")


class DamagedRunError(ReproError):
    """A run folder whose results exist but whose checkpoints cannot be read."""


class _Unreadable(ReproError):
    """A checkpoint file that torch cannot read, or that is not shaped as this suite's checkpoints."""


class _Unfit(ReproError):
    """A checkpoint that reads but fails to load into the run's network or optimizer."""


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """Write last.pt atomically and durably, keeping the one before as prev.pt: a kill at any point
    leaves at least one complete checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(folder / LATEST, buffer.getvalue(), durable=True, keep_previous=folder / PREVIOUS)


def load_problem(error: Exception) -> str:
    """Why torch.load refused a file, in a few words: never torch's advice to retry with
    weights_only=False, which would run whatever code the file holds."""
    firsts = [line.strip().removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
              for line in str(error).splitlines()]
    advice = ("weights_only", "Weights only load failed", "file an issue", "Check the documentation", "trust")
    detail = next((line for line in firsts if line and not any(a in line for a in advice)), "")
    if "Weights only load failed" in str(error):
        return (f"it holds more than tensors and plain data ({shown(detail)[1:-1]}); it was refused unread, "
                "since loading it could run code")
    return shown(f"{type(error).__name__}: {detail or 'empty or truncated'}")[1:-1]


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """One checkpoint file, or ReproError saying why it cannot be used: unreadable, or read but not
    shaped as this suite writes checkpoints."""
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols on the way to refusing a file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, I/O error, or a pickle that is more than data
        raise _Unreadable(f"{path} is unreadable: {load_problem(error)}") from None
    problem = structure_problem(state)
    if problem:
        raise _Unreadable(f"{path} is not a checkpoint of this suite ({problem})")
    return state


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def structure_problem(state: Any) -> str | None:
    """What is wrong with the shape of a checkpoint that torch could read (a crafted or foreign file), in
    what every reader takes from it without another check: None when it has the structure save_checkpoint
    writes. What only a resume reads (optimizer, schedule, RNG states) is checked by loading it."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a mapping"
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        return f"missing {', '.join(missing)}"
    model = state["model"]
    checks = {
        "model": isinstance(model, dict) and bool(model) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()),
        **{key: isinstance(state[key], dict) for key in ("optimizer", "schedule", "rng", "config")},
        "iteration": _whole(state["iteration"]), "epoch": _whole(state["epoch"]), "batch": _whole(state["batch"]),
        "rows": isinstance(state["rows"], list) and all(
            isinstance(row, dict) and "test_error" in row and set(row) <= set(IMAGENET_METRIC_COLUMNS)
            and all(value is None or _number(value) for value in row.values()) for row in state["rows"]),
        "lr": _number(state.get("lr", 0.0)),  # older checkpoints lack it
    }
    wrong = [key for key, good in checks.items() if not good]
    if wrong:
        return f"{', '.join(wrong)}: not what this suite writes there, e.g. {wrong[0]}={shown(state.get(wrong[0]))}"
    return None


def load_checkpoint(folder: Path, map_location: str | torch.device = "cpu", *, move_damaged: bool = False,
                    use: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """The newest readable checkpoint of `folder`, or None when it holds none at all. An unreadable or
    malformed one, or one that `use` (loading it into a network and optimizer) fails on with anything
    but a ReproError, is reported, moved aside when `move_damaged` (the trainer, which holds the run's
    lock), and the previous one tried; when no checkpoint there is usable, DamagedRunError."""
    problems = []
    for name in (LATEST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = read_checkpoint(path, map_location)
            try:
                if use is not None:
                    use(state)
            except ReproError:  # not damage: a different recipe, say
                raise
            except Exception as error:  # a key or shape that fits no network or optimizer of this run
                raise _Unfit(f"{path} does not fit this run ({shown(f'{type(error).__name__}: {error}')[1:-1]})")
            return state
        except (_Unfit, _Unreadable) as error:
            problems.append(str(error))
            moved = _move_aside(path) if move_damaged else None
            print(f"warning: {error}{f'; moved to {moved}' if moved else ''}; trying the previous one",
                  file=sys.stderr)
    if problems:
        advice = (f" The damaged files are kept in {folder / DAMAGED}. Rerun with --restart to keep this folder "
                  "under another name and start the run over." if move_damaged else "")
        raise DamagedRunError(f"every checkpoint of {folder.parent} is damaged: {'; '.join(problems)}.{advice}")
    return None


def _move_aside(path: Path) -> Path:
    damaged = path.parent / DAMAGED
    damaged.mkdir(exist_ok=True)
    target = damaged / f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}"
    path.replace(target)
    return target


# RNG states as tensors and plain types: what weights_only=True reads back. The CUDA state is that of
# the current device alone (each process's own GPU): a resume may see fewer GPUs than the save did.
def rng_states() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                        "has_gauss": has_gauss, "cached_gaussian": cached}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """The states of rng_states(), read onto the CPU (torch refuses a state held on a device)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].cpu())
