"""What `repro run-all` runs: the suite file, the runs that the options select, and the data each
dataset trains on.

experiments/suite.yaml says which specs feed which figure or table and how many seeds each gets; the
reports read it with `read_suite` too, so it has this one parser. A run is one (spec, seed), trained
by one `repro train` command, which resumes an unfinished run and does nothing for a finished one.
Nothing here imports torch or pandas: the CLI's parser and the reports import this module.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from repro.arguments import at_least, output_folder  # at_least: also the backends' parsers
from repro.contract import CHECKPOINTS, DATA_ENV, FINAL, data_root, run_path
from repro.errors import DataError, ReproError, SpecError

PYTHON = sys.executable  # every child process and job runs this interpreter, with this package
REPRO = [PYTHON, "-m", "repro"]
DATASETS = ("cifar10", "imagenet")  # the order the runs start in: CIFAR-10's are the shortest
DATA_FLAGS = {"cifar10": "--data-cifar", "imagenet": "--data-imagenet"}
GET_DATA = "README.md, section 'Getting the data'"
# PyYAML's safe loader in libyaml's C when PyYAML was built with it: the same documents, ten times faster
# (`repro status` reads a config.yaml per run folder)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- the suite file ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Suite:
    """experiments/suite.yaml: seeds per dataset, the spec names behind each figure and table, the
    extras run only when asked, and how its `smoke` section shrinks the suite."""

    path: Path
    seeds: dict[str, int]  # runs per spec, by dataset (read_suite(smoke=True): the smoke section's)
    figures: dict[str, list[str]]
    tables: dict[str, list[str]]
    extras: list[str] = field(default_factory=list)
    smoke_data: dict[str, dict[str, Any]] = field(default_factory=dict)  # `repro make-data` options by dataset
    smoke_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # spec keys by dataset or spec name

    def names(self, extras: bool = True) -> list[str]:
        """The specs of the figures and tables (and the extras), once each, in the order listed."""
        listed = [n for names in (*self.figures.values(), *self.tables.values()) for n in names]
        return list(dict.fromkeys(listed + (self.extras if extras else [])))

    def figure(self, key: str) -> list[str]:
        return self.figures.get(key, [])

    def table(self, key: str) -> list[str]:
        return self.tables.get(key, [])

    def seed_count(self, dataset: str) -> int:
        return self.seeds.get(dataset, 1)


def read_suite(path: str | Path, *, smoke: bool = False) -> Suite:
    """The suite file, checked; `smoke` takes the seed counts of its `smoke` section (the shrunk suite)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"suite file {path} does not exist; pass --suite experiments/suite.yaml "
                        "(or the path of your suite file)")
    try:
        mapping = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(mapping, dict):
        raise SpecError(f"{path}: a suite is a mapping with keys seeds, figures, tables, extras, smoke")

    def section(parent: dict, key: str, kind: type, where: str = "") -> Any:
        value = parent.get(key) or kind()
        if not isinstance(value, kind):
            raise SpecError(f"{path}: {where}{key}: expected a {kind.__name__}, got {type(value).__name__}")
        return value

    def seed_counts(counts: dict, where: str) -> dict[str, int]:
        for dataset, count in counts.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise SpecError(f"{path}: {where}seeds: {dataset}: expected a number of runs (at least 1), "
                                f"got {count!r}")
        return dict(counts)

    figures, tables = section(mapping, "figures", dict), section(mapping, "tables", dict)
    extras = section(mapping, "extras", list)
    for key, names in [*figures.items(), *tables.items(), ("extras", extras)]:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SpecError(f"{path}: {key}: expected a list of spec names, got {names!r}")
    seeds = seed_counts(section(mapping, "seeds", dict), "")
    shrunk = section(mapping, "smoke", dict)
    if smoke:
        if not isinstance(shrunk.get("seeds"), dict):
            raise SpecError(f"{path}: smoke: seeds: expected a mapping of dataset to seed count")
        seeds = seed_counts(shrunk["seeds"], "smoke: ")

    def per_name(key: str) -> dict[str, dict]:
        """smoke: data or overrides: a mapping for each dataset (or spec name)."""
        entries = section(shrunk, key, dict, "smoke: ")
        return {name: section(entries, name, dict, f"smoke: {key}: ") for name in entries}

    return Suite(path, seeds, figures, tables, extras, per_name("data"), per_name("overrides"))


def spec_index(experiments: Path) -> dict[str, Path]:
    """Spec name -> file, over experiments/*/*.yaml; files without a `name` are base files."""
    index: dict[str, Path] = {}
    for path in sorted(experiments.glob("*/*.yaml")):
        try:
            mapping = yaml.load(path.read_text(), Loader=SAFE_LOADER)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise SpecError(f"{path}: not valid YAML: {error}") from None
        name = mapping.get("name") if isinstance(mapping, dict) else None
        if name is None:
            continue
        if name in index:
            raise SpecError(f"{path} and {index[name]} both define the spec {name!r}; names must be unique "
                            "(they name the run folders)")
        index[name] = path
    return index


# --- the options that choose the runs --------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to run")
    group.add_argument("--dry-run", action="store_true", help="print what would run where, and write nothing")
    group.add_argument("--only", action="append", default=[], metavar="PATTERN",
                       help="only specs whose name matches (fnmatch, e.g. 'cifar_resnet*'); repeatable or "
                            "comma-separated")
    group.add_argument("--extras", action="store_true", help="also the suite's extras (Table 3's other nets)")
    group.add_argument("--seeds", type=at_least(1), metavar="N",
                       help="seeds 0..N-1 of every spec (default: the suite file's count per dataset)")
    group.add_argument("--suite", default="experiments/suite.yaml", help="suite file (default: %(default)s)")
    group.add_argument("--results", type=output_folder,
                       help="results folder (default: results; with --smoke, results/smoke)")
    group.add_argument("--tensorboard", action="store_true",
                       help="every run also writes TensorBoard events into its folder (run.tensorboard; needs the "
                            "optional extra: pip install 'repro[tensorboard]')")
    group.add_argument("--data-cifar", metavar="DIR",
                       help=f"the folder holding cifar-10-batches-py (default: ${DATA_ENV}; --smoke: generated)")
    group.add_argument("--data-imagenet", metavar="DIR",
                       help=f"the folder holding train/ and val/ (default: ${DATA_ENV}/imagenet; --smoke: "
                            "generated)")


# --- the plan: which runs, with which data -----------------------------------------------------------

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
        """finished (final.json is written last), resume (it has checkpoints) or start."""
        if (self.folder / FINAL).is_file():  # a folder of that name is damage, which `repro train` reports
            return "finished"
        return "resume" if (self.folder / CHECKPOINTS).is_dir() else "start"


@dataclass(frozen=True)
class Plan:
    runs: list[Run]  # CIFAR-10 first, then ImageNet; the deepest first within a dataset
    suite: Path
    results: Path
    smoke: bool
    data: dict[str, Path]  # the data folder of each dataset that `runs` trains on
    make_data: dict[str, list[str]]  # --smoke: the `repro make-data` arguments of each data folder missing
    overrides: dict[str, list[str]]  # --smoke: KEY=VALUE overrides by dataset or spec name
    tensorboard: bool = False  # --tensorboard: every run also writes TensorBoard events (run.tensorboard)
    extras: bool = False  # --extras: the extras are trained, and Table 4's networks tested after training

    def pending(self, dataset: str) -> list[Run]:
        return [run for run in self.runs if run.dataset == dataset and run.state() != "finished"]

    def train_arguments(self, run: Run) -> list[str]:
        """`repro`'s arguments that train (or resume) `run`."""
        assignments = run_overrides(self.overrides, run.dataset, run.name) + ["run.tensorboard=true"] * self.tensorboard
        sets = [a for assignment in assignments for a in ("--set", assignment)]
        return ["train", str(run.spec_path), "--seed", str(run.seed), "--data", str(self.data[run.dataset]),
                "--results", str(self.results), *sets]

    def report_arguments(self) -> list[tuple[str, list[str]]]:
        """(name, `repro` arguments) of each report; they only read the run folders."""
        which = ["--results", str(self.results), "--suite", str(self.suite)]
        reports = [("complexity", ["complexity", "--out", str(self.results / "tables")])]
        if "cifar10" in self.data:  # Fig. 7 is about CIFAR-10 nets only
            reports.append(("responses", ["responses", *which, "--data", str(self.data["cifar10"])]))
        if self.extras and "imagenet" in self.data:  # Table 4's test of every finished network it lists
            reports.append(("table4", ["table4", *which, "--data", str(self.data["imagenet"])]))
        return reports + [("report", ["report", *which, *(["--smoke"] if self.smoke else []),
                                      *(["--extras"] if self.extras else [])])]


def make_plan(options: argparse.Namespace) -> Plan:
    """Every run the options select, and the data each dataset trains on. Reads only: real data is
    checked now, generated data is made later (make_missing_data) where it is missing."""
    # Here, not above: reading a spec checks its model against repro.models, which imports torch.
    from repro.spec import load_spec, parse_overrides

    suite = read_suite(options.suite, smoke=options.smoke)
    if options.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ReproError("--tensorboard needs the optional extra `tensorboard`, which is not installed: "
                         "pip install 'repro[tensorboard]' (or pip install tensorboard)")
    # absolute paths: the commands and job scripts work from any folder
    results = Path(options.results or ("results/smoke" if options.smoke else "results")).absolute()
    index = {name: path.absolute() for name, path in spec_index(suite.path.parent).items()}
    overrides = ({key: override_assignments(mapping) for key, mapping in suite.smoke_overrides.items()}
                 if options.smoke else {})
    unknown = sorted(set(overrides) - set(DATASETS) - set(index))
    if unknown:
        raise SpecError(f"{suite.path}: smoke: overrides: {', '.join(unknown)} is neither a dataset "
                        f"({', '.join(DATASETS)}) nor a spec name")
    runs = []
    for name in select_names(suite, options.only, options.extras):
        if name not in index:
            raise SpecError(f"{suite.path} names the spec {name!r}, but no {suite.path.parent}/*/*.yaml has "
                            f"`name: {name}`; the specs there are: {', '.join(sorted(index))}")
        dataset = load_spec(index[name]).data.dataset
        # with the overrides too, so that a wrong key in the suite's smoke section stops us here
        spec = load_spec(index[name], parse_overrides(run_overrides(overrides, dataset, name),
                                                      f"{suite.path}: smoke: overrides"))
        if not options.seeds and dataset not in suite.seeds:
            raise SpecError(f"{suite.path}: {'smoke: ' if options.smoke else ''}seeds: no count for {dataset}")
        for seed in range(options.seeds or suite.seeds[dataset]):
            runs.append(Run(name, dataset, seed, index[name], run_path(results, spec.name, seed), spec.model.depth))
    runs.sort(key=lambda run: (DATASETS.index(run.dataset), -run.depth))  # stable: then suite order, seed
    data, make_data = {}, {}
    for dataset in dict.fromkeys(run.dataset for run in runs):
        given = {"cifar10": options.data_cifar, "imagenet": options.data_imagenet}[dataset]
        if options.smoke and not given:
            data[dataset] = results / "data" / dataset
            if dataset not in suite.smoke_data:
                raise SpecError(f"{suite.path}: smoke: data: no sizes for {dataset} (options of repro make-data)")
            if not data[dataset].exists():
                sizes = [a for key, value in suite.smoke_data[dataset].items() for a in (f"--{key}", str(value))]
                make_data[dataset] = ["make-data", dataset, "--out", str(partial_folder(data[dataset])), *sizes]
        else:
            data[dataset] = check_data(dataset, given)
    return Plan(runs, suite.path.absolute(), results, options.smoke, data, make_data, overrides,
                options.tensorboard, options.extras)


def run_overrides(overrides: dict[str, list[str]], dataset: str, name: str) -> list[str]:
    """A run's overrides: its dataset's, then its spec's (which win)."""
    return overrides.get(dataset, []) + overrides.get(name, [])


def override_assignments(overrides: dict) -> list[str]:
    """{"optim.lr_milestones": [46, 70]} -> ["optim.lr_milestones=[46, 70]"], for `--set`: a string that
    YAML reads back as itself stays as it is, any other value is written as JSON (which is YAML)."""
    return [f"{key}={value if reads_back(value) else json.dumps(value)}" for key, value in overrides.items()]


def reads_back(value: Any) -> bool:
    try:
        return isinstance(value, str) and yaml.safe_load(value) == value
    except yaml.YAMLError:
        return False


def select_names(suite: Suite, patterns: list[str], extras: bool) -> list[str]:
    """The figures' and tables' specs (and the extras), once each in suite order, filtered by --only."""
    names = suite.names(extras)
    patterns = [p.strip() for text in patterns for p in text.split(",") if p.strip()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            hint = " (it matches extras: add --extras)" if fnmatch.filter(suite.extras, pattern) else ""
            raise ReproError(f"--only {pattern!r} matches no spec of {suite.path}{hint}; its specs are: "
                             f"{', '.join(names)}")
    return [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def check_data(dataset: str, given: str | None) -> Path:
    """The dataset's folder, from its flag or $REPRO_DATA (contract.data_root), checked before anything
    starts."""
    flag, root = DATA_FLAGS[dataset], data_root(dataset, given)
    if root is None:
        raise DataError(f"no {dataset} folder: pass {flag} DIR or export {DATA_ENV}=DIR (how to get the data: "
                        f"{GET_DATA}); --smoke trains on generated data instead")
    root, source = root.absolute(), flag if given else f"${DATA_ENV}"
    # The loaders import torch: only a run on real data needs them here.
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
    """--smoke: write the generated datasets that are missing, each into a private temporary folder
    renamed into place when complete. An interrupted one leaves only its own temporary folder; a suite
    started beside this one writes its own, and the one that finishes second uses the first one's
    (the same sizes and seed make the same data)."""
    for dataset, arguments in plan.make_data.items():
        target = plan.data[dataset]
        log = plan.results / "logs" / f"make-data-{dataset}.out"
        log.parent.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
        out = arguments.index("--out") + 1
        command = REPRO + arguments[:out] + [str(private)] + arguments[out + 1:]
        try:
            if target.exists():  # made meanwhile by a suite started beside this one
                continue
            print(f"making generated {dataset} data in {target} (output: {log})", flush=True)
            with open(log, "a") as output:
                code = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode
            if code:
                raise DataError(f"`{shlex.join(command)}` failed with exit code {code}; see {log}")
            try:
                private.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(private, ignore_errors=True)


def print_start(plan: Plan, dry_run: bool) -> None:
    """The data that will be made (with --dry-run) and the runs skipped because they are finished."""
    for dataset, arguments in plan.make_data.items() if dry_run else ():
        print(f"{'make data':11s} {dataset:28s} {shlex.join(REPRO + arguments)}")
    for run in plan.runs:
        if run.state() == "finished":
            print(f"{'skip':11s} {run.label:28s} finished: {run.folder / FINAL} exists")
