"""The networks of `repro evaluate`, `repro predict` and `repro responses`: a finished run's final network
(with the BN statistics its spec's `eval.bn_stats` chooses), and torchvision's ImageNet ResNets read from a
local file. How each network is built lives below the engine, in repro/run_network.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from repro.checkpoint import load_checkpoint
from repro.contract import CHECKPOINTS, CONFIG
from repro.errors import ReproError
from repro.precise_bn import apply_chosen_statistics
from repro.run_network import build_network, describe, final_state, load_weights, read_torchvision, run_spec
from repro.spec import ModelSpec, Spec


def load_network(run_dir: str | Path, device: str | torch.device = "cpu", *, final: bool = True,
                 bn_stats: str | None = None) -> tuple[nn.Module, Spec, dict]:
    """The network of a run folder in eval mode, its spec and its checkpoint: the final network of a
    finished run, or with final=False the newest checkpoint of any run. Fine-tuned networks included.
    Its BN statistics are those `bn_stats` names (default: the spec's eval.bn_stats), precise ones where
    the checkpoint holds them; the checkpoint's "bn_stats" says which are in use."""
    run_dir = Path(run_dir)
    if final:
        spec, _, state = final_state(run_dir, device)
    else:
        spec = run_spec(run_dir)
        state = load_checkpoint(run_dir / CHECKPOINTS, map_location=device)
        if state is None:
            raise ReproError(f"{run_dir} has no checkpoint in {run_dir / CHECKPOINTS}")
    model = build_network(spec, load_source=False)
    load_weights(model, state["model"], f"{run_dir / CHECKPOINTS}",
                 f"the network its {CONFIG} describes ({describe(spec.model)})")
    used = apply_chosen_statistics(model, state, bn_stats or spec.eval.bn_stats)
    return model.to(device).eval(), spec, {**state, "bn_stats": used}


def torchvision_network(path: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Our network holding torchvision's weights from `path` (its own 1000-way FC layer included)."""
    model_section, state = read_torchvision(path)
    model = ModelSpec(**model_section)
    network = model.build()
    load_weights(network, state, str(path), f"torchvision's {describe(model)}")
    return network, model
