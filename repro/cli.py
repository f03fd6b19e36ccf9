"""Command line: `repro <command>` (also `python -m repro <command>`)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from repro.arguments import (MAX_IMAGES, MAX_WORKERS, at_least, device, existing_folder, output_folder, path,
                             seconds, seed)
from repro.contract import EXIT_USAGE
from repro.errors import ReproError


def cmd_models(args: argparse.Namespace) -> None:
    from repro.complexity import count_parameters
    from repro.models import build_model, registered_models

    for name in registered_models():
        print(f"{name:22s} {count_parameters(build_model(name)):>13,d} params")


def cmd_complexity(args: argparse.Namespace) -> None:
    from repro.complexity import write_complexity

    for path in write_complexity(args.out):
        print(path)


def cmd_train(args: argparse.Namespace) -> int:
    from repro.engine import train
    from repro.spec import load_spec, merge, parse_overrides

    overrides = parse_overrides(args.set)
    if args.seed is not None:
        overrides = merge(overrides, {"seed": args.seed})
    spec = load_spec(args.spec, overrides)
    return train(spec, Path(args.results), args.data, restart=args.restart)


# `repro make-data`: the size options of each dataset, with their defaults
MAKE_DATA_SIZES = {"cifar10": {"train": 50_000, "test": 10_000}, "imagenet": {"classes": 10, "train": 100, "val": 20}}


def _clear_make_data_target(dataset: str, out: Path, force: bool) -> None:
    """Refuse to write over existing files (a real dataset, perhaps) unless `force`, which removes them
    first, so that no file of an older dataset stays behind."""
    from repro.data.cifar import CIFAR_DIRNAME

    for target in [out / CIFAR_DIRNAME] if dataset == "cifar10" else [out / "train", out / "val"]:
        if not target.exists() or (target.is_dir() and not any(target.iterdir())):
            continue
        if not force:
            raise ReproError(f"{target} already exists and is not empty (it may hold a real dataset); choose "
                             "another --out, or pass --force to replace it")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:  # a file, or a link: the link goes, never the files it points to
            target.unlink()


def cmd_make_data(args: argparse.Namespace) -> None:
    sizes = dict(MAKE_DATA_SIZES[args.dataset])
    for option in ("train", "test", "val", "classes"):
        value = getattr(args, option)
        if value is None:
            continue
        if option not in sizes:
            raise ReproError(f"--{option} does not apply to {args.dataset}, which takes "
                             f"{', '.join('--' + name for name in sizes)}")
        sizes[option] = value
    _clear_make_data_target(args.dataset, Path(args.out), args.force)
    if args.dataset == "cifar10":
        from repro.data.generated import write_cifar10

        path = write_cifar10(args.out, n_train=sizes["train"], n_test=sizes["test"], seed=args.seed)
    else:
        from repro.data.generated import write_imagenet

        path = write_imagenet(args.out, classes=sizes["classes"], n_train=sizes["train"], n_val=sizes["val"],
                              seed=args.seed)
    print(path)


def cmd_bench(args: argparse.Namespace) -> None:
    if args.target == "cifar" and args.processes:
        from repro.bench_cifar import DEFAULT_SPECS, bench_shared, write_bench

        if len(args.specs or DEFAULT_SPECS) != 1:
            raise ReproError("--processes times one spec: name it with --specs")
        frame = bench_shared((args.specs or DEFAULT_SPECS)[0], args.processes, device=args.device,
                             batch_size=args.batch_size, warmup_steps=args.warmup, steps=args.steps)
        print(frame[["spec", "processes", "images_per_second", "speedup_vs_one_process"]].to_string(index=False))
        print(write_bench(frame, args.out, "cifar_shared"))
    elif args.target == "cifar":
        from repro.bench_cifar import DEFAULT_SPECS, bench_cifar, write_bench

        frame = bench_cifar(args.specs or DEFAULT_SPECS, device=args.device, batch_size=args.batch_size,
                            warmup_steps=args.warmup, steps=args.steps, rounds=args.rounds, only=args.switches)
        print(frame[["spec", "switches", "images_per_second", "speedup_vs_eager_fp32", "warmup_seconds",
                     "auto_choice"]].to_string(index=False))
        print(write_bench(frame, args.out))
    elif args.target == "bf16":
        from repro.bench_cifar import BF16_SPECS, bf16_verdict, plot_precision_curves, precision_curves, write_bench

        curves = precision_curves(args.specs or BF16_SPECS, device=args.device, batch_size=args.batch_size,
                                  iterations=args.steps)
        path = write_bench(curves, args.out, "bf16_curves")
        print(path)
        print(plot_precision_curves(curves, path.with_suffix(".png")))
        print(bf16_verdict(curves))
    else:
        from repro.bench_imagenet import run_imagenet_data_bench

        print(run_imagenet_data_bench(args))


def cmd_report(args: argparse.Namespace) -> None:
    from repro.reports import make_report

    print(make_report(args.results, args.suite, args.out, smoke=args.smoke, extras=args.extras))


def cmd_responses(args: argparse.Namespace) -> None:
    from repro.reports.responses import compute_responses

    print(compute_responses(args.results, args.suite, args.data, out_dir=args.out, device=args.device))


def cmd_status(args: argparse.Namespace) -> int:
    from repro.reports.status import run_status_command

    return run_status_command(args)


class _Parser(argparse.ArgumentParser):
    """argparse, refusing on one line without the usage block, as every other bad input is refused."""

    def error(self, message: str) -> None:
        message = " ".join(message.split())
        if len(message) > 240:  # argparse quotes the value: a 1 MB one stays a short line
            message = message[:220] + "... (cut)"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="repro", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("models", help="list the registered networks with their parameter counts")
    p.set_defaults(func=cmd_models)

    p = commands.add_parser("complexity", help="write the params/FLOPs table (CSV, Markdown, LaTeX)")
    p.add_argument("--out", type=output_folder, default="results/tables",
                   help="output folder (default: results/tables)")
    p.set_defaults(func=cmd_complexity)

    p = commands.add_parser("train", help="train one run of a spec (resumes an unfinished one)")
    p.add_argument("spec", help="experiment spec (YAML)")
    p.add_argument("--seed", type=seed, help="seed (overrides the spec's); the run folder is seed<K>")
    p.add_argument("--data", help="dataset folder (default: the spec's data.root, then $REPRO_DATA)")
    p.add_argument("--results", type=output_folder, default="results", help="results folder (default: results)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set optim.lr=0.05 (repeatable)")
    p.add_argument("--restart", action="store_true",
                   help="start the run over, keeping its existing folder as seed<K>.restarted-<time>")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("make-data", help="write a generated dataset in the real on-disk format")
    p.add_argument("dataset", choices=("cifar10", "imagenet"))
    p.add_argument("--out", type=output_folder, required=True, help="output folder")
    p.add_argument("--train", type=at_least(1, MAX_IMAGES),
                   help="training images (cifar10: 50000; imagenet: per class, 100)")
    p.add_argument("--test", type=at_least(1, MAX_IMAGES), help="cifar10 test images (default 10000)")
    p.add_argument("--val", type=at_least(1, MAX_IMAGES), help="imagenet validation images per class (default 20)")
    p.add_argument("--classes", type=at_least(1, 1000), help="imagenet classes (default 10; at most ImageNet's 1000)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--force", action="store_true",
                   help="replace an existing dataset there (its files are deleted first)")
    p.set_defaults(func=cmd_make_data)

    p = commands.add_parser("bench", help="measure training or data-loading speed into results/bench/")
    p.add_argument("target", choices=("cifar", "bf16", "imagenet-data"),
                   help="cifar: training speed per switch; bf16: fp32 and bf16 loss curves side by side; "
                        "imagenet-data: data-loading speed per path")
    p.add_argument("--specs", nargs="+", metavar="SPEC",
                   help="cifar: the specs to time (default: ResNet-20, -56 and -110); bf16: the specs to "
                        "train (default: ResNet-110 and -1202)")
    p.add_argument("--processes", type=at_least(1, 64), nargs="+", metavar="N",
                   help="cifar: instead of the switches, N runs of one spec at once sharing the device "
                        "(auto's switches), aggregate images/s, for each N")
    p.add_argument("--switches", nargs="+", metavar="NAME",
                   help="cifar: only these candidates besides eager_fp32 (default: all that apply here)")
    p.add_argument("--batch-size", type=at_least(1, MAX_IMAGES), default=128,
                   help="cifar: images per iteration (default 128)")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--data", type=existing_folder,
                   help="imagenet-data: an ImageNet root (default: a generated stand-in)")
    p.add_argument("--workers", type=at_least(0, MAX_WORKERS), nargs="+", default=[1, 2],
                   help="imagenet-data: worker counts")
    p.add_argument("--steps", type=at_least(1), default=20,
                   help="iterations per timed round (cifar), iterations trained (bf16) or timed batches "
                        "(imagenet-data)")
    p.add_argument("--warmup", type=at_least(0), default=5, help="cifar: untimed iterations first (compilation)")
    p.add_argument("--rounds", type=at_least(1), default=5,
                   help="interleaved rounds of the candidates (cifar) or paths (imagenet-data); the median counts")
    p.add_argument("--out", type=output_folder, default="results/bench")
    p.set_defaults(func=cmd_bench)

    p = commands.add_parser("report", help="figures, tables and REPORT.md from the run folders (never trains)")
    p.add_argument("--results", type=path, default="results", help="results folder holding runs/ (default: results)")
    p.add_argument("--suite", default="experiments/suite.yaml", help="which runs feed which figure/table")
    p.add_argument("--out", type=output_folder, help="output folder (default: the results folder)")
    p.add_argument("--smoke", action="store_true", help="expect the smoke suite's seed counts")
    p.add_argument("--extras", action="store_true",
                   help="the suite's extras were asked for: their claims are NOT RUN, not NOT ASKED FOR, until run")
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("status", help="where each run of the suite stands: state, progress, errors, speed, "
                                           "ETA, Slurm jobs (only reads the run folders)")
    p.add_argument("--results", type=path,
                   help="results folder holding runs/ (default: results; with --smoke, results/smoke)")
    p.add_argument("--suite", default="experiments/suite.yaml", help="suite file (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="the smoke suite's runs (default folder results/smoke)")
    p.add_argument("--extras", action="store_true", help="also the suite's extras that have not started")
    p.add_argument("--slurm", action="store_true",
                   help="ask squeue for the suite's jobs (without it: when results/slurm/ holds runs lists)")
    p.add_argument("--watch", type=seconds, metavar="SECONDS",
                   help="redraw every SECONDS until Ctrl-C (in place on a terminal, plain lines otherwise)")
    p.add_argument("--json", action="store_true", help="one JSON object (a line per redraw) instead of the table")
    p.set_defaults(func=cmd_status)

    p = commands.add_parser("responses", help="Fig. 7: std of each 3x3 layer's response, from final checkpoints")
    p.add_argument("--results", type=path, default="results")
    p.add_argument("--suite", default="experiments/suite.yaml")
    p.add_argument("--data", help="CIFAR-10 folder (default: each run's data.root, then $REPRO_DATA)")
    p.add_argument("--device", type=device, default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--out", type=output_folder, help="output folder (default: the results folder)")
    p.set_defaults(func=cmd_responses)

    from repro.suite.run_all import add_arguments as add_run_all_arguments, run_all

    p = commands.add_parser("run-all", help="train the paper's suite (smoke, local GPUs or Slurm), then report")
    add_run_all_arguments(p)
    p.set_defaults(func=run_all)

    from repro.check import add_arguments as add_check_arguments, run_check

    p = commands.add_parser("check", help="preflight: software, devices, data, disk, Slurm, a training burst, "
                                          "the suite's projected GPU-hours")
    add_check_arguments(p)
    p.set_defaults(func=run_check)

    from repro.reuse import commands as reuse

    p = commands.add_parser("evaluate", help="test a finished run's final network: center, 10-crop or Table 4's "
                                             "multi-scale test, into RUN/evaluations/")
    reuse.add_evaluate_arguments(p)
    p.set_defaults(func=reuse.run_evaluate)

    p = commands.add_parser("table4", help="Table 4's multi-scale test of every finished run of the suite's Table 4 "
                                           "networks not tested yet (run-all --extras runs it before the report)")
    reuse.add_table4_arguments(p)
    p.set_defaults(func=reuse.run_table4)

    p = commands.add_parser("finetune", help="fine-tune a trained network on a class-folder dataset (a new run folder)")
    reuse.add_finetune_arguments(p)
    p.set_defaults(func=reuse.run_finetune)

    p = commands.add_parser("predict", help="top-k classes of image files from a run's network, optionally a grid")
    reuse.add_predict_arguments(p)
    p.set_defaults(func=reuse.run_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ReproError as error:
        print(f"repro {args.command}: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", EXIT_USAGE)
