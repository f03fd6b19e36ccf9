"""The argument types every command's parser shares, so that one rule serves them all: a bad value is
refused by argparse (one line, exit 2) before a command starts, never met later as a traceback.

Nothing here imports torch: the parser is built on every call of `repro`.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

# The largest seed: numpy's generators and many others take 32-bit seeds; torch takes 64 bits.
MAX_SEED = 2**32 - 1
# The largest count a command takes: sizes beyond an int32 overflow numpy and torch.
MAX_COUNT = 2**31 - 1
MAX_WORKERS = 256  # data-loader processes: more than any machine has cores
MAX_IMAGES = 1_000_000  # `repro make-data` and `bench` sizes: a million CIFAR images are 3 GB in memory
# How a device is named in a spec (run.device) and on the command line (--device).
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,4})?")
DEVICES = "auto, cpu, cuda or cuda:N"
# The image files `repro predict --grid` writes (matplotlib's savefig, chosen by the suffix).
GRID_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
# Values quoted in an error message are cut to this many characters: a 1 MB value stays one short line.
SHOWN = 100


def shown(value: object) -> str:
    """repr(value), cut to SHOWN characters, for an error message."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN - 20]}...{text[-12:]} ({len(text):,} characters)"


def _whole_number(text: str, minimum: int, maximum: int) -> int:
    text = text.strip()
    number = int(text) if re.fullmatch(r"[+-]?[0-9]{1,30}", text) else None
    if number is None or number < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {shown(text)}")
    if number > maximum:
        raise argparse.ArgumentTypeError(f"expected a whole number from {minimum} to {maximum:,}, got {shown(text)}")
    return number


def at_least(minimum: int, maximum: int = MAX_COUNT):
    """A whole number of at least `minimum` (1 for counts of images, steps, rounds; 0 for workers), and at
    most `maximum`."""
    def count(text: str) -> int:
        return _whole_number(text, minimum, maximum)

    count.__name__ = "count"
    return count


def seed(text: str) -> int:
    """A seed: a whole number from 0 to MAX_SEED."""
    return _whole_number(text, 0, MAX_SEED)


def path(text: str) -> str:
    """A path: not empty (an empty one would silently mean the current folder)."""
    _path(text)
    return text


def _path(text: str) -> Path:
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {shown(text)}")
    return Path(text).expanduser()


def existing_folder(text: str) -> str:
    """A folder that exists."""
    path = _path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a folder" if path.exists()
                                         else f"no folder {shown(text)}")
    return text


def output_folder(text: str) -> str:
    """A folder that exists or can be made: no part of the path is a file."""
    path = _path(text)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise argparse.ArgumentTypeError(f"{shown(text)}: {shown(str(part))} is a file, not a folder")
            break
    return text


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N (whether it exists here is checked when it is used)."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected {DEVICES}, got {shown(text)}")
    return text


def grid_file(text: str) -> str:
    """An image file to write: its suffix says the format."""
    path = _path(text)
    if path.suffix.lower() not in GRID_FORMATS:
        raise argparse.ArgumentTypeError(f"{shown(text)}: the file name must end in one of "
                                         f"{', '.join(GRID_FORMATS)}, which says the image format")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{shown(text)} is a folder")
    output_folder(str(path.parent))
    return text


def seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {shown(text)}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {shown(text)}")
    return value
