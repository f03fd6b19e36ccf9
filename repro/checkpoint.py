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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from repro.contract import CHECKPOINTS, CONFIG, DAMAGED, LATEST, PREVIOUS, atomic_write
from repro.errors import ReproError

REQUIRED_KEYS = ("model", "optimizer", "schedule", "iteration", "epoch", "batch", "rows", "rng", "config")


class DamagedRunError(ReproError):
    """A run folder whose results exist but whose checkpoints cannot be read."""


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """Write last.pt atomically and durably, keeping the one before as prev.pt: a kill at any point
    leaves at least one complete checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(folder / LATEST, buffer.getvalue(), durable=True, keep_previous=folder / PREVIOUS)


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """One checkpoint file, or ReproError saying why it cannot be used."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, I/O error, or a pickle that is more than data
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        unsafe = [line for line in lines if "unsupported global" in line.lower()]
        if unsafe:  # torch's own message goes on to suggest weights_only=False: never do that here
            raise ReproError(f"{path} is unreadable: it holds more than tensors and plain data ({unsafe[0]}); "
                             "it was refused unread, since loading it could run code") from None
        reason = lines[0] if lines else type(error).__name__
        raise ReproError(f"{path} is unreadable ({type(error).__name__}: {reason})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ReproError(f"{path} is not a checkpoint of this suite (missing {', '.join(missing)})")
    return state


def load_checkpoint(folder: Path, map_location: str | torch.device = "cpu", *,
                    move_damaged: bool = False) -> dict[str, Any] | None:
    """The newest readable checkpoint of `folder`, or None when it holds none at all. An unreadable
    one is reported, moved aside when `move_damaged` (the trainer, which holds the run's lock), and
    the previous one used; when every checkpoint there is unreadable, DamagedRunError."""
    problems = []
    for name in (LATEST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            return read_checkpoint(path, map_location)
        except ReproError as error:
            problems.append(str(error))
            moved = _move_aside(path) if move_damaged else None
            print(f"warning: {error}{f'; moved to {moved}' if moved else ''}; trying the previous one",
                  file=sys.stderr)
    if problems:
        raise DamagedRunError(
            f"every checkpoint of {folder.parent} is damaged: {'; '.join(problems)}. The damaged files are "
            f"kept in {folder / DAMAGED}. Rerun with --restart to keep this folder under another name and "
            "start the run over.")
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


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The network of a run folder with the weights of its newest readable checkpoint, in eval mode,
    and the run's resolved config. Its BN statistics are those of the run's eval.bn_stats, precise ones
    where the checkpoint holds them. Reads only: damaged files stay where they are."""
    from repro.precise_bn import apply_chosen_statistics
    from repro.spec import validate

    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise ReproError(f"{run_dir} is not a run folder: it has no {CONFIG}")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        raise ReproError(f"{config_path}: not valid YAML ({error})") from None
    state = load_checkpoint(run_dir / CHECKPOINTS, map_location=device)
    if state is None:
        raise ReproError(f"{run_dir} has no checkpoint in {run_dir / CHECKPOINTS}")
    spec = validate(config, str(config_path))
    model = spec.model.build()
    model.load_state_dict(state["model"])
    apply_chosen_statistics(model, state, spec.eval.bn_stats)
    return model.to(device).eval(), config
