"""Command line: `repro <command>` (also `python -m repro <command>`)."""
from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repro", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("models", help="list the registered networks with their parameter counts")
    p.set_defaults(func=cmd_models)

    p = commands.add_parser("complexity", help="write the params/FLOPs table (CSV, Markdown, LaTeX)")
    p.add_argument("--out", default="results/tables", help="output folder (default: results/tables)")
    p.set_defaults(func=cmd_complexity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ReproError as error:
        print(f"repro {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
