"""Checkpoints that survive being killed at any moment: written atomically, the previous one kept."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

LATEST, PREVIOUS = "last.pt", "prev.pt"


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file, flush it to disk, then rotate: last -> prev, new -> last. A kill at
    any point leaves at least one complete checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{LATEST}.partial"
    with open(partial, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if (folder / LATEST).exists():
        os.replace(folder / LATEST, folder / PREVIOUS)
    os.replace(partial, folder / LATEST)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(folder: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest readable checkpoint, or None when there is none. A truncated or unreadable latest
    checkpoint is reported and the previous one used."""
    for name in (LATEST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            # our own files: they hold RNG states (numpy arrays), which weights_only cannot read
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as error:
            print(f"warning: checkpoint {path} is unreadable ({type(error).__name__}: {error}); "
                  "trying the previous one", file=sys.stderr)
    return None


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The network of a run folder with the weights of its newest readable checkpoint, in eval mode,
    and the run's resolved config."""
    from repro.errors import ReproError
    from repro.spec import validate

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ReproError(f"{run_dir} is not a run folder: it has no config.yaml")
    config = yaml.safe_load(config_path.read_text())
    state = load_checkpoint(run_dir / "checkpoints", map_location=device)
    if state is None:
        raise ReproError(f"{run_dir} has no readable checkpoint in {run_dir / 'checkpoints'}")
    model = validate(config, str(config_path)).model.build()
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config
