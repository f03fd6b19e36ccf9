"""Using the trained networks beyond the comparison tables: the test protocols of a finished run
(`repro evaluate`, Table 4's multi-scale test of Sec. 3.4), fine-tuning on a class-folder dataset
(`repro finetune`) and prediction on image files (`repro predict`).

This module names the files they add to a run folder; it imports nothing, so the reports read it freely.
"""
from __future__ import annotations

from pathlib import Path

# `repro evaluate` writes RUN/evaluations/<protocol>.json beside final.json, never over it.
EVALUATIONS = "evaluations"
PROTOCOLS = ("center", "ten_crop", "multi_scale")
# `repro finetune --strategy`: which weights train (experiments/finetune/<strategy>.yaml)
STRATEGIES = ("head", "last_stage", "all")


def evaluation_path(run_dir: str | Path, protocol: str) -> Path:
    return Path(run_dir) / EVALUATIONS / f"{protocol}.json"
