"""Reports from run folders written here with known numbers: statistics over seeds, run states,
verdicts that follow the numbers, figures, and well-formed tables."""
import json
import re

import pandas as pd
import pytest
import yaml
from PIL import Image

from repro.errors import ReproError
from repro.reports import figures, make_report
from repro.reports.runs import find_runs, read_suite
from repro.reports.summaries import table6_frame, write_table6
from repro.reports.verdict import FAIL, NOT_RUN, PASS, evaluate_claims
from repro.spec import validate

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
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def write_run(results, name, seed, *, train_error, test_error, status="finished", epochs=4,
              iterations_per_epoch=50, max_iters=200, final=None):
    """A run folder in the project's format whose last epoch ends at the given errors; the earlier
    epochs are 10 points higher. status None leaves it in progress (no final.json)."""
    folder = results / "runs" / name / f"seed{seed}"
    folder.mkdir(parents=True)
    arch, kind, depth = re.fullmatch(r"(cifar|imagenet)_(plain|resnet)(\d+)", name).groups()
    config = validate({"name": name, "seed": seed, "optim": {"max_iters": max_iters},
                       "model": {"arch": arch, "depth": int(depth), "residual": kind == "resnet"},
                       "data": {"dataset": "cifar10" if arch == "cifar" else "imagenet"}}, "test")
    (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    last = epochs - 1
    pd.DataFrame({
        "epoch": range(1, epochs + 1),
        "iteration": [iterations_per_epoch * (e + 1) for e in range(epochs)],
        "lr": 0.1, "train_loss": 1.0,
        "train_error": [train_error + (0 if e == last else 10) for e in range(epochs)],
        "test_loss": 1.0,
        "test_error": [test_error + (0 if e == last else 10) for e in range(epochs)],
        "epoch_seconds": 1.0, "images_per_second": 100.0,
    }).to_csv(folder / "metrics.csv", index=False)
    if status is not None:
        (folder / "final.json").write_text(json.dumps({
            "status": status, "final_test_error": test_error, "best_test_error": test_error,
            "best_epoch": epochs, "iterations": iterations_per_epoch * epochs, "wall_seconds": 1.0,
            **(final or {})}))
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
        {"model": model, "seed": seed, "layer_index": i, "layer": f"layer{i}", "std": std}
        for model, std in (("cifar_plain20", 1.0), ("cifar_resnet20", resnet_std))
        for seed in (0, 1) for i in range(19)])
    claims = claims_by_text(tmp_path, write_suite(tmp_path), responses)
    assert claims["ResNet-20 has smaller layer responses than plain-20"].verdict == verdict
    assert claims["ResNet-56 has smaller layer responses than plain-56"].verdict == NOT_RUN


def test_empty_results_give_a_report_of_runs_not_started(tmp_path):
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
    figure = figures.response_figure(responses, ["cifar_plain20", "cifar_resnet56", "cifar_resnet110"])
    top, bottom = figure.axes
    assert len(top.lines) == len(bottom.lines) == 2
    sorted_curve = bottom.lines[1].get_ydata()
    assert list(sorted_curve) == sorted(sorted_curve, reverse=True) and len(sorted_curve) == 55


def test_latex_is_well_formed_and_escaped(tmp_path):
    write_run(tmp_path, "cifar_resnet20", 0, train_error=1.0, test_error=8.0)
    runs = find_runs(tmp_path, read_suite(write_suite(tmp_path)))
    frame = table6_frame(runs, ["cifar_resnet20", "cifar_resnet56"])
    frame.loc[1, "model"] = "cifar_resnet56_a&b%"  # not a registry-style name: shown as it is
    _, _, tex_path = write_table6(frame, tmp_path / "tables")
    tex = tex_path.read_text()
    assert re.findall(r"\\begin\{(\w+)\}", tex) == list(reversed(re.findall(r"\\end\{(\w+)\}", tex)))
    assert r"cifar\_resnet56\_a\&b\%" in tex and r"Test error (\%)" in tex
    assert not re.search(r"(?<!\\)[%_]", tex)  # every % and _ escaped
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    columns = tex.split("\\begin{tabular}{")[1].split("}")[0]
    assert len(body) == 2 and all(len(re.findall(r"(?<!\\)&", row)) == len(columns) - 1 for row in body)
