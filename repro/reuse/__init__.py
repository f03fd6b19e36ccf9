"""Using the trained networks beyond the comparison tables: the test protocols of a finished run
(`repro evaluate`, Table 4's multi-scale test of Sec. 3.4), fine-tuning on a class-folder dataset
(`repro finetune`) and prediction on image files (`repro predict`).

This module names the files they add to a run folder and reads Table 4's; it imports nothing heavy, so the
reports read it freely.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from repro.paper import TABLE4_SCALES

# `repro evaluate` writes RUN/evaluations/<protocol>.json beside final.json, never over it.
EVALUATIONS = "evaluations"
PROTOCOLS = ("center", "ten_crop", "multi_scale")
# `repro finetune --strategy`: which weights train (experiments/finetune/<strategy>.yaml)
STRATEGIES = ("head", "last_stage", "all")


def evaluation_path(run_dir: str | Path, protocol: str) -> Path:
    return Path(run_dir) / EVALUATIONS / f"{protocol}.json"


def table4_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The multi-scale test a run folder holds, as `repro evaluate RUN --protocol multi_scale` wrote it; None
    when there is none at Table 4's scales with flips, or its file cannot be read (the command rewrites it)."""
    try:
        record = json.loads(evaluation_path(run_dir, "multi_scale").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or tuple(record.get("scales") or ()) != TABLE4_SCALES or not record.get("flips"):
        return None
    if not all(isinstance(record.get(k), (int, float)) for k in ("top1_error", "top5_error")):
        return None
    return record
