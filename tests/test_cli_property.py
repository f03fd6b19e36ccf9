"""Property: whatever a user types, every command either runs or exits 2 with one line under 300
characters: never a traceback, never a hang, and nothing written for a refused input (issue 20).

Hypothesis throws generated spec values, `--set` strings and command lines at `repro train`,
`evaluate`, `predict`, `bench`, `make-data`, `report` and `check`, each called in this process
(`repro.cli.main`) inside a fresh folder. To stay within seconds, what could run for long is pinned
first on the command line (a tiny spec, one benchmark step, two generated images, no training burst)
and the generated integers stay small: the refusals are what is searched, and every run is short.
`run.compile` and `run.cuda_graphs` are never generated (a CPU compile takes minutes, and both are
valid), nor `data.download` (it would reach for the network).
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from repro.cli import main
from repro.data.generated import write_cifar10, write_imagenet
from repro.spec import Spec

ROOT = Path(__file__).resolve().parents[1]
SECONDS_PER_INPUT = 120  # far above any input here (a few seconds at most): beyond it, a hang
# Exit codes of a command that ran: 0; 3, a run whose generated learning rate made it diverge; 1, a
# `repro check` item that fails on this machine (no GPU, no data).
RAN = {"train": (0, 3), "check": (0, 1)}
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NOT_GENERATED = ("run.compile", "run.cuda_graphs", "data.download")


def dotted_keys(mapping: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        keys += dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


KEYS = [k for k in dotted_keys(Spec(name="x").to_dict()) if k not in NOT_GENERATED] + ["finetune.source", "model"]

# Values as a careless or hostile user writes them, small where a valid value would make work.
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
values = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.sampled_from([10**29, -2**63, 2**32, 0.5]),
                   st.floats(allow_nan=True, allow_infinity=True, width=32), text,
                   st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(text, st.integers(-1, 3), max_size=2))
yaml_texts = st.one_of(text, st.sampled_from([
    "a: &a [1, 2]\nb: *a\n", "name: x\nname: y\n", "name: !!python/object:os.system x\n", "\t- x", "[" * 200,
    "base: /\n", "base: base.yaml\n", "optim: 5\noptim.lr: 1\n", "name: x\nmodel: {depth: 8e0}\n"]))


def nested(key: str, value) -> dict:
    *parents, leaf = key.split(".")
    node = {leaf: value}
    for parent in reversed(parents):
        node = {parent: node}
    return node


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"an input took more than {SECONDS_PER_INPUT} s")


def files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def check_answer(argv: list[str], ran: tuple[int, ...] = (0,)) -> None:
    """Call `repro ARGV` in a fresh folder: it ran, or it refused on one line and wrote nothing."""
    with tempfile.TemporaryDirectory() as scratch:
        here = os.getcwd()
        os.chdir(scratch)
        err, out = io.StringIO(), io.StringIO()
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(SECONDS_PER_INPUT)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    code = main(argv)
                except SystemExit as exit:
                    code = exit.code
            written = files(Path(scratch))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            os.chdir(here)
    message = err.getvalue()
    if code == 2:
        assert message.count("\n") == 1 and message.endswith("\n"), f"{argv!r}: not one line: {message!r}"
        assert len(message) < 300 and message.startswith("repro"), f"{argv!r}: {message!r}"
        assert not written, f"{argv!r} was refused but wrote {sorted(written)[:5]}"
    else:
        assert code in ran, f"{argv!r} exited {code}: {message[-2000:]!r}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("property")
    cifar = write_cifar10(folder / "cifar", n_train=32, n_test=16)
    imagenet = write_imagenet(folder / "imagenet", classes=2, n_train=2, n_val=1, short_side=(40, 48))
    tiny = folder / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(tiny_spec(cifar)))
    (folder / "base.yaml").write_text((ROOT / "experiments" / "cifar10" / "base.yaml").read_text())
    return {"cifar": cifar, "imagenet": imagenet, "tiny": tiny, "folder": folder}


def tiny_spec(cifar: Path) -> dict:
    """ResNet-8, 2 iterations of 32 generated images."""
    return {"base": str(ROOT / "experiments" / "cifar10" / "base.yaml"), "name": "tiny", "model": {"depth": 8},
            "data": {"root": str(cifar), "verify_checksums": False, "eval_batch_size": 16},
            "optim": {"batch_size": 32, "max_iters": 2, "lr_milestones": [1]},
            "run": {"device": "cpu", "progress": "log"}}


def merged(base: dict, override: dict) -> dict:
    result = dict(base)
    for key, value in override.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) \
            else value
    return result


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=3), st.one_of(st.none(), yaml_texts))
def test_generated_spec_values(data, assignments, raw):
    spec = dict(tiny_spec(data["cifar"]))
    for key, value in assignments:
        spec = merged(spec, nested(key, value))
    path = data["folder"] / "generated.yaml"
    try:
        text = yaml.safe_dump(spec) if raw is None else raw
    except yaml.YAMLError:
        return
    path.write_text(text)
    check_answer(["train", str(path)], RAN["train"])


@SETTINGS
@given(st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), text),
                          st.builds(lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}",
                                    st.sampled_from(KEYS), values),
                          text), min_size=1, max_size=3))
def test_generated_set_strings(data, assignments):
    check_answer(["train", str(data["tiny"]), *(a for s in assignments for a in ("--set", s))], RAN["train"])


paths = st.one_of(text, st.sampled_from(["", ".", "missing/deeper", "x.png", "results", "FILE", "DATA"]))
numbers = st.one_of(st.integers(-3, 3).map(str), st.sampled_from(["", "x", "1.5", "1e3", "-0", " 2", "99999999999"
                                                                   "9999999999999999999"]))
devices = st.one_of(text, st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:x", "gpu", "CPU"]))
OPTIONS = {  # command -> (arguments pinned first, {option: its values})
    "train": (["TINY"], {"--seed": numbers, "--results": paths, "--data": paths, "--restart": None}),
    "evaluate": (["RUN"], {"--protocol": text, "--device": devices, "--workers": numbers,
                           "--max-batch-pixels": numbers, "--data": paths}),
    "predict": (["--from", "RUN", "x.png"], {"--top": numbers, "--grid": paths, "--device": devices, "--data": paths}),
    "bench cifar": (["--specs", "TINY", "--steps", "1", "--warmup", "0", "--rounds", "1", "--batch-size", "2",
                     "--switches", "eager_fp32"], {"--device": devices, "--steps": numbers, "--rounds": numbers,
                                                   "--warmup": numbers, "--batch-size": numbers, "--out": paths}),
    "bench imagenet-data": (["--data", "IMAGENET", "--rounds", "1", "--steps", "1", "--workers", "0"],
                            {"--workers": numbers, "--rounds": numbers, "--steps": numbers, "--out": paths,
                             "--data": paths}),
    "make-data cifar10": (["--out", "out", "--train", "2", "--test", "2"],
                          {"--out": paths, "--train": numbers, "--test": numbers, "--seed": numbers, "--force": None,
                           "--classes": numbers}),
    "make-data imagenet": (["--out", "out", "--classes", "2", "--train", "1", "--val", "1"],
                           {"--out": paths, "--classes": numbers, "--train": numbers, "--val": numbers,
                            "--seed": numbers}),
    "report": ([], {"--results": paths, "--out": paths, "--suite": paths, "--smoke": None}),
    "check": (["--no-burst"], {"--results": paths, "--out": paths, "--seeds": numbers, "--only": text,
                               "--suite": paths, "--local": None}),
}


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(OPTIONS)))
    pinned, options = OPTIONS[command]
    argv = command.split() + list(pinned)
    for option in draw(st.lists(st.sampled_from(sorted(options)), max_size=3)):
        argv += [option] if options[option] is None else [option, draw(options[option])]
    if draw(st.booleans()):
        argv.insert(draw(st.integers(1, len(argv))), draw(text))  # a stray word anywhere
    return argv


@SETTINGS
@given(command_lines())
def test_generated_command_lines(data, argv):
    with tempfile.NamedTemporaryFile() as a_file:
        real = {"TINY": str(data["tiny"]), "IMAGENET": str(data["imagenet"]), "DATA": str(data["cifar"]),
                "RUN": str(data["folder"] / "no-such-run"), "FILE": a_file.name}
        argv = [real.get(a, a) for a in argv]
        check_answer(argv, RAN.get(argv[0], (0,)))
