"""`repro run-all` (what `./run_all.sh` runs): every run of the paper's suite, then its figures and tables.

experiments/suite.yaml says which specs feed which figure or table and how many seeds each gets; a
run is one (spec, seed), trained by one `repro train` command. That command resumes an unfinished
run and does nothing for a finished one, so run-all can be stopped and started again at any time.
This module reads the options and plans the runs; repro/local.py runs them on this machine and
repro/slurm.py submits them to Slurm.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from repro.errors import DataError, ReproError, SpecError

# Modules that import torch or pandas are imported where they are used: `repro --help` builds this
# module's parser and should not wait for them.

PYTHON = sys.executable  # every child process and job runs this interpreter, with this package
REPRO = [PYTHON, "-m", "repro"]
DATASETS = ("cifar10", "imagenet")
DATA_FLAGS = {"cifar10": "--data-cifar", "imagenet": "--data-imagenet"}
GET_DATA = "README.md, section 'Getting the data'"


def add_run_all_arguments(parser: argparse.ArgumentParser) -> None:
    from repro.slurm import add_slurm_arguments

    parser.description = ("Train every run of the paper's suite (finished runs are skipped, unfinished ones "
                          "resume), then write its figures and tables.")
    mode = parser.add_argument_group("mode (default: --smoke)")
    mode.add_argument("--smoke", action="store_true",
                      help="the suite shrunk by the suite file's `smoke` section, on the CPU and generated "
                           "data, into results/smoke (with --slurm: as Slurm jobs)")
    mode.add_argument("--local", action="store_true", help="the full suite on this machine's CUDA GPUs")
    mode.add_argument("--slurm", action="store_true", help="submit the suite to Slurm (options below)")
    common = parser.add_argument_group("what to run")
    common.add_argument("--dry-run", action="store_true", help="print what would run where, and write nothing")
    common.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="only specs whose name matches (fnmatch, e.g. 'cifar_resnet*'); repeatable or "
                             "comma-separated")
    common.add_argument("--extras", action="store_true", help="also the suite's extras (Table 3's other nets)")
    common.add_argument("--seeds", type=_positive_int, metavar="N",
                        help="seeds 0..N-1 of every spec (default: the suite file's count per dataset)")
    common.add_argument("--suite", default="experiments/suite.yaml", help="suite file (default: %(default)s)")
    common.add_argument("--results", help="results folder (default: results; with --smoke, results/smoke)")
    common.add_argument("--data-cifar", metavar="DIR",
                        help="the folder holding cifar-10-batches-py (default: $REPRO_DATA; --smoke: generated)")
    common.add_argument("--data-imagenet", metavar="DIR",
                        help="the folder holding train/ and val/ (default: $REPRO_DATA/imagenet; --smoke: "
                             "generated)")
    local = parser.add_argument_group("--local")
    local.add_argument("--gpus", type=_gpu_list, help="GPU indices to use, e.g. 0,1 (default: all visible)")
    local.add_argument("--per-gpu", type=_positive_int, default=1, metavar="N",
                       help="CIFAR runs sharing one GPU at a time (default: 1)")
    add_slurm_arguments(parser)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _gpu_list(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1,3, got {text!r}") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative GPU indices, got {text!r}")
    return gpus


# --- the plan: which runs, with which data ---------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One (spec, seed) of the suite."""
    name: str
    dataset: str
    seed: int
    spec_path: Path
    folder: Path  # <results>/runs/<name>/seed<K>
    depth: int  # training time grows with depth: the deepest runs start first, so the pool ends sooner

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}"

    @property
    def log(self) -> Path:
        return self.folder.with_suffix(".out")  # the output of every start, appended, beside the run folder

    def state(self) -> str:
        from repro.run_folder import RunFolder

        folder = RunFolder(self.folder)
        return "finished" if folder.finished() else "resume" if folder.checkpoints.is_dir() else "start"


@dataclass(frozen=True)
class Plan:
    runs: list[Run]  # CIFAR-10 first, then ImageNet; the deepest first within a dataset
    suite: Path
    results: Path
    smoke: bool
    data: dict[str, Path]  # the data folder of each dataset that `runs` trains on
    make_data: dict[str, list[str]]  # --smoke: the `repro make-data` command of each data folder missing
    overrides: dict[str, list[str]]  # --smoke: KEY=VALUE overrides by dataset or spec name

    def pending(self, dataset: str) -> list[Run]:
        return [run for run in self.runs if run.dataset == dataset and run.state() != "finished"]

    def train_arguments(self, run: Run) -> list[str]:
        """`repro`'s arguments that train (or resume) `run`."""
        sets = [a for assignment in run_overrides(self.overrides, run.dataset, run.name) for a in ("--set", assignment)]
        return ["train", str(run.spec_path), "--seed", str(run.seed), "--data", str(self.data[run.dataset]),
                "--results", str(self.results), *sets]

    def report_arguments(self) -> list[tuple[str, list[str]]]:
        """(name, `repro` arguments) of each report; they only read the run folders."""
        which = ["--results", str(self.results), "--suite", str(self.suite)]
        reports = [("complexity", ["complexity", "--out", str(self.results / "tables")])]
        if "cifar10" in self.data:  # Fig. 7 is about CIFAR-10 nets only
            reports.append(("responses", ["responses", *which, "--data", str(self.data["cifar10"])]))
        return reports + [("report", ["report", *which, *(["--smoke"] if self.smoke else [])])]


def make_plan(args: argparse.Namespace) -> Plan:
    """Every run the options select, and the data each dataset trains on. Reads only: real data is
    checked now, generated data is made later (make_missing_data) where it is missing."""
    from repro.reports.runs import read_suite
    from repro.run_folder import run_path
    from repro.spec import load_spec, parse_overrides

    suite_path = Path(args.suite)
    suite = read_suite(suite_path, smoke=args.smoke)
    smoke = smoke_section(suite_path) if args.smoke else {"overrides": {}}
    # absolute paths: the commands and job scripts work from any folder
    results = Path(args.results or ("results/smoke" if args.smoke else "results")).absolute()
    index = {name: path.absolute() for name, path in spec_index(suite_path.parent).items()}
    overrides = {key: override_assignments(mapping or {}) for key, mapping in smoke["overrides"].items()}
    unknown = sorted(set(overrides) - set(DATASETS) - set(index))
    if unknown:
        raise SpecError(f"{suite_path}: smoke: overrides: {', '.join(unknown)} is neither a dataset "
                        f"({', '.join(DATASETS)}) nor a spec name")
    runs = []
    for name in select_names(suite, args.only, args.extras):
        if name not in index:
            raise SpecError(f"{suite_path} names the spec {name!r}, but no {suite_path.parent}/*/*.yaml has "
                            f"`name: {name}`; the specs there are: {', '.join(sorted(index))}")
        dataset = load_spec(index[name]).data.dataset
        # with the overrides too, so that a wrong key in the suite's smoke section stops us here
        spec = load_spec(index[name], parse_overrides(run_overrides(overrides, dataset, name),
                                                      f"{suite_path}: smoke: overrides"))
        if not args.seeds and dataset not in suite.seeds:
            raise SpecError(f"{suite_path}: {'smoke: ' if args.smoke else ''}seeds: no count for {dataset}")
        for seed in range(args.seeds or suite.seeds[dataset]):
            folder = run_path(results, spec.model_copy(update={"seed": seed}))
            runs.append(Run(name, dataset, seed, index[name], folder, spec.model.depth))
    runs.sort(key=lambda run: (DATASETS.index(run.dataset), -run.depth))  # stable: then suite order, seed
    data, make_data = {}, {}
    for dataset in dict.fromkeys(run.dataset for run in runs):
        given = {"cifar10": args.data_cifar, "imagenet": args.data_imagenet}[dataset]
        if args.smoke and not given:
            data[dataset] = results / "data" / dataset
            if dataset not in smoke["data"]:
                raise SpecError(f"{suite_path}: smoke: data: no sizes for {dataset} (options of repro make-data)")
            if not data[dataset].exists():
                sizes = [a for key, value in smoke["data"][dataset].items() for a in (f"--{key}", str(value))]
                make_data[dataset] = ["make-data", dataset, "--out", str(partial_folder(data[dataset])), *sizes]
        else:
            data[dataset] = check_data(dataset, given)
    return Plan(runs, suite_path.absolute(), results, args.smoke, data, make_data, overrides)


def spec_index(experiments: Path) -> dict[str, Path]:
    """Spec name -> file, over experiments/*/*.yaml; files without a `name` are base files."""
    index: dict[str, Path] = {}
    for path in sorted(experiments.glob("*/*.yaml")):
        try:
            mapping = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise SpecError(f"{path}: not valid YAML: {error}") from None
        name = mapping.get("name") if isinstance(mapping, dict) else None
        if name is None:
            continue
        if name in index:
            raise SpecError(f"{path} and {index[name]} both define the spec {name!r}; names must be unique "
                            "(they name the run folders)")
        index[name] = path
    return index


def smoke_section(suite_path: Path) -> dict:
    """The suite file's `smoke` mapping: `data` (make-data's options) per dataset, and `overrides` per
    dataset or spec name."""
    section = (yaml.safe_load(suite_path.read_text()) or {}).get("smoke")
    if not isinstance(section, dict) or not all(isinstance(section.get(k), dict) for k in ("data", "overrides")):
        raise SpecError(f"{suite_path}: smoke: expected a mapping with `data` and `overrides` per dataset")
    return section


def run_overrides(overrides: dict[str, list[str]], dataset: str, name: str) -> list[str]:
    """A run's overrides: its dataset's, then its spec's (which win)."""
    return overrides.get(dataset, []) + overrides.get(name, [])


def override_assignments(overrides: dict) -> list[str]:
    """{"optim.lr_milestones": [46, 70]} -> ["optim.lr_milestones=[46, 70]"], for `--set` (JSON is YAML)."""
    return [f"{key}={value if isinstance(value, str) and yaml.safe_load(value) == value else json.dumps(value)}"
            for key, value in overrides.items()]


def select_names(suite, patterns: list[str], extras: bool) -> list[str]:
    """The figures' and tables' specs (and the extras), once each in suite order, filtered by --only."""
    listed = [name for names in (*suite.figures.values(), *suite.tables.values()) for name in names]
    names = list(dict.fromkeys(listed + (suite.extras if extras else [])))
    patterns = [p.strip() for text in patterns for p in text.split(",") if p.strip()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            hint = " (it matches extras: add --extras)" if fnmatch.filter(suite.extras, pattern) else ""
            raise ReproError(f"--only {pattern!r} matches no spec of {suite.path}{hint}; its specs are: "
                             f"{', '.join(names)}")
    return [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def check_data(dataset: str, given: str | None) -> Path:
    """The dataset's folder, from its flag or $REPRO_DATA, checked before anything starts."""
    flag, shared = DATA_FLAGS[dataset], os.environ.get("REPRO_DATA")
    if not given and not shared:
        raise DataError(f"no {dataset} folder: pass {flag} DIR or export REPRO_DATA=DIR (how to get the data: "
                        f"{GET_DATA}); --smoke trains on generated data instead")
    root = Path(given or (shared if dataset == "cifar10" else Path(shared) / "imagenet")).expanduser().absolute()
    source = flag if given else "$REPRO_DATA"
    if dataset == "imagenet":
        from repro.data.imagenet import check_imagenet_root

        try:
            check_imagenet_root(root)
        except DataError as error:
            raise DataError(f"{error} (the folder came from {source}; see {GET_DATA})") from None
    else:
        from repro.data.cifar import CIFAR_DIRNAME, TRAIN_FILES

        # as load_cifar10: the folder holding cifar-10-batches-py, or that folder itself
        if not any((folder / TRAIN_FILES[0]).is_file() for folder in (root, root / CIFAR_DIRNAME)):
            raise DataError(f"CIFAR-10 not found: no {root / CIFAR_DIRNAME / TRAIN_FILES[0]} (the folder came "
                            f"from {source}). Download the python version and unpack it into {root} "
                            f"({GET_DATA}), or pass {flag} DIR; --smoke trains on generated data instead")
    return root


def partial_folder(folder: Path) -> Path:
    return folder.with_name(folder.name + ".partial")


def make_missing_data(plan: Plan) -> None:
    """--smoke: write the generated datasets that are missing, each into a partial folder renamed when
    complete, so that an interrupted one is made again."""
    for dataset, arguments in plan.make_data.items():
        shutil.rmtree(partial_folder(plan.data[dataset]), ignore_errors=True)
        log = plan.results / "logs" / f"make-data-{dataset}.out"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"making generated {dataset} data in {plan.data[dataset]} (output: {log})", flush=True)
        with open(log, "w") as output:
            code = subprocess.run(REPRO + arguments, stdout=output, stderr=subprocess.STDOUT).returncode
        if code:
            raise DataError(f"`{shlex.join(REPRO + arguments)}` failed with exit code {code}; see {log}")
        partial_folder(plan.data[dataset]).rename(plan.data[dataset])


def print_start(plan: Plan, dry_run: bool) -> None:
    """The data that will be made (with --dry-run) and the runs skipped because they are finished."""
    for dataset, arguments in plan.make_data.items() if dry_run else ():
        print(f"{'make data':11s} {dataset:28s} {shlex.join(REPRO + arguments)}")
    for run in plan.runs:
        if run.state() == "finished":
            print(f"{'skip':11s} {run.label:28s} finished: {run.folder / 'final.json'} exists")


def run_all(args: argparse.Namespace) -> int:
    """`repro run-all`; returns the exit code: 0 all done, 1 something failed, 75 stopped early."""
    if args.local and (args.smoke or args.slurm):
        raise ReproError("--local trains the full suite on this machine's GPUs; it combines with neither "
                         "--smoke nor --slurm")
    if not (args.local or args.slurm):
        args.smoke = True
    # what the machine lacks is the first thing to say, before anything about the data
    if args.slurm:
        from repro.slurm import check_sbatch, submit_plan

        if not args.dry_run:
            check_sbatch()
        return submit_plan(make_plan(args), args)
    from repro.local import local_gpus, run_locally

    gpus = local_gpus(args.gpus) if args.local else []
    return run_locally(make_plan(args), gpus, args.per_gpu, args.dry_run)
