"""`repro run-all`: planning the suite's runs, --dry-run, the Slurm job scripts (and their signal
handling, run for real in bash), the local pool, and the errors for bad input.

Submission is tested against stand-in `sbatch`/`squeue` scripts here; tests/test_slurm_suite.py runs
the same path on a real Slurm cluster.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from repro.contract import EXIT_DIVERGED, EXIT_LOCKED, EXIT_PREEMPTED
from repro.errors import DataError, ReproError, SpecError
from repro.spec import load_spec, parse_overrides
from repro.suite import slurm
from repro.suite.local import Job, LocalPool, Stage, local_stages, summarize
from repro.suite.plan import make_plan, read_suite
from repro.suite.run_all import add_arguments as add_run_all_arguments, run_all

SUITE = Path(__file__).resolve().parents[1] / "experiments" / "suite.yaml"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="repro run-all")
    add_run_all_arguments(parser)
    args = parser.parse_args(["--suite", str(SUITE), *argv])
    args.smoke = args.smoke or not (args.local or args.slurm)  # as run_all does
    return args


def suite_names(extras: bool = False) -> set[str]:
    suite = yaml.safe_load(SUITE.read_text())
    listed = [n for group in ("figures", "tables") for names in suite[group].values() for n in names]
    return set(listed + (suite["extras"] if extras else []))


@pytest.fixture
def data(tmp_path, monkeypatch):
    """Folders that pass the data checks (the runs never start in these tests)."""
    monkeypatch.delenv("REPRO_DATA", raising=False)
    cifar = tmp_path / "cifar"
    (cifar / "cifar-10-batches-py").mkdir(parents=True)
    (cifar / "cifar-10-batches-py" / "data_batch_1").touch()
    imagenet = tmp_path / "imagenet"
    for split in ("train", "val"):
        (imagenet / split / "n01440764").mkdir(parents=True)
        (imagenet / split / "n01440764" / "a.JPEG").touch()
    return ["--data-cifar", str(cifar), "--data-imagenet", str(imagenet)]


def finish(run) -> None:
    run.folder.mkdir(parents=True)
    (run.folder / "final.json").write_text(json.dumps({"status": "finished"}))


# --- planning ------------------------------------------------------------------------------------

def test_plan_is_every_figure_and_table_spec_with_its_datasets_seed_count(tmp_path, data):
    plan = make_plan(parse("--slurm", "--results", str(tmp_path / "r"), *data))
    seeds = yaml.safe_load(SUITE.read_text())["seeds"]
    assert {run.name for run in plan.runs} == suite_names()
    for name in suite_names():
        runs = [run for run in plan.runs if run.name == name]
        assert sorted(run.seed for run in runs) == list(range(seeds[runs[0].dataset]))
        assert all(run.folder == tmp_path / "r" / "runs" / name / f"seed{run.seed}" for run in runs)
        assert load_spec(runs[0].spec_path).name == name
    datasets = [run.dataset for run in plan.runs]
    assert datasets == sorted(datasets)  # CIFAR-10 first, then ImageNet
    assert plan.runs[0].name == "cifar_resnet1202"  # the longest run starts first


def test_extras_seeds_and_only_select_runs(tmp_path, data):
    results = ["--results", str(tmp_path / "r"), *data]
    assert {run.name for run in make_plan(parse("--slurm", "--extras", *results)).runs} == suite_names(extras=True)
    plan = make_plan(parse("--slurm", "--seeds", "2", "--only", "cifar_resnet*,imagenet_plain18",
                           "--only", "cifar_plain20", *results))
    expected = {n for n in suite_names() if n.startswith("cifar_resnet")} | {"imagenet_plain18", "cifar_plain20"}
    assert {run.name for run in plan.runs} == expected
    assert {(run.name, run.seed) for run in plan.runs} == {(n, s) for n in expected for s in (0, 1)}


def test_finished_runs_are_skipped_and_unfinished_ones_resume(tmp_path, data, capsys):
    args = parse("--slurm", "--only", "cifar_resnet20", "--seeds", "3", "--results", str(tmp_path / "r"), *data)
    first, second, third = make_plan(args).runs
    finish(first)
    (second.folder / "checkpoints").mkdir(parents=True)
    assert [run.state() for run in (first, second, third)] == ["finished", "resume", "start"]
    assert make_plan(args).pending("cifar10") == [second, third]
    args.dry_run = True
    assert run_all(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("skip") and "cifar_resnet20 seed 0" in line for line in lines)
    assert sum(" train " in line for line in lines) == 2


def test_smoke_runs_get_the_suites_overrides_and_generated_data(tmp_path):
    plan = make_plan(parse("--smoke", "--results", str(tmp_path / "r")))
    smoke = yaml.safe_load(SUITE.read_text())["smoke"]
    assert {(run.name, run.seed) for run in plan.runs} == {
        (name, seed) for name in suite_names()
        for seed in range(smoke["seeds"]["cifar10" if name.startswith("cifar") else "imagenet"])}
    for run in plan.runs:
        arguments = plan.train_arguments(run)
        assert arguments[arguments.index("--data") + 1] == str(tmp_path / "r" / "data" / run.dataset)
        sets = [arguments[i + 1] for i, a in enumerate(arguments) if a == "--set"]
        spec = load_spec(run.spec_path, parse_overrides(sets)).to_dict()  # what `repro train` will train
        for key, value in {**smoke["overrides"][run.dataset], **smoke["overrides"].get(run.name, {})}.items():
            section, field = key.split(".")
            assert spec[section][field] == value, (run.name, key)
    for dataset, sizes in smoke["data"].items():
        command = plan.make_data[dataset]
        assert command[:2] == ["make-data", dataset]
        assert all(command[command.index(f"--{key}") + 1] == str(value) for key, value in sizes.items())


def write_suite(root: Path, suite: dict) -> Path:
    """A suite file beside two small specs, tiny20 (CIFAR-10) and tiny18 (ImageNet)."""
    for dataset, name, arch, depth in (("cifar10", "tiny20", "cifar", 20), ("imagenet", "tiny18", "imagenet", 18)):
        (root / dataset).mkdir(parents=True, exist_ok=True)
        (root / dataset / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "model": {"arch": arch, "depth": depth}, "data": {"dataset": dataset},
             "optim": {"lr_milestones": []}}))  # no lr drop: the smoke overrides shorten max_iters
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def test_smoke_overrides_may_name_a_spec_and_must_name_something(tmp_path):
    smoke = {"seeds": {"cifar10": 1, "imagenet": 1}, "data": {"cifar10": {"train": 64}},
             "overrides": {"cifar10": {"run.device": "cpu", "optim.max_iters": 9}, "tiny20": {"optim.max_iters": 3}}}
    suite = write_suite(tmp_path / "exp", {"seeds": {"cifar10": 1}, "figures": {"f": ["tiny20"]}, "smoke": smoke})
    args = parse("--smoke", "--results", str(tmp_path / "r"))
    args.suite = str(suite)
    plan = make_plan(args)
    arguments = plan.train_arguments(plan.runs[0])
    assert arguments[-6:] == ["--set", "run.device=cpu", "--set", "optim.max_iters=9", "--set", "optim.max_iters=3"]
    smoke["overrides"]["tiny_20"] = {"optim.max_iters": 3}
    write_suite(tmp_path / "exp", {"seeds": {"cifar10": 1}, "figures": {"f": ["tiny20"]}, "smoke": smoke})
    with pytest.raises(SpecError, match="tiny_20 is neither a dataset"):
        make_plan(args)


def test_a_suite_name_without_a_spec_is_an_error_naming_it(tmp_path, data):
    suite = write_suite(tmp_path / "exp", {"seeds": {"cifar10": 1}, "figures": {"f": ["tiny20", "tiny56"]}})
    args = parse("--slurm", *data)
    args.suite = str(suite)
    with pytest.raises(SpecError, match="'tiny56'.*specs there are: tiny18, tiny20"):
        make_plan(args)


def test_the_suite_file_reader_reads_every_section():
    mapping = yaml.safe_load(SUITE.read_text())
    suite = read_suite(SUITE, smoke=True)
    assert suite.seeds == mapping["smoke"]["seeds"] and read_suite(SUITE).seeds == mapping["seeds"]
    assert (suite.smoke_data, suite.smoke_overrides) == (mapping["smoke"]["data"], mapping["smoke"]["overrides"])
    assert suite.names(extras=False) == list(dict.fromkeys(
        n for group in ("figures", "tables") for names in mapping[group].values() for n in names))


@pytest.mark.parametrize("content, message", [
    ("seeds: {cifar10: 0}\n", "seeds: cifar10: expected a number of runs"),
    ("extras: [1]\n", "extras: expected a list of spec names"),
    ("smoke: {seeds: {cifar10: 1}, overrides: {cifar10: 5}}\n", "smoke: overrides: cifar10: expected a dict"),
    ("smoke: [1]\n", "smoke: expected a dict"),
    ("figures: {f: [a]}\nsmoke: {data: {cifar10: {train: 8}}}\n", "smoke: seeds: expected a mapping"),
    ("\udcff\n", "not valid YAML"),
])
def test_a_bad_suite_file_is_an_error_naming_the_file_and_the_key(tmp_path, content, message):
    path = tmp_path / "suite.yaml"
    path.write_bytes(content.encode(errors="surrogateescape"))
    with pytest.raises(SpecError, match=f"{re.escape(str(path))}: .*{re.escape(message)}"):
        read_suite(path, smoke=True)


# --- dry run and bad input -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", [[], ["--slurm", "--smoke"]])
def test_dry_run_prints_one_line_per_run_and_writes_nothing(tmp_path, capsys, mode):
    results = tmp_path / "r"
    assert run_all(parse(*mode, "--dry-run", "--results", str(results))) == 0
    out = capsys.readouterr().out
    runs = make_plan(parse("--smoke", "--results", str(results))).runs
    for run in runs:
        [line] = [line for line in out.splitlines() if f" {run.label} " in line]
        assert f"train {run.spec_path} --seed {run.seed} " in line
    assert "make-data cifar10" in out and "repro report" in out
    assert not results.exists()


def test_repro_run_all_on_the_command_line(tmp_path):
    if subprocess.run([sys.executable, "-m", "repro", "run-all", "--help"], capture_output=True).returncode:
        pytest.skip("`repro run-all` is not wired into repro/cli.py yet")
    results = tmp_path / "r"
    dry = subprocess.run([sys.executable, "-m", "repro", "run-all", "--dry-run", "--only", "cifar_plain20",
                          "--results", str(results)], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(" train ") == 2 and not results.exists()
    wrong = subprocess.run([sys.executable, "-m", "repro", "run-all", "--only", "nothing*"], capture_output=True,
                           text=True)
    assert wrong.returncode == 2 and "matches no spec" in wrong.stderr and "Traceback" not in wrong.stderr


def test_local_without_gpus_says_what_to_use_instead(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ReproError, match="--local needs CUDA GPUs.*--smoke.*--slurm"):
        run_all(parse("--local", "--results", str(tmp_path / "r")))


def test_slurm_without_sbatch_stops_before_writing_anything(tmp_path, monkeypatch, data):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ReproError, match="sbatch, which is not on PATH"):
        run_all(parse("--slurm", "--results", str(tmp_path / "r"), *data))
    assert not (tmp_path / "r").exists()


def test_missing_data_names_the_path_and_how_to_get_it(tmp_path, data, monkeypatch):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{nowhere / 'cifar-10-batches-py'}.*--data-cifar.*Getting the data"):
        run_all(parse("--slurm", "--dry-run", "--data-cifar", str(nowhere)))
    with pytest.raises(DataError, match=f"ImageNet root not found: {nowhere / 'imagenet'}.*REPRO_DATA"):
        monkeypatch.setenv("REPRO_DATA", str(nowhere))
        run_all(parse("--slurm", "--dry-run", "--only", "imagenet_*"))
    monkeypatch.delenv("REPRO_DATA")
    with pytest.raises(DataError, match="no cifar10 folder: pass --data-cifar DIR or export REPRO_DATA"):
        run_all(parse("--slurm", "--dry-run"))


def test_an_empty_selection_lists_the_names(tmp_path):
    with pytest.raises(ReproError, match="--only 'cifar_resnt\\*' matches no spec.*cifar_resnet20"):
        run_all(parse("--dry-run", "--only", "cifar_resnet20,cifar_resnt*"))
    with pytest.raises(ReproError, match="matches extras: add --extras"):
        run_all(parse("--dry-run", "--only", "imagenet_resnet50"))


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--gpus", "0,x"], ["--gpus", "1,1"], ["--per-gpu", "0"],
                                  ["--nodes", "0"], ["--cpus-per-task", "-1"], ["--smokey"]])
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_slurm_options_come_from_the_environment_and_bad_values_are_errors(monkeypatch):
    monkeypatch.setenv("REPRO_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("REPRO_SLURM_NODES", "2")
    monkeypatch.setenv("REPRO_SLURM_SBATCH_ARGS", "--constraint=a100 --exclusive")
    args = parse("--slurm", "--nodes", "3")
    assert (args.partition, args.nodes, args.sbatch_arg) == ("gpu", 3, ["--constraint=a100", "--exclusive"])
    monkeypatch.setenv("REPRO_SLURM_GPUS_PER_NODE", "eight")
    with pytest.raises(SystemExit):
        parse("--slurm")


# --- Slurm job scripts ---------------------------------------------------------------------------

def stand_ins(folder: Path, queued: str = "") -> Path:
    """`sbatch` that records its arguments and answers ids 101, 102, ...; `squeue` that lists `queued`."""
    folder.mkdir()
    calls = folder / "sbatch.calls"
    (folder / "sbatch").write_text(
        f'#!/bin/bash\necho "$*" >> {calls}\necho "$((100 + $(wc -l < {calls})));cluster"\n')
    (folder / "squeue").write_text(f"#!/bin/bash\nprintf '%s' {queued!r}\n")
    for name in ("sbatch", "squeue"):
        (folder / name).chmod(0o755)
    return calls


def test_slurm_writes_resubmittable_scripts_and_submits_arrays_then_the_report(tmp_path, monkeypatch, data, capsys):
    calls = stand_ins(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    results = tmp_path / "r"
    args = parse("--slurm", "--only", "cifar_resnet*,imagenet_resnet18", "--seeds", "2", "--results", str(results),
                 "--partition", "gpu", "--time", "24:00:00", "--gpus-per-node", "4", "--nodes", "2",
                 "--sbatch-arg=--constraint=a100", *data)
    plan = make_plan(args)
    finish(plan.runs[-1])  # imagenet_resnet18 seed 1
    assert run_all(args) == 0
    cifar, imagenet, report = (results / "slurm" / f"{name}.sh" for name in ("cifar10_array", "imagenet_array", "report"))
    assert calls.read_text().splitlines() == [f"--parsable {cifar}", f"--parsable {imagenet}",
                                             f"--parsable --dependency=afterany:101:102 {report}"]
    assert "submitted job 103: the reports, once jobs 101 and 102 ended" in capsys.readouterr().out
    cifar_runs = [r for r in plan.runs if r.dataset == "cifar10"]
    cifar_lines = (results / "slurm" / "cifar10_runs.txt").read_text().splitlines()
    assert [line.split("\t") for line in cifar_lines] == [[str(r.log), *plan.train_arguments(r)] for r in cifar_runs]
    assert len((results / "slurm" / "imagenet_runs.txt").read_text().splitlines()) == 1
    for script in (cifar, imagenet, report):
        text = script.read_text()
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        for directive in ("--partition=gpu", "--time=24:00:00", "--constraint=a100"):
            assert f"#SBATCH {directive}\n" in text
    for script, size, gres, nodes, tasks in ((cifar, len(cifar_runs), 1, 1, 1), (imagenet, 1, 4, 2, 4)):
        text = script.read_text()
        for directive in (f"--array=0-{size - 1}", "--requeue", "--signal=B:USR1@120", f"--gres=gpu:{gres}",
                          f"--nodes={nodes}", f"--ntasks-per-node={tasks}", "--cpus-per-task=8", "--open-mode=append"):
            assert f"#SBATCH {directive}\n" in text
        assert "trap 'stop USR1' USR1" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    # one srun task per GPU, no torchrun (it kills a stopping trainer after 30 s and loses its exit code 75)
    assert "srun" in imagenet.read_text() and "torch.distributed.run" not in imagenet.read_text()
    assert "--array" not in report.read_text() and "--requeue" not in report.read_text()


def test_slurm_refuses_to_submit_while_jobs_of_the_results_folder_are_queued(tmp_path, monkeypatch, data):
    results = tmp_path / "r"
    calls = stand_ins(tmp_path / "bin", queued=f"7_[0-9] {results}/slurm/cifar10_array.sh\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ReproError, match="jobs 7_\\[0-9\\] of .* are still queued or running"):
        run_all(parse("--slurm", "--only", "cifar_resnet20", "--results", str(results), *data))
    assert not calls.exists()


TRAINER = """#!/bin/bash
# Stands in for `python -m repro train`: exits with $TRAINER_EXIT, or, when that is "wait", trains
# until SIGTERM or SIGUSR1, then "checkpoints" and exits with 75 as the engine does. $EVENTS.args gets the
# arguments, each ended by a NUL.
echo "started $*" >> "$EVENTS"
printf '%s\\0' "$@" > "$EVENTS.args"
if [ "$TRAINER_EXIT" != wait ]; then exit "$TRAINER_EXIT"; fi
trap 'echo "trainer got TERM" >> "$EVENTS"; exit 75' TERM
trap 'echo "trainer got USR1" >> "$EVENTS"; exit 75' USR1
sleep 30 & wait
"""


def start_array_task(tmp_path: Path, monkeypatch, data: list[str], trainer_exit: str, results: str = "r"):
    """Task 2 of the CIFAR-10 array script (ResNet-20, seed 2), started in bash as Slurm would, with
    stand-ins for the trainer and scontrol that write to the events file. Returns the job (a Popen),
    the events file, the plan and the array."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trainer").write_text(TRAINER)
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$EVENTS"\n')
    for name in ("trainer", "scontrol"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setattr(slurm, "PYTHON", str(bin_dir / "trainer"))
    plan = make_plan(parse("--slurm", "--only", "cifar_resnet20", "--results", str(tmp_path / results), *data))
    [array] = slurm.arrays(plan)
    array.script.parent.mkdir(parents=True)
    array.runs_list.write_text(slurm.runs_list(array.runs, plan))
    array.script.write_text(slurm.array_script(array, plan, slurm.Resources(0, 1, 1, [])))
    events = tmp_path / "events"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "EVENTS": str(events),
           "TRAINER_EXIT": trainer_exit, "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "42"}
    job = subprocess.Popen(["bash", str(array.script)], env=env, stdout=subprocess.PIPE, text=True)
    return job, events, plan, array


@pytest.mark.parametrize("trainer_exit, signal_to_job, exit_code, requeued", [
    ("0", None, 0, False),  # finished
    ("3", None, 3, False),  # diverged: final.json says so, a rerun would change nothing
    ("1", None, 1, False),  # an error: the job fails, it is not retried
    ("75", None, 75, True),  # stopped by itself after a checkpoint: resume in a new start
    ("wait", "USR1", 75, True),  # --signal=B:USR1@120: the time limit is near
    ("wait", "TERM", 75, False),  # Slurm itself ends the job (scancel, preemption, scontrol requeue)
])
def test_array_script_passes_signals_on_and_requeues_checkpointed_runs(
        tmp_path, monkeypatch, data, trainer_exit, signal_to_job, exit_code, requeued):
    job, events, plan, array = start_array_task(tmp_path, monkeypatch, data, trainer_exit)
    if signal_to_job:
        deadline = time.monotonic() + 10
        while "started" not in (events.read_text() if events.exists() else ""):
            assert time.monotonic() < deadline, "the trainer did not start"
            time.sleep(0.05)
        time.sleep(0.2)  # the shell is waiting now
        job.send_signal(getattr(signal, f"SIG{signal_to_job}"))
    output, _ = job.communicate(timeout=20)
    assert job.returncode == exit_code, output
    lines = events.read_text().splitlines()
    assert lines[0] == f"started -m repro {' '.join(plan.train_arguments(array.runs[2]))}"
    assert [line for line in lines if line.startswith("trainer got")] == ([f"trainer got {signal_to_job}"]
                                                                         if signal_to_job else [])
    assert ("scontrol requeue 42" in lines) == requeued
    assert f"end: exit code {exit_code}" in array.runs[2].log.read_text()  # the run's output file


def test_array_script_ends_a_busy_run_without_failing_or_requeueing(tmp_path, monkeypatch, data):
    job, events, plan, array = start_array_task(tmp_path, monkeypatch, data, str(EXIT_LOCKED))
    output, _ = job.communicate(timeout=20)
    assert job.returncode == 0, output  # another process trains the run: not a failure of the suite
    assert "scontrol requeue 42" not in events.read_text()  # a requeue would only race that process
    log = array.runs[2].log.read_text()
    assert f"end: exit code {EXIT_LOCKED}" in log and "busy: another process holds the run's lock" in log


def test_array_script_takes_the_exit_codes_from_the_contract(tmp_path, data):
    plan = make_plan(parse("--slurm", "--only", "cifar_resnet20", "--results", str(tmp_path / "r"), *data))
    [array] = slurm.arrays(plan)
    script = slurm.array_script(array, plan, slurm.Resources(0, 1, 1, []))
    assert f"DIVERGED={EXIT_DIVERGED} LOCKED={EXIT_LOCKED} PREEMPTED={EXIT_PREEMPTED}\n" in script
    assert not re.search(r"-(eq|ne) (3|4|75)\b", script)  # every test of an exit code names it


# Characters that mean something to bash, to sbatch's #SBATCH reader or to Slurm's file name patterns.
AWKWARD = "my results #1 (50% \"done\") 'x' $HOME"


def test_scripts_quote_every_value_and_bash_reads_them_back(tmp_path, monkeypatch, data):
    calls = stand_ins(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    results = tmp_path / AWKWARD
    assert run_all(parse("--slurm", "--only", "cifar_resnet20", "--seeds", "1", "--results", str(results),
                         "--partition", "gpu a", "--sbatch-arg=--comment=two words # no comment",
                         "--sbatch-arg=--exclusive", *data)) == 0
    assert len(calls.read_text().splitlines()) == 2
    logs = str(results / "slurm" / "logs").replace("%", "%%").replace('"', '\\"')
    for name, pattern in (("cifar10_array", "%x_%A_%a.out"), ("report", "%x_%j.out")):
        script = (results / "slurm" / f"{name}.sh").read_text()
        assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
        directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
        for directive in (f'--output="{logs}/{pattern}"', '--partition="gpu a"',
                          '--comment="two words # no comment"', "--exclusive"):
            assert f"#SBATCH {directive}" in directives, (directive, directives)


def test_array_script_reads_awkward_paths_back_intact(tmp_path, monkeypatch, data):
    job, events, plan, array = start_array_task(tmp_path, monkeypatch, data, "0", results=AWKWARD)
    output, _ = job.communicate(timeout=20)
    assert job.returncode == 0, output
    arguments = Path(f"{events}.args").read_text().split("\0")[:-1]
    assert arguments == ["-m", "repro", *plan.train_arguments(array.runs[2])]
    assert str(tmp_path / AWKWARD) in arguments
    assert "end: exit code 0" in array.runs[2].log.read_text()  # the log path, read from the runs list


LINE_BREAK = "gpu\ntouch /tmp/x"  # a second line would be a shell command, and end sbatch's directives


@pytest.mark.parametrize("flags, environment, named", [
    *[([f"--{key}", LINE_BREAK], {}, f"--{key}") for key in ("partition", "account", "qos", "time", "mem")],
    *[([], {f"REPRO_SLURM_{key.upper()}": LINE_BREAK}, f"$REPRO_SLURM_{key.upper()}")
      for key in ("partition", "account", "qos", "time", "mem")],
    ([], {"REPRO_SLURM_PARTITION": "gpu\r"}, "$REPRO_SLURM_PARTITION"),
    ([f"--sbatch-arg=--comment={LINE_BREAK}"], {}, "--sbatch-arg"),
    ([], {"REPRO_SLURM_SBATCH_ARGS": f"--exclusive '--comment={LINE_BREAK}'"}, "$REPRO_SLURM_SBATCH_ARGS"),
    (["--results", "r\nx"], {}, "--results"),
    (["--results", "r\tx"], {}, "--results"),
])
def test_slurm_refuses_control_characters_before_writing_anything(tmp_path, monkeypatch, data, flags,
                                                                  environment, named):
    calls = stand_ins(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    for dry_run in ([], ["--dry-run"]):
        with pytest.raises(ReproError, match=f"{re.escape(named)}.*control character"):
            run_all(parse("--slurm", "--only", "cifar_resnet20", "--results", "r", *data, *flags, *dry_run))
    assert not calls.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "cifar", "imagenet"]


def test_control_characters_in_paths_of_the_runs_are_refused(tmp_path, data):
    suite = write_suite(tmp_path / "exp", {"seeds": {"cifar10": 1}, "figures": {"f": ["tiny20"]}})
    spec = suite.parent / "cifar10" / "tiny20.yaml"
    spec.rename(spec.with_name("tiny\t20.yaml"))  # a tab would split its line of the runs list
    args = parse("--slurm", "--dry-run", "--results", str(tmp_path / "r"), *data)
    args.suite = str(suite)
    with pytest.raises(ReproError, match=r"an argument of tiny20 seed 0: .*control character '\\t'"):
        run_all(args)
    cifar = tmp_path / "ci\nfar"
    (tmp_path / "cifar").rename(cifar)
    args.data_cifar = str(cifar)
    with pytest.raises(ReproError, match=r"--data-cifar: .*control character '\\n'"):
        run_all(args)


def test_control_characters_are_a_one_line_error_on_the_command_line(tmp_path, data):
    environment = {**os.environ, "REPRO_SLURM_PARTITION": LINE_BREAK}
    result = subprocess.run([sys.executable, "-m", "repro", "run-all", "--slurm", "--dry-run", "--only",
                             "cifar_resnet20", "--results", str(tmp_path / "r"), *data],
                            env=environment, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert "$REPRO_SLURM_PARTITION" in result.stderr and "Traceback" not in result.stderr


def test_one_backend_at_a_time(tmp_path):
    with pytest.raises(ReproError, match="--local and --slurm exclude each other"):
        run_all(parse("--local", "--slurm"))
    with pytest.raises(ReproError, match="--local trains the full suite.*choose one"):
        run_all(parse("--local", "--smoke"))


# --- the local pool ------------------------------------------------------------------------------

def python_job(tmp_path: Path, label: str, code: str) -> Job:
    return Job(label, [sys.executable, "-c", code], tmp_path / "logs" / f"{label}.out")


def test_pool_gives_each_job_a_slot_and_a_failure_does_not_stop_the_others(tmp_path, capsys):
    show_env = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS'])"
    jobs = [python_job(tmp_path, f"job{i}", show_env) for i in range(4)]
    jobs.insert(1, python_job(tmp_path, "broken", "raise SystemExit(1)"))
    slots = [{"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "3"}, {"CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "3"}]
    outcomes = LocalPool().run(Stage("test", jobs, slots, "two slots"))
    assert [o.kind for o in outcomes] == ["done", "failed", "done", "done", "done"]
    assert {jobs[i].log.read_text() for i in (0, 2, 3, 4)} <= {"0 3\n", "1 3\n"}
    plan = make_plan(parse("--only", "cifar_resnet20", "--results", str(tmp_path / "r")))
    assert summarize(plan, outcomes, 1.0) == 1
    assert f"broken: exit code 1, output in {jobs[1].log}" in capsys.readouterr().out


def test_stopping_the_pool_passes_sigterm_on_and_starts_nothing_more(tmp_path, capsys):
    trainer = ("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
               "print('training', flush=True)\n"
               "time.sleep(30)\n")
    jobs = [python_job(tmp_path, "trainer", trainer), python_job(tmp_path, "next", "print('ran')")]
    pool = LocalPool()

    def stop_when_training():
        while "training" not in (jobs[0].log.read_text() if jobs[0].log.exists() else ""):
            time.sleep(0.05)
        pool.stop(signal.SIGTERM, None)

    stopper = threading.Thread(target=stop_when_training)
    stopper.start()
    outcomes = pool.run(Stage("test", jobs, [{}], "one slot"))
    stopper.join()
    assert [o.kind for o in outcomes] == ["stopped", "not started"]
    assert not jobs[1].log.exists()
    plan = make_plan(parse("--only", "cifar_resnet20", "--results", str(tmp_path / "r")))
    assert summarize(plan, outcomes, 1.0) == 75


def test_a_busy_run_is_left_to_its_trainer_and_fails_nothing(tmp_path, capsys):
    jobs = [python_job(tmp_path, "busy", f"raise SystemExit({EXIT_LOCKED})"), python_job(tmp_path, "done", "")]
    outcomes = LocalPool().run(Stage("test", jobs, [{}], "one slot"))
    assert [o.kind for o in outcomes] == ["busy", "done"]
    plan = make_plan(parse("--only", "cifar_resnet20", "--results", str(tmp_path / "r")))
    assert summarize(plan, outcomes, 1.0) == EXIT_PREEMPTED  # not done yet: run the same command again
    assert "busy: another process trains it" in capsys.readouterr().out


def test_local_gpu_stages_share_gpus_among_cifar_runs_and_give_imagenet_all_of_them(tmp_path, data):
    plan = make_plan(parse("--slurm", "--only", "cifar_resnet20,imagenet_resnet18", "--results", str(tmp_path), *data))
    cifar, imagenet, reports = local_stages(plan, gpus=[2, 5], per_gpu=2)
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in cifar.slots] == ["2", "5", "2", "5"]
    assert [job.run for job in cifar.jobs] == plan.pending("cifar10")
    assert imagenet.slots == [{"CUDA_VISIBLE_DEVICES": "2,5"}]
    [job] = imagenet.jobs
    assert job.command[1:6] == ["-m", "repro.suite.launch", "--nproc-per-node", "2", "--"]
    assert job.command[6:] == plan.train_arguments(job.run)
    assert [job.label for job in reports.jobs] == ["complexity", "responses", "report"]


def test_extras_test_table4_before_the_report_on_a_gpu_where_there_is_one(tmp_path, data):
    results = ["--results", str(tmp_path / "r"), *data]
    plain = make_plan(parse("--slurm", *results))
    assert [name for name, _ in plain.report_arguments()][-1] == "report"
    assert "table4" not in dict(plain.report_arguments()) and "--extras" not in dict(plain.report_arguments())["report"]
    extras = make_plan(parse("--slurm", "--extras", *results))
    reports = dict(extras.report_arguments())
    assert list(reports)[-2:] == ["table4", "report"] and "--extras" in reports["report"]
    assert reports["table4"][0] == "table4" and str(extras.data["imagenet"]) in reports["table4"]
    script = slurm.report_script(extras, slurm.Resources(8, 1, 4, []), tmp_path / "report.sh")
    assert "#SBATCH --gres=gpu:1" in script and "step table4" in script
    assert "--gres" not in slurm.report_script(plain, slurm.Resources(8, 1, 4, []), tmp_path / "report.sh")
