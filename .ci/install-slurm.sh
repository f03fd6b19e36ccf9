#!/usr/bin/env bash
# Install a local Slurm (Debian's slurm-wlm) and munge, so the `slurm`-marked tests can start a
# one-node cluster (tests/slurm_cluster.py). CI runs this as root before the tests; it does nothing
# when slurmctld is already on PATH. The daemons are not configured here: the tests start their own
# munged, slurmctld and slurmd with configuration under a temporary folder.
set -euo pipefail

# /usr/sbin is often missing from a non-login PATH, and slurmctld/munged live there.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    echo "install-slurm.sh: slurmctld, slurmd and munged already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-slurm.sh: must run as root to apt-get install slurm-wlm munge (try: sudo $0)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "install-slurm.sh: installed $(slurmctld -V) and $(munged --version 2>&1 | head -n1)"
