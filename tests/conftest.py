"""Fixtures shared by the test files."""
from __future__ import annotations

import os

import pytest

from slurm_cluster import cluster_unavailable_reason, local_slurm_cluster


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A real one-node Slurm cluster (tests/slurm_cluster.py), skipped where it cannot run. The test's
    sbatch and squeue, and the jobs' scontrol (they inherit the environment), talk to it alone."""
    reason = cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with local_slurm_cluster(tmp_path / "cluster") as running:
        for key in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("SLURM_CONF", running.env["SLURM_CONF"])
        yield running
