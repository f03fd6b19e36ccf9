"""Reports from run folders written here with known numbers: statistics over seeds, run states,
verdicts that follow the numbers, figures, and well-formed tables."""
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from repro.errors import ReproError
from repro.cli import main
from repro.reports import figures, make_report
from repro.reports.runs import Network, find_runs, read_suite
from repro.reports.summaries import table6_frame, write_table6
from repro.reports.verdict import FAIL, NOT_ASKED, NOT_RUN, PASS, evaluate_claims
from repro.spec import load_spec, validate

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

SUITE = {
    "seeds": {"cifar10": 5, "imagenet": 1},
    "figures": {
        "fig6_left": ["cifar_plain20", "cifar_plain56"],
        "fig6_middle": ["cifar_resnet20", "cifar_resnet56"],
        "fig7": ["cifar_plain20", "cifar_resnet20"],
        "fig4_left": ["imagenet_plain18", "imagenet_plain34"],
        "fig4_right": ["imagenet_resnet18", "imagenet_resnet34"],
    },
    "tables": {
        "table6": ["cifar_plain20", "cifar_plain56", "cifar_resnet20", "cifar_resnet56"],
        "table2": ["imagenet_plain18", "imagenet_plain34", "imagenet_resnet18", "imagenet_resnet34"],
    },
}


def write_suite(tmp_path, suite=SUITE):
    """The suite file beside copies of the project's spec files, as experiments/ holds them: the reports
    read a spec that has no run yet from there."""
    folder = tmp_path / "experiments"
    for dataset in ("cifar10", "imagenet"):
        shutil.copytree(EXPERIMENTS / dataset, folder / dataset, dirs_exist_ok=True)
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def write_run(results, name, seed, *, train_error, test_error, status="finished", epochs=4,
              iterations_per_epoch=50, max_iters=200, final=None, model=None, partial_train_error=None):
    """A run folder in the project's format whose last full epoch ends at the given errors; the earlier
    epochs are 10 points higher. `model` is the spec's model section (default: the one its registry-style
    name says); `partial_train_error` adds a last row for an epoch cut short by max_iters. status None
    leaves it in progress (no final.json)."""
    folder = results / "runs" / name / f"seed{seed}"
    folder.mkdir(parents=True)
    if model is None:
        arch, kind, depth = re.fullmatch(r"(cifar|imagenet)_(plain|resnet)(\d+)", name).groups()
        model = {"arch": arch, "depth": int(depth), "residual": kind == "resnet"}
    config = validate({"name": name, "seed": seed, "optim": {"max_iters": max_iters}, "model": model,
                       "data": {"dataset": "imagenet" if model.get("arch") == "imagenet" else "cifar10"}}, "test")
    (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    rows = [{"epoch": e, "iteration": iterations_per_epoch * e, "lr": 0.1, "train_images": 32 * iterations_per_epoch,
             "partial": 0, "train_loss": 1.0, "train_error": train_error + (0 if e == epochs else 10),
             "test_loss": 1.0, "test_error": test_error + (0 if e == epochs else 10), "epoch_seconds": 1.0,
             "images_per_second": 100.0} for e in range(1, epochs + 1)]
    if partial_train_error is not None:  # a fifth of an epoch more
        rows.append({**rows[-1], "epoch": epochs + 1, "iteration": rows[-1]["iteration"] + iterations_per_epoch // 5,
                     "train_images": 32 * (iterations_per_epoch // 5), "partial": 1,
                     "train_error": partial_train_error})
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    if status is not None:
        (folder / "final.json").write_text(json.dumps({
            "status": status, "final_test_error": test_error, "iterations": rows[-1]["iteration"],
            "wall_seconds": 1.0, **(final or {})}))
    return folder


def claims_by_text(tmp_path, suite_path, responses=None):
    suite = read_suite(suite_path)
    return {c.text: c for c in evaluate_claims(suite, find_runs(tmp_path, suite), responses)}


def test_table6_aggregates_finished_seeds_and_lists_the_others(tmp_path):
    for seed, error in enumerate([8.0, 9.0, 10.0]):
        write_run(tmp_path, "cifar_resnet20", seed, train_error=1.0, test_error=error)
    write_run(tmp_path, "cifar_resnet20", 3, train_error=90.0, test_error=90.0, status="diverged")
    write_run(tmp_path, "cifar_resnet20", 4, train_error=5.0, test_error=1.0, status=None, epochs=2)
    make_report(tmp_path, write_suite(tmp_path))

    row = pd.read_csv(tmp_path / "tables" / "table6.csv").set_index("model").loc["cifar_resnet20"]
    assert (row.n, row.seeds_expected) == (3, 5)
    assert row.test_error_mean == pytest.approx(9.0)
    assert row.test_error_std == pytest.approx(1.0)  # sample std of 8, 9, 10
    assert row.test_error_best == 8.0
    assert row["diff"] == pytest.approx(9.0 - 8.75)
    assert row.params == 269_722
    assert row.not_counted == "seed 3: diverged at iteration 200; seed 4: in progress (iteration 100 of 200)"
    shown = (tmp_path / "tables" / "table6.md").read_text()
    assert "| 9.00 ± 1.00" in shown and "3/5" in shown


def test_one_seed_shows_no_spread(tmp_path):
    write_run(tmp_path, "cifar_resnet56", 0, train_error=0.5, test_error=7.25)
    make_report(tmp_path, write_suite(tmp_path))
    table = pd.read_csv(tmp_path / "tables" / "table6.csv").set_index("model")
    assert table.loc["cifar_resnet56", "n"] == 1 and pd.isna(table.loc["cifar_resnet56", "test_error_std"])
    assert pd.isna(table.loc["cifar_plain56", "test_error_mean"]) and table.loc["cifar_plain56", "n"] == 0
    row = next(line for line in (tmp_path / "tables" / "table6.md").read_text().splitlines()
               if line.startswith("| ResNet-56"))
    assert "7.25" in row and "±" not in row.split("|")[3]


@pytest.mark.parametrize("plain20, plain56, verdict", [(1.0, 5.0, PASS), (5.0, 1.0, FAIL)])
def test_degradation_verdict_follows_the_training_errors(tmp_path, plain20, plain56, verdict):
    write_run(tmp_path, "cifar_plain20", 0, train_error=plain20, test_error=9.0)
    write_run(tmp_path, "cifar_plain56", 0, train_error=plain56, test_error=9.0)
    claim = claims_by_text(tmp_path, write_suite(tmp_path))[
        "Deeper plain nets have higher final training error on CIFAR-10"]
    assert claim.verdict == verdict
    assert f"plain-20 {plain20:.2f} (n=1)" in claim.evidence and f"plain-56 {plain56:.2f} (n=1)" in claim.evidence


def test_tolerance_and_imagenet_claims(tmp_path):
    write_run(tmp_path, "cifar_resnet20", 0, train_error=1.0, test_error=8.75 + 0.29)
    write_run(tmp_path, "cifar_resnet56", 0, train_error=1.0, test_error=6.97 - 0.31)
    ten_crop = {"imagenet_plain34": 28.0, "imagenet_resnet34": 29.0}  # ResNet-34 worse: the claim fails
    for name, top1 in ten_crop.items():
        write_run(tmp_path, name, 0, train_error=20.0, test_error=30.0, final={
            "ten_crop_top1_error": top1, "ten_crop_top5_error": 9.0,
            "center_top1_error": 30.0, "center_top5_error": 10.0})
    claims = claims_by_text(tmp_path, write_suite(tmp_path))
    assert claims["ResNet-20 test error within ±0.3 pp of the paper's 8.75"].verdict == PASS
    assert claims["ResNet-56 test error within ±0.3 pp of the paper's 6.97"].verdict == FAIL
    assert claims["ResNet-34 beats plain-34 (10-crop top-1 error)"].verdict == FAIL
    assert claims["ResNet-34 10-crop top-1 error within ±1.0 pp of the paper's 25.03"].verdict == FAIL
    assert claims["plain-34 10-crop top-1 error within ±1.0 pp of the paper's 28.54"].verdict == PASS
    # the ResNet chain lacks ResNet-32/44/110: not judged on part of its evidence
    chain = claims["Deeper ResNets have lower test error on CIFAR-10"]
    assert chain.verdict == NOT_RUN and "ResNet-32 (not in the suite)" in chain.evidence

    table2 = pd.read_csv(make_report(tmp_path, write_suite(tmp_path)).parent / "tables" / "table2.csv")
    row = table2.set_index("model").loc["imagenet_resnet34"]
    assert (row.ten_crop_top1_mean, row.paper_top1, row.paper_top5) == (29.0, 25.03, 7.76)
    assert row["diff"] == pytest.approx(29.0 - 25.03)
    assert not (tmp_path / "tables" / "table3.csv").exists()  # the suite runs no Table 3 extras


@pytest.mark.parametrize("resnet_std, verdict", [(0.5, PASS), (2.0, FAIL)])
def test_response_verdict_follows_the_responses(tmp_path, resnet_std, verdict):
    responses = pd.DataFrame([
        {"model": model, "seed": seed, "layer_index": i, "layer": f"layer{i}", "std": std, "mean_channel_std": std}
        for model, std in (("cifar_plain20", 1.0), ("cifar_resnet20", resnet_std))
        for seed in (0, 1) for i in range(19)])
    claims = claims_by_text(tmp_path, write_suite(tmp_path), responses)
    assert claims["ResNet-20 has smaller layer responses than plain-20"].verdict == verdict
    assert claims["ResNet-56 has smaller layer responses than plain-56"].verdict == NOT_RUN


def test_empty_results_give_a_report_of_runs_not_started(tmp_path):
    (tmp_path / "results").mkdir()
    report = make_report(tmp_path / "results", write_suite(tmp_path), out_dir=tmp_path / "out")
    text = report.read_text()
    claim_lines = [line for line in text.splitlines() if line.startswith("- **")]
    assert claim_lines and all(line.startswith(f"- **{NOT_RUN}**") for line in claim_lines)
    for title in ("Figure 6", "Figure 4", "Figure 7"):
        assert f"### {title}: NOT RUN" in text
    assert re.search(r"\| cifar_resnet20 +\| +4 \| not started +\|", text)
    assert "24 not started." in text  # 4 CIFAR specs x 5 seeds + 4 ImageNet specs x 1 seed
    assert "no finished run of plain-20 (5 not started); plain-56 (5 not started)" in text
    assert not (tmp_path / "out" / "figures").exists()


def test_suite_errors_name_the_file(tmp_path):
    with pytest.raises(ReproError, match="does not exist"):
        read_suite(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("figures: {fig6_left: cifar_plain20}\n")
    with pytest.raises(ReproError, match=r"bad.yaml: fig6_left: expected a list"):
        read_suite(bad)


def test_error_figure_draws_train_and_test_per_network(tmp_path):
    for seed, error in enumerate([8.0, 10.0]):
        write_run(tmp_path, "cifar_resnet20", seed, train_error=1.0, test_error=error)
    write_run(tmp_path, "cifar_resnet56", 0, train_error=0.5, test_error=7.0)
    write_run(tmp_path, "cifar_plain20", 0, train_error=2.0, test_error=9.0)
    suite = read_suite(write_suite(tmp_path))
    panels = [["cifar_plain20", "cifar_plain56"], ["cifar_resnet20", "cifar_resnet56"]]
    figure = figures.error_figure(panels, find_runs(tmp_path, suite), **figures.FIG6)
    left, middle = figure.axes
    assert [len(left.lines), len(middle.lines)] == [2, 4]  # dashed training + bold test per network
    assert [line.get_linestyle() for line in middle.lines] == ["--", "-", "--", "-"]
    assert left.get_ylim() == (0.0, 20.0)  # the paper's range: the curves end inside it
    # the mean over the two ResNet-20 seeds ends at 9, between them
    assert middle.lines[1].get_ydata()[-1] == pytest.approx(9.0)
    for path in figures.save_figure(figure, tmp_path / "figures", "fig6"):
        assert path.stat().st_size > 0
    with Image.open(tmp_path / "figures" / "fig6.png") as png:
        assert png.size[0] == pytest.approx(2 * figures.PANEL_SIZE[0] * figures.DPI, rel=0.02)


def test_error_range_widens_for_high_errors(tmp_path):
    write_run(tmp_path, "cifar_plain20", 0, train_error=60.0, test_error=70.0)
    suite = read_suite(write_suite(tmp_path))
    figure = figures.error_figure([["cifar_plain20"]], find_runs(tmp_path, suite), **figures.FIG6)
    low, high = figure.axes[0].get_ylim()
    assert low == 0 and 80 <= high <= 100


def test_no_runs_means_no_figure(tmp_path):
    suite = read_suite(write_suite(tmp_path))
    assert figures.error_figure([["cifar_plain20"]], find_runs(tmp_path, suite), **figures.FIG6) is None


def test_response_figure_has_one_curve_per_network():
    responses = pd.DataFrame([{"model": m, "layer_index": i, "std": 1.0 + i % 3}
                              for m, layers in (("cifar_plain20", 19), ("cifar_resnet56", 55)) for i in range(layers)])
    networks = [Network.of(load_spec(EXPERIMENTS / "cifar10" / f"{n}.yaml")) for n in ("plain20", "resnet56", "resnet110")]
    figure = figures.response_figure(responses, networks)
    top, bottom = figure.axes
    assert len(top.lines) == len(bottom.lines) == 2
    sorted_curve = bottom.lines[1].get_ydata()
    assert list(sorted_curve) == sorted(sorted_curve, reverse=True) and len(sorted_curve) == 55


def test_latex_is_well_formed_and_escaped(tmp_path):
    write_run(tmp_path, "cifar_resnet20", 0, train_error=1.0, test_error=8.0)
    runs = find_runs(tmp_path, read_suite(write_suite(tmp_path)))
    frame = table6_frame(runs, ["cifar_resnet20", "cifar_resnet56"])
    frame.loc[1, "label"] = "cifar_resnet56_a&b%"  # special characters in a shown name
    _, _, tex_path = write_table6(frame, tmp_path / "tables")
    tex = tex_path.read_text()
    assert re.findall(r"\\begin\{(\w+)\}", tex) == list(reversed(re.findall(r"\\end\{(\w+)\}", tex)))
    assert r"cifar\_resnet56\_a\&b\%" in tex and r"Test error (\%)" in tex
    assert not re.search(r"(?<!\\)[%_]", tex)  # every % and _ escaped
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    columns = tex.split("\\begin{tabular}{")[1].split("}")[0]
    assert len(body) == 2 and all(len(re.findall(r"(?<!\\)&", row)) == len(columns) - 1 for row in body)


def test_training_error_claims_read_the_last_full_epoch(tmp_path):
    """The row of an epoch cut short by max_iters is drawn but read by no claim; REPORT.md says so."""
    write_run(tmp_path, "cifar_plain20", 0, train_error=1.0, test_error=9.0, partial_train_error=50.0)
    write_run(tmp_path, "cifar_plain56", 0, train_error=5.0, test_error=9.0, partial_train_error=0.5)
    suite_path = write_suite(tmp_path)
    claim = claims_by_text(tmp_path, suite_path)["Deeper plain nets have higher final training error on CIFAR-10"]
    assert claim.verdict == PASS and "plain-20 1.00 (n=1) < plain-56 5.00 (n=1)" in claim.evidence

    figure = figures.error_figure([["cifar_plain20"]], find_runs(tmp_path, read_suite(suite_path)), **figures.FIG6)
    train_curve = figure.axes[0].lines[0]
    assert train_curve.get_ydata()[-1] == 50.0 and train_curve.get_xdata()[-1] == 210  # the curve keeps it

    report = make_report(tmp_path, suite_path).read_text()
    assert "Training errors, which the plain-net claims compare, are the running training error of the " \
           "last full epoch: the last metrics.csv row with partial=0" in report


def test_a_csv_without_the_partial_column_counts_as_full_epochs(tmp_path):
    for name, error in (("cifar_plain20", 1.0), ("cifar_plain56", 5.0)):
        metrics = write_run(tmp_path, name, 0, train_error=error, test_error=9.0) / "metrics.csv"
        pd.read_csv(metrics).drop(columns=["train_images", "partial"]).to_csv(metrics, index=False)
    claim = claims_by_text(tmp_path, write_suite(tmp_path))["Deeper plain nets have higher final training error on CIFAR-10"]
    assert claim.verdict == PASS and "plain-20 1.00 (n=1) < plain-56 5.00 (n=1)" in claim.evidence


def test_report_says_the_paper_counts_single_runs_but_for_resnet110(tmp_path):
    write_run(tmp_path, "cifar_resnet20", 0, train_error=1.0, test_error=8.5)
    write_run(tmp_path, "cifar_resnet20", 1, train_error=1.0, test_error=9.5)
    report = make_report(tmp_path, write_suite(tmp_path)).read_text()
    said = ("The paper's numbers are single runs, except ResNet-110, which Table 6 prints over 5 runs: "
            "mean ± std 6.61 ± 0.16, best 6.43.")
    table6 = (tmp_path / "tables" / "table6.md").read_text()
    assert said in report and said in table6
    row = next(line for line in table6.splitlines() if line.startswith("| ResNet-20"))
    assert "| 9.00 ± 0.71" in row and "| 8.50 " in row  # the mean, and the best run beside it


def test_report_on_a_missing_results_folder_says_so(tmp_path, capsys):
    suite = write_suite(tmp_path)
    missing = tmp_path / "no-such-results"
    with pytest.raises(ReproError, match="results folder .*no-such-results does not exist"):
        make_report(missing, suite)
    assert main(["report", "--results", str(missing), "--suite", str(suite)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("repro report: error: results folder") and len(error.strip().splitlines()) == 1
    assert not missing.exists()


@pytest.mark.parametrize("file, content", [
    ("metrics.csv", "epoch,iteration,train_error,test_error\n1,50,1.0,9.0\n2,100,1.0,9.0,7,7\n"),
    ("metrics.csv", b"\x80\xff\xfe garbage"),
    ("config.yaml", "model: [unclosed\n"),
    ("config.yaml", "model: {depth: 21}\ndata: {dataset: cifar10}\n"),
    ("final.json", "{not json"),
])
def test_a_damaged_run_is_named_and_the_report_goes_on(tmp_path, capsys, file, content):
    for seed, error in enumerate([8.0, 9.0, 10.0]):
        folder = write_run(tmp_path, "cifar_resnet20", seed, train_error=1.0, test_error=error)
    damaged = tmp_path / "runs" / "cifar_resnet20" / "seed1" / file
    damaged.write_bytes(content) if isinstance(content, bytes) else damaged.write_text(content)
    report = make_report(tmp_path, write_suite(tmp_path)).read_text()

    row = pd.read_csv(tmp_path / "tables" / "table6.csv").set_index("model").loc["cifar_resnet20"]
    assert (row.n, row.test_error_mean, row.test_error_best) == (2, 9.0, 8.0)  # seeds 0 and 2
    assert row.not_counted.startswith(f"seed 1: damaged ({file}: ")
    assert re.search(rf"\| cifar_resnet20 +\| +1 \| damaged \({re.escape(file)}: ", report)
    assert "1 damaged" in report and "delete" not in report.lower()
    assert "folder is left as it is" in report
    assert f"{damaged.parent} is damaged ({file}: " in capsys.readouterr().err
    assert damaged.exists() and (folder / "metrics.csv").exists()  # a report changes nothing


def test_networks_come_from_the_specs_not_their_names(tmp_path):
    """A spec named `baseline` that trains plain-32: its config.yaml says so. A spec that has not started
    is read from its file beside the suite."""
    write_run(tmp_path, "baseline", 0, train_error=2.0, test_error=9.0,
              model={"arch": "cifar", "depth": 32, "residual": False})
    suite_path = write_suite(tmp_path, {"seeds": {"cifar10": 1},
                                        "figures": {"fig6_left": ["baseline", "cifar_plain56"]},
                                        "tables": {"table6": ["baseline", "cifar_resnet110"]}})
    runs = find_runs(tmp_path, read_suite(suite_path))
    make_report(tmp_path, suite_path)

    table = pd.read_csv(tmp_path / "tables" / "table6.csv").set_index("model")
    assert table.loc["baseline", "label"] == "plain-32" and table.loc["baseline", "params"] == 464_154
    assert table.loc["cifar_resnet110", "label"] == "ResNet-110" and table.loc["cifar_resnet110", "params"] == 1_727_962
    figure = figures.error_figure([["baseline", "cifar_plain56"]], runs, **figures.FIG6)
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend[0] == "plain-32" and figure.axes[0].lines[0].get_color() == figures.DEPTH_COLOURS[32]
    responses = pd.DataFrame([{"model": "baseline", "layer_index": i, "std": 1.0} for i in range(31)])
    fig7 = figures.response_figure(responses, [runs["baseline"][0].network])
    assert fig7.axes[0].lines[0].get_linestyle() == "--"  # a plain net, whatever its name

    with pytest.raises(ReproError, match="names the spec 'nowhere'"):
        find_runs(tmp_path, read_suite(write_suite(tmp_path, {"tables": {"table6": ["nowhere"]}})))


@pytest.mark.parametrize("spec, label", [
    ("cifar10/plain20", "plain-20"), ("cifar10/resnet110", "ResNet-110"), ("imagenet/resnet34", "ResNet-34"),
    ("imagenet/resnet34_B", "ResNet-34 B"), ("imagenet/resnet34_C", "ResNet-34 C"), ("imagenet/plain34", "plain-34"),
])
def test_labels_are_the_papers_names(spec, label):
    assert Network.of(load_spec(EXPERIMENTS / f"{spec}.yaml")).label == label


def test_the_extras_claims_say_not_asked_for_unless_the_extras_were_asked_for(tmp_path):
    suite = {**SUITE, "extras": ["imagenet_resnet34_B", "imagenet_resnet50"]}
    path = write_suite(tmp_path, suite)
    runs = find_runs(tmp_path, read_suite(path))
    b_text = "ResNet-34 B 10-crop top-1 error within ±1.0 pp of the paper's 24.52"
    table4_text = "ResNet-50 B multi-scale top-1 error within ±1.0 pp of the paper's 20.74"
    plain = {c.text: c for c in evaluate_claims(read_suite(path), runs, None)}
    assert plain[b_text].verdict == NOT_ASKED and table4_text not in plain  # Table 4 is not made at all
    asked = {c.text: c for c in evaluate_claims(read_suite(path), runs, None, extras=True)}
    assert asked[b_text].verdict == NOT_RUN and asked[table4_text].verdict == NOT_RUN
    report = make_report(tmp_path, path, extras=True).read_text()
    assert "Table 4" in report and f"**{NOT_ASKED}**" not in report


def test_tables_say_which_bn_statistics_they_read(tmp_path):
    write_run(tmp_path, "cifar_resnet20", 0, train_error=1.0, test_error=8.0, final={"bn_stats": "precise"})
    write_run(tmp_path, "cifar_resnet20", 1, train_error=1.0, test_error=8.0)  # written before the choice
    write_run(tmp_path, "cifar_resnet56", 0, train_error=1.0, test_error=7.0, final={"bn_stats": "precise"})
    make_report(tmp_path, write_suite(tmp_path))
    table = pd.read_csv(tmp_path / "tables" / "table6.csv").set_index("model")
    assert table.loc["cifar_resnet20", "bn_stats"] == "moving, precise"
    assert table.loc["cifar_resnet56", "bn_stats"] == "precise"
    header = (tmp_path / "tables" / "table6.md").read_text().splitlines()[2]
    assert "BN" in [cell.strip() for cell in header.split("|")]
