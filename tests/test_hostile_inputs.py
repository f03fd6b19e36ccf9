"""Every input a one-line answer (issue 20): the hostile and careless inputs that gave a traceback, a
hang or a silent acceptance, each kept as a test. Most call `repro.cli.main` in this process."""
from __future__ import annotations

import json
import os
import pickle
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from repro import engine
from repro.checkpoint import load_checkpoint, read_checkpoint
from repro.run_network import load_run_model
from repro.cli import main
from repro.distributed import Processes
from repro.contract import CHECKPOINTS, DAMAGED, EXIT_OK, EXIT_PREEMPTED, FINAL, LATEST, METRIC_COLUMNS, PREVIOUS
from repro.data.generated import write_cifar10, write_imagenet
from repro.errors import DataError, ReproError
from repro.reports.runs import DAMAGED as RUN_DAMAGED, IN_PROGRESS, read_run
from repro.run_folder import RunFolder
from repro.schedule import LearningRate
from repro.spec import OptimSpec, load_spec, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
CIFAR_SPEC = ROOT / "experiments" / "cifar10" / "resnet20.yaml"
# ResNet-8 on 32 generated images, batch 32: one iteration an epoch.
TINY = ["model.depth=8", "run.device=cpu", "run.progress=log", "data.verify_checksums=false", "data.eval_batch_size=16",
        "optim.batch_size=32", "optim.max_iters=2", "optim.lr_milestones=[1]"]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`repro ARGV` in this process: its exit code (argparse's refusals included) and its stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *phrases: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and len(err) < 300 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, err


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=32, n_test=16)


@pytest.fixture(scope="module")
def small_imagenet(tmp_path_factory):
    """2 classes x 2 training images: fewer than one batch of 8."""
    return write_imagenet(tmp_path_factory.mktemp("imagenet"), classes=2, n_train=2, n_val=1, short_side=(40, 48))


# --- Medium 1: a YAML alias bomb, and the other things YAML lets a spec say ------------------------

def alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\nname: bomb\n"


@pytest.mark.parametrize("text, phrase", [
    (alias_bomb(9), "aliases (*name) are not allowed"),  # 9^9 strings once expanded: it hung `repro train`
    ("name: s\nname: t\n", "the key 'name' is given twice"),
    ("name: s\noptim: {max_iters: true}\n", "optim.max_iters: expected a number, got True"),
    ("name: s\ndata: {workers: -1}\n", "data.workers: Input should be greater than or equal to 0"),
    ("name: s\nseed: 100000000000000000000000000000\n", "seed: Input should be less than or equal to"),
    ("name: " + "x" * 1_000_000 + "!\n", "(1,000,003 characters)"),
], ids=["alias_bomb", "key_twice", "bool_as_number", "negative_workers", "huge_seed", "megabyte_name"])
def test_a_spec_that_cannot_be_meant_is_one_short_line(tmp_path, capsys, text, phrase):
    (tmp_path / "base.yaml").write_text((CIFAR_SPEC.parent / "base.yaml").read_text())
    spec = tmp_path / "spec.yaml"
    spec.write_text("base: base.yaml\n" + text)
    code, err = run_cli(["train", spec, "--results", tmp_path / "results"], capsys)
    assert_refused(code, err, phrase)
    assert not (tmp_path / "results").exists()


def test_a_bad_set_value_names_the_set_not_the_file(capsys, tmp_path):
    code, err = run_cli(["train", CIFAR_SPEC, "--results", tmp_path, "--set", "optim.lr=-1"], capsys)
    assert_refused(code, err, "repro train: error: --set: optim")
    assert str(CIFAR_SPEC) not in err


# --- shared argument types: every command refuses the same bad values the same way ------------------

@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


@pytest.mark.parametrize("argv, phrase", [
    (["evaluate", "RUN", "--workers", "-1"], "argument --workers: expected a whole number of at least 0"),
    (["evaluate", "RUN", "--device", "bogus"], "argument --device: expected auto, cpu, cuda or cuda:N"),
    (["evaluate", "RUN", "--max-batch-pixels", "0"], "argument --max-batch-pixels: expected a whole number"),
    (["bench", "imagenet-data", "--workers", "-1"], "argument --workers"),
    (["bench", "cifar", "--device", "bogus"], "argument --device"),
    (["bench", "cifar", "--rounds", "0"], "argument --rounds: expected a whole number of at least 1"),
    (["bench", "cifar", "--steps", "0"], "argument --steps: expected a whole number of at least 1"),
    (["bench", "cifar", "--out", "FILE"], "argument --out: 'FILE"),
    (["report", "--out", "FILE"], "argument --out"),
    (["check", "--results", "FILE", "--no-burst"], "argument --results"),
    (["train", CIFAR_SPEC, "--seed", str(10**29)], "argument --seed: expected a whole number from 0 to 4,294,967,295"),
    (["train", CIFAR_SPEC, "--results", ""], "argument --results: expected a path, got ''"),
    (["make-data", "cifar10", "--out", "OUT", "--seed", "-5"], "argument --seed"),
    (["make-data", "cifar10", "--out", "FILE"], "argument --out"),
    (["predict", "--from", "RUN", "x.png", "--grid", "x.xyz"], "argument --grid: 'x.xyz': the file name must end in"),
    (["predict", "--from", "RUN", "x.png", "--grid", "noextension"], "argument --grid"),
    (["predict", "--from", "RUN", "x.png", "--top", "0"], "argument --top"),
    (["responses", "--device", "gpu"], "argument --device"),
])
def test_bad_arguments_are_refused_by_the_shared_types(tmp_path, capsys, monkeypatch, a_file, argv, phrase):
    monkeypatch.chdir(tmp_path)
    argv = [str(a_file) if a == "FILE" else a for a in argv]
    code, err = run_cli(argv, capsys)
    assert_refused(code, err, phrase.replace("'FILE", repr(str(a_file))[:-1]))
    assert files_under(tmp_path) == [a_file]


# --- Medium 2: a run stopped in its first epoch is in progress, not damaged; final.json is checked ---

def test_a_header_only_metrics_csv_is_a_run_in_progress(tmp_path):
    (tmp_path / "metrics.csv").write_text(",".join(METRIC_COLUMNS) + "\n")
    run = read_run(tmp_path, "cifar_resnet20", 0)
    assert run.state == IN_PROGRESS and run.iterations == 0, run.problem


@pytest.mark.parametrize("final", [{"status": "finished", "final_test_error": True},
                                   {"status": "finished", "final_test_error": -50}, "FOLDER"],
                         ids=["error_true", "error_negative", "a_folder"])
def test_a_final_json_that_means_nothing_makes_the_run_damaged(tmp_path, final):
    if final == "FOLDER":
        (tmp_path / FINAL).mkdir()
    else:
        (tmp_path / FINAL).write_text(json.dumps(final))
    assert read_run(tmp_path, "cifar_resnet20", 0).state == RUN_DAMAGED


def test_a_folder_named_final_json_is_not_a_finished_run(tmp_path):
    (tmp_path / FINAL).mkdir()
    with pytest.raises(ReproError, match="final.json is not a file"):
        RunFolder(tmp_path).finished()


# --- Medium 3: two smoke suites making the same generated data at once -----------------------------

def test_two_suites_making_the_same_data_at_once_both_succeed(tmp_path, monkeypatch, capsys):
    from repro.suite import plan as plan_module

    target = tmp_path / "data" / "cifar10"
    plan = SimpleNamespace(results=tmp_path, data={"cifar10": target}, make_data={"cifar10": [
        "make-data", "cifar10", "--out", str(plan_module.partial_folder(target)), "--train", "4", "--test", "2"]})
    calls = []

    def make_data_here(command, **_):
        """`repro make-data` in this process; the first call lets a second suite run all of its own."""
        calls.append(command)
        code = main(command[len(plan_module.REPRO):])
        if len(calls) == 1:
            plan_module.make_missing_data(plan)  # the other suite, from start to end
        return SimpleNamespace(returncode=code)

    monkeypatch.setattr(plan_module.subprocess, "run", make_data_here)
    plan_module.make_missing_data(plan)
    assert len(calls) == 2 and (target / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["cifar10"]  # no temporary folder left


# --- Medium 4: checkpoints that torch reads but that are not ours -------------------------------------

def train_state() -> engine.TrainState:
    """The state a trainer resumes into: a small network, its SGD and schedule."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return engine.TrainState(model, optimizer, LearningRate(OptimSpec()), torch.device("cpu"))


def good_state(iteration: int = 3) -> dict:
    state = train_state()
    state.iteration = state.batch = iteration
    return {**state.state_dict(Processes()), "config": {"name": "x"}}


@pytest.mark.parametrize("change", [{"model": {}}, {"model": 7}, {"iteration": "abc"}, {"iteration": -5},
                                    {"rng": {}}, {"rows": "x"}, {"rows": [{"test_error": 1, "bogus": 2}]},
                                    {"lr": "0.1"}, {"optimizer": {}}, {"schedule": {"at": 1}},
                                    {"epoch_sums": ["x"]}, "ALL_ZERO", "A_LIST"],
                         ids=["model_empty", "model_int", "iteration_text", "iteration_negative", "rng_empty",
                              "rows_text", "rows_other_column", "lr_text", "optimizer_empty", "schedule_other_key",
                              "sums_text", "all_zero", "a_list"])
def test_a_malformed_latest_checkpoint_is_damaged_and_the_previous_one_used(tmp_path, change):
    folder = tmp_path / CHECKPOINTS
    folder.mkdir()
    torch.save(good_state(1), folder / PREVIOUS)
    bad = ({key: 0 for key in good_state()} if change == "ALL_ZERO" else [1, 2] if change == "A_LIST"
           else {**good_state(), **change})
    torch.save(bad, folder / LATEST)
    resumed = train_state()
    state = load_checkpoint(folder, move_damaged=True, use=lambda state: resumed.load_state_dict(state, True))
    assert state["iteration"] == 1 and resumed.iteration == 1
    assert [p.name.split("-")[0] for p in (folder / DAMAGED).iterdir()] == ["last"]


@pytest.mark.parametrize("change", [{"iteration": -5}, {"model": {"fc.weight": torch.zeros(3, 3)}}],
                         ids=["iteration_negative", "another_network"])
def test_train_resumes_from_the_previous_checkpoint_when_the_latest_is_malformed(cifar, tmp_path, capsys, change):
    spec = load_spec(CIFAR_SPEC, parse_overrides(TINY + [f"data.root={cifar}"]))
    assert engine.train(spec, tmp_path) == EXIT_OK
    run = tmp_path / "runs" / "cifar_resnet20" / "seed0"
    reference = (run / "metrics.csv").read_text().splitlines()
    (run / FINAL).unlink()
    latest = torch.load(run / CHECKPOINTS / LATEST, weights_only=True)
    torch.save({**latest, **change}, run / CHECKPOINTS / LATEST)
    assert engine.train(spec, tmp_path) == EXIT_OK  # from prev.pt (iteration 1): one iteration again
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows] == [r.split(",")[:2] for r in reference]
    assert "does not fit this run" in capsys.readouterr().err or change["iteration"] == -5


def write_run(folder: Path, cifar: Path, depth: int, state_depth: int | None = None) -> Path:
    """A finished-looking run folder of ResNet-`depth` whose checkpoint holds ResNet-`state_depth`."""
    spec = load_spec(CIFAR_SPEC, parse_overrides(TINY + [f"data.root={cifar}", f"model.depth={depth}"]))
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    network = load_spec(CIFAR_SPEC, parse_overrides(TINY + [f"model.depth={state_depth or depth}"])).model.build()
    (folder / CHECKPOINTS).mkdir()
    torch.save({**good_state(2), "model": network.state_dict()}, folder / CHECKPOINTS / LATEST)
    return folder


def test_read_only_commands_move_nothing_and_do_not_say_they_did(tmp_path, cifar):
    run = write_run(tmp_path / "run", cifar, 8)
    (run / CHECKPOINTS / LATEST).write_bytes(b"not a checkpoint")
    with pytest.raises(ReproError) as error:
        load_run_model(run)
    assert "damaged" in str(error.value) and "--restart" not in str(error.value) and "kept in" not in str(error.value)
    assert (run / CHECKPOINTS / LATEST).exists() and not (run / CHECKPOINTS / DAMAGED).exists()


class _Something:
    pass


@pytest.mark.parametrize("payload", [pickle.dumps({"a": os.getcwd}), "GLOBAL"], ids=["operand", "global"])
def test_refusing_a_file_never_suggests_weights_only_false(tmp_path, payload):
    from repro.reuse.networks import read_torchvision

    path = tmp_path / "file.pt"
    if payload == "GLOBAL":
        torch.save({"a": _Something()}, path)
    else:
        path.write_bytes(payload)
    for read in (read_checkpoint, read_torchvision):
        with pytest.raises(ReproError) as error:
            read(path)
        message = str(error.value)
        assert "more than tensors" in message and "weights_only" not in message and "\n" not in message


# --- Medium 5 and 6: ImageNet data smaller than one batch -----------------------------------------------

def test_an_imagenet_run_on_fewer_images_than_a_batch_is_refused_before_anything_is_written(small_imagenet, tmp_path,
                                                                                           capsys):
    sets = ["run.device=cpu", "data.workers=0", "data.mean_sample_size=4", "optim.batch_size=8",
            f"data.root={small_imagenet}", "eval.final=[]"]
    code, err = run_cli(["train", ROOT / "experiments" / "imagenet" / "resnet18.yaml", "--results", tmp_path / "r",
                         *(a for s in sets for a in ("--set", s))], capsys)
    assert_refused(code, err, "a batch size of 8 does not fit 4 training images")
    assert files_under(tmp_path / "r") == []


def test_bench_imagenet_data_on_fewer_images_than_a_batch_ends(small_imagenet):
    from repro.bench_imagenet import bench_imagenet_data

    outcome = []

    def bench():
        try:
            bench_imagenet_data(small_imagenet, workers=(0,), batches=1, batch_size=8, rounds=1, warmup_batches=1)
        except DataError as error:
            outcome.append(str(error))

    thread = threading.Thread(target=bench, daemon=True)
    thread.start()
    thread.join(timeout=120)  # it looped forever: a hang fails here instead of stopping the suite
    assert not thread.is_alive() and outcome and "fewer than one batch of 8" in outcome[0]


# --- Medium 7: repro responses with a checkpoint of another network -----------------------------------

def test_responses_leave_out_a_damaged_run_and_compute_the_others(tmp_path, cifar, capsys):
    from repro.reports.responses import response_frame

    good = write_run(tmp_path / "good" / "seed0", cifar, 8)
    other = write_run(tmp_path / "other" / "seed0", cifar, 8, state_depth=14)
    runs = [SimpleNamespace(name="good", seed=0, path=good), SimpleNamespace(name="other", seed=0, path=other)]
    frame = response_frame(runs, str(cifar))
    assert set(frame.model) == {"good"} and len(frame) > 0
    err = capsys.readouterr().err
    assert "left out of Fig. 7" in err and str(other) in err and "does not fit this run" in err


# --- the rest of the list ---------------------------------------------------------------------------------

def test_make_data_force_over_a_symlink_removes_the_link_not_what_it_points_to(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep").write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "cifar-10-batches-py").symlink_to(real)
    code, err = run_cli(["make-data", "cifar10", "--out", out, "--train", "2", "--test", "2", "--force"], capsys)
    assert code == 0, err
    assert (real / "keep").read_text() == "precious"
    assert (out / "cifar-10-batches-py" / "data_batch_1").is_file()


def test_bench_cifar_names_a_spec_that_is_not_a_cifar_spec():
    from repro.bench_cifar import bench_cifar

    with pytest.raises(ReproError, match="is not a CIFAR spec"):
        bench_cifar([str(ROOT / "experiments" / "imagenet" / "resnet18.yaml")], device="cpu", batch_size=2,
                    warmup_steps=0, steps=1, rounds=1)


def test_a_training_batch_whose_images_are_all_unreadable_is_refilled(tmp_path):
    from torchvision.datasets import ImageFolder

    from repro.data.imagenet import ImageNetSamples, train_plan

    root = write_imagenet(tmp_path, classes=2, n_train=3, n_val=1, short_side=(40, 48))
    folder = ImageFolder(str(root / "train"))
    for path, _ in folder.samples[:2]:
        Path(path).write_bytes(b"not an image")
    samples = ImageNetSamples(folder, train_plan, None, seed=0, keep_batch_size=True)
    crops, _, targets, unreadable = samples.collate([samples[(0, 0)], samples[(0, 1)]])
    assert len(targets) == 2 and crops.shape[0] == 2 and len(unreadable) == 2
    assert targets.tolist() == [folder.samples[2][1]] * 2


def test_a_stop_signal_on_the_very_last_step_stops_before_the_precise_bn_pass_and_a_rerun_finishes(
        cifar, tmp_path, monkeypatch):
    """What the README says: the last step is trained, the precise-BN pass after it sees the stop (exit 75,
    no final.json), and the same command then finishes the run without training again."""
    real, calls = engine.train_step, []

    def step_then_signal(*args):
        calls.append(1)
        stats = real(*args)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    monkeypatch.setattr(engine, "train_step", step_then_signal)
    spec = load_spec(CIFAR_SPEC, parse_overrides(TINY + [f"data.root={cifar}"]))
    assert engine.train(spec, tmp_path) == EXIT_PREEMPTED
    run = tmp_path / "runs" / "cifar_resnet20" / "seed0"
    assert not (run / FINAL).exists()
    assert engine.train(spec, tmp_path) == EXIT_OK
    assert len(calls) == 2  # the rerun trained no step
    final = json.loads((run / FINAL).read_text())
    assert final["status"] == "finished" and final["iterations"] == 2 and final["bn_stats"] == "precise"
