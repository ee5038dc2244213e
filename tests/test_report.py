"""Tables and figures of a synthetic study (tests/test_analysis.py): rows, numbers, images, data."""
import copy
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib import image

from dbp import analysis as A
from dbp import figures as F
from dbp import report as R
from dbp.config import load_config, to_dict
from test_analysis import BATCH, MIOU, SWEEP, write_study

FIGURES = {"loss_vs_time", "loss_vs_steps", "decorrelation", "time_to_target", "energy_to_target",
           "miou", "sweep_heatmap"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def written(study):
    return R.write_report(study, "synthetic", n_boot=2000)


@pytest.fixture(scope="module")
def analysis(study):
    return R.analyze(study, "synthetic", n_boot=2000)


def _table_rows(path) -> list[list[str]]:
    """The body rows of the Markdown table in `path`, as cells."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[1:]]


# ----------------------------------------------------------------------------- FLOPs model

def test_macs_per_step_counts_the_matched_layers():
    info = {"arm": "dbp", "config": to_dict(load_config(None)), "effective_batch": BATCH}
    bp, extra = R.macs_per_step(info)
    tokens = BATCH * (1 + 16)  # mae_vit_tiny_patch4_32: 64 patches, 16 visible, + cls
    e = 128
    blocks = [(3 * e, e), (e, e), (4 * e, e), (e, 4 * e)]  # qkv, proj, fc1, fc2 of 4 blocks
    assert extra == 4 * A.dbp_extra_macs(blocks, tokens, 0.1, 1, True)
    assert R.macs_per_step({**info, "arm": "bp"}) == (bp, 0.0)
    assert R.macs_per_step({**info, "arm": "identity"}) == (bp, extra)
    cfg = copy.deepcopy(info["config"])
    cfg["dbp"].update(patch_embed=True, every=2)  # + the patch embedding on all 64 patches
    _, swept = R.macs_per_step({**info, "config": cfg})
    assert swept == 4 * A.dbp_extra_macs(blocks, tokens, 0.1, 2, True) + \
        A.dbp_extra_macs([(e, 3 * 4 * 4)], BATCH * 64, 0.1, 2, True)


# ----------------------------------------------------------------------------- tables

def test_report_files(written, study):
    names = {p.name for p in written}
    for table in ("headline", "relaxed", "per_seed", "overhead", "sweep", "equal_budget"):
        assert {f"{table}.md", f"{table}.tex"} <= names
    assert {"pretrain_runs.csv", "finetune_runs.csv", "time_to_target.csv", "comparisons.csv"} <= names
    assert all(p.parent == study and p.stat().st_size > 0 for p in written)
    assert not list(study.glob(".*.tmp"))


def test_headline_beside_the_paper(written, study):
    rows = {r[0]: r for r in _table_rows(study / "headline.md")}
    wall = rows["Wall-clock to target: reduction"]
    assert wall[1].startswith("50.0 %") and wall[2] == "21.1 %" and "BP 1" in wall[3]
    assert rows["CO2eq to target: reduction"][2] == "21.4 %"
    assert rows["Speed-up T_BP / T_DBP"][1].startswith("2.00x")
    miou = rows["mIoU change (points, mean)"]
    assert miou[1].startswith("+1.17") and miou[2] == "+1.1"
    assert "p = 0.25 (sign)" in wall[4]
    tex = (study / "headline.tex").read_text()
    assert r"\begin{tabular}" in tex and r"50.0 \%" in tex and r"$\infty$" in tex


def test_per_seed_overhead_sweep_rows(written, study):
    per_seed = _table_rows(study / "per_seed.md")
    arms = ("bp", "dbp", "identity")
    assert [(r[0], r[1]) for r in per_seed] == [(a, str(s)) for a in arms for s in range(3)]
    dbp0 = per_seed[3]
    assert dbp0[4] == "25.0" and dbp0[9] == "1.60x" and dbp0[10] == "37.5 %" and dbp0[11] == "31.00"
    assert per_seed[2][4] == "∞"  # BP seed 2: not reached, shown, not dropped
    overhead = {r[0]: r for r in _table_rows(study / "overhead.md")}
    assert set(overhead) == {"bp", "dbp", "identity"} and overhead["dbp"][3].startswith("1.250")
    sweep = _table_rows(study / "sweep.md")
    assert [r[0] for r in sweep] == sorted(SWEEP)
    relaxed = _table_rows(study / "relaxed.md")
    assert [r[0].split()[0] for r in relaxed] == ["+0%", "+1%", "+2%", "+5%"]


def test_tidy_csvs_round_trip(written, study):
    ttt = pd.read_csv(study / "time_to_target.csv")
    assert len(ttt) == 13 * len(A.RELAXED) and np.isinf(ttt["train_seconds"]).any()
    assert {"flops", "relax", "target", "reached"} <= set(ttt.columns)
    assert len(pd.read_csv(study / "pretrain_runs.csv")) == len(A.load_pretrain(study))


def test_one_seed_report_says_degenerate(tmp_path):
    R.write_report(write_study(tmp_path, seeds=(0,), sweep=False, finetune=False), "one", n_boot=100)
    text = (tmp_path / "headline.md").read_text()
    assert "degenerate" in text and "n/a (no paired fine-tunes)" in text
    assert "no sweep points" in (tmp_path / "sweep.md").read_text()


# ----------------------------------------------------------------------------- figures

def test_figures_written_at_size(study, tmp_path):
    paths = F.write_figures(study, tmp_path / "figs", "synthetic", n_boot=500)
    assert {p.stem for p in paths} == FIGURES and len(paths) == 2 * len(FIGURES)
    for p in paths:
        assert p.stat().st_size > 1000
        if p.suffix == ".png":
            assert image.imread(p).shape[:2] == (720, 960)  # 6.4 x 4.8 in at 150 dpi
        else:
            assert p.read_bytes().startswith(b"%PDF")
    assert not list((tmp_path / "figs").glob(".*.tmp"))


def test_figures_skip_absent_data(tmp_path):
    assert F.write_figures(tmp_path / "nothing", tmp_path / "f0", "empty") == []
    plain = write_study(tmp_path / "s", sweep=False, finetune=False)
    paths = F.write_figures(plain, tmp_path / "f1", "s", n_boot=100)
    assert {p.stem for p in paths} == FIGURES - {"miou", "sweep_heatmap"}


def test_time_to_target_bars_match_table(analysis, written, study):
    fig, data = F.fig_time_to_target(analysis)
    ttt = pd.read_csv(study / "time_to_target.csv")
    medians = ttt[(ttt["relax"] == 0) & ttt["run_id"].isin(["bp", "dbp", "identity"])] \
        .groupby("run_id")["train_seconds"].median()
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert list(data["run_id"]) == ["bp", "dbp", "identity"]
    assert heights == pytest.approx([medians[r] for r in data["run_id"]]) == [50.0, 25.0, 62.5]


def test_energy_and_miou_bars_match_tables(analysis, study):
    fig, data = F.fig_energy(analysis)
    co2 = pd.read_csv(study / "time_to_target.csv").query("relax == 0 and run_id == 'dbp'")["co2_kg"]
    assert fig.axes[1].patches[1].get_height() == pytest.approx(1e3 * co2.median())
    fig, data = F.fig_miou(analysis)
    ft = pd.read_csv(study / "finetune_runs.csv").groupby("run_id")["mIoU"].mean()
    assert list(data["run_id"]) == ["bp", "dbp", "scratch"]
    heights = [b.get_height() for b in fig.axes[0].patches]
    assert heights == pytest.approx([100 * ft[r] for r in data["run_id"]])
    assert 100 * np.mean(MIOU["dbp"]) == pytest.approx(fig.axes[0].patches[1].get_height())


def test_loss_curve_and_sweep_data(analysis):
    fig, data = F.fig_loss(analysis, "step")
    line = fig.axes[0].lines[1]  # dbp
    dbp = data[data["run_id"] == "dbp"]
    assert list(line.get_ydata()) == pytest.approx(list(dbp["mean"]))
    assert dbp.loc[dbp["step"] == 20, "mean"].item() == pytest.approx(np.mean([0.51, 0.50, 0.60]))
    assert analysis.target in [ln.get_ydata()[0] for ln in fig.axes[0].lines]
    _, grid = F.fig_sweep(analysis)
    assert grid.shape == (2, 2) and grid.loc[0.1, 1e-3] == 0.44 and grid.loc[0.5, 1e-3] == math.inf


def test_not_reached_median_is_a_hatched_bar_to_the_top(analysis):
    ttt = analysis.ttt.copy()
    ttt.loc[ttt["run_id"] == "identity", ["train_seconds", "reached"]] = [math.inf, False]
    fig, data = F.fig_time_to_target(dataclasses.replace(analysis, ttt=ttt))
    bars = fig.axes[0].patches
    assert data.set_index("run_id").loc["identity", "median"] == math.inf
    assert bars[2].get_hatch() == "//"
    assert bars[2].get_height() == pytest.approx(fig.axes[0].get_ylim()[1] / 1.02)  # the top
    assert bars[1].get_hatch() is None and bars[1].get_height() == 25.0
