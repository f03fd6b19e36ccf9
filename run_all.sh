#!/usr/bin/env bash
# Regenerate the paper's figures and tables.
#   ./run_all.sh [--smoke]   the whole suite shrunk to minutes on the CPU, on generated data (default)
#   ./run_all.sh --local     the full suite on this machine's GPUs
#   ./run_all.sh --slurm     the full suite submitted to a Slurm cluster
#   ./run_all.sh --test      the test suite
#   ./run_all.sh --check [--local|--slurm]   check this machine first (repro check): data, disk, GPUs,
#                            Slurm, a short training burst, and the suite's projected GPU-hours
#   ./run_all.sh --status [--smoke] [--watch S] [--json] [--slurm]   where each run stands (repro status)
#   ./run_all.sh --acceptance   prove and time the GPU path in at most 10 minutes on one H100
#                            (repro check --acceptance), into results/bench/acceptance-<device>/
# `./run_all.sh --help` lists every option. The Python used is $REPRO_PYTHON if set, else ./.venv if
# present, else the current python3 if it has the dependencies, else a new ./.venv made here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

has_dependencies() {
    "$1" -c 'import torch, torchvision, torchcodec, pandas, matplotlib, fvcore, yaml, tabulate, jinja2, pytest, hypothesis, repro' 2>/dev/null
}

find_python() {
    if [ -n "${REPRO_PYTHON:-}" ]; then
        has_dependencies "$REPRO_PYTHON" || { echo "run_all.sh: \$REPRO_PYTHON=$REPRO_PYTHON lacks the dependencies (pip install -e '.[test]')" >&2; exit 2; }
        echo "$REPRO_PYTHON"
    elif [ -x .venv/bin/python ] && has_dependencies .venv/bin/python; then
        echo .venv/bin/python
    elif command -v python3 >/dev/null && has_dependencies python3; then
        echo python3
    else
        echo "run_all.sh: setting up ./.venv (torch, torchvision and the project; a few minutes)" >&2
        python3 -m venv .venv >&2
        .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 >&2
        .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' >&2
        echo .venv/bin/python
    fi
}

PY=$(find_python)
if [ "${1:-}" = "--test" ]; then
    shift
    exec "$PY" -m pytest -q "$@"
fi
for argument in "$@"; do
    # --check, --acceptance (one of repro check's options) or --status, anywhere among the options: the
    # others go to repro check or repro status
    case "$argument" in
        --check|--acceptance) command=check; dropped=--check ;;
        --status) command=status; dropped=--status ;;
        *) continue ;;
    esac
    others=()
    for kept in "$@"; do [ "$kept" = "$dropped" ] || others+=("$kept"); done
    exec "$PY" -m repro "$command" ${others[@]+"${others[@]}"}
done
exec "$PY" -m repro run-all "$@"
