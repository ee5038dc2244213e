"""Tables and figures of the synthetic study (tests/test_analysis.py): rows, numbers, images."""
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib import image

from dbp import figures as F
from dbp import report as R
from test_analysis import EQUAL, write_study

FIGURES = {"loss_vs_time", "loss_vs_steps", "decorrelation", "budget_curves", "time_to_target",
           "energy_to_target", "miou", "downstream"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = write_study(tmp_path_factory.mktemp("study"))
    (root / "tuning").mkdir()
    from dbp.analysis import select_tuned
    (root / "tuning" / "selected.json").write_text(json.dumps(
        select_tuned(root, ["bp", "dbp"], ["pretrain.blr"], [200], {"identity": "bp"})))
    return root


@pytest.fixture(scope="module")
def written(study):
    return R.write_report(study, "synthetic")


@pytest.fixture(scope="module")
def analysis(study):
    return R.analyze(study, "synthetic")


def _rows(path) -> dict[str, list[str]]:
    """The body rows of the Markdown table in `path`, keyed by their first cell."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("| ")]
    rows = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[1:]]
    return {r[0] + ("" if len(rows) == len({x[0] for x in rows}) else f"/{r[1]}"): r for r in rows}


def test_report_files(written, study):
    names = {p.name for p in written}
    for table in ("headline", "arms", "relaxed", "per_seed", "overhead", "tuning", "budgets", "sweep"):
        assert {f"{table}.md", f"{table}.tex"} <= names
    assert {"time_to_target.csv", "comparisons.csv", "segments.csv", "budget_runs.csv"} <= names
    assert not list(study.glob(".*.tmp"))


def test_headline_numbers_and_flags(written, study):
    rows = _rows(study / "headline.md")
    # primary: the budget curves of seeds 0 and 1, BP at 25 x 2^0.8 s (log-budget), DBP at most
    # 31.25 s: each seed's speed-up is at least 0.8 x 2^0.8 = 1.393, and no more is known
    primary = rows["Wall-clock to target, budget curve (primary)"]
    assert primary[1] == "1.39x median (in [1.39x, ∞]) [1.39x, ∞] (range of 2 seeds)"
    assert primary[2] == f"{100 * (1 - 1 / (0.8 * 2 ** 0.8)):.1f} %" and primary[3] == "21.1 %"
    assert primary[4] == "2 (0 exact, 2 at least, 0 at most)" and primary[5] == "p = 0.5 (signed-rank)"
    first = rows["Wall-clock to target, first crossing (steps x step time)"]
    g = (1.6 ** 4 * (40 / 37.5)) ** 0.2
    assert first[1].startswith(f"{g:.2f}x [") and "95 % t interval" in first[1]
    assert first[2] == f"{100 * (1 - 1 / g):.1f} %" and first[3] == "–"
    assert first[4] == "6 (both reached 5; missed: BP 1, arm 0)" and first[5] == "p = 0.0312 (sign-flip)"
    assert rows["Steps to target, first crossing"][1].startswith(f"{(2 ** 4 * 40 / 30) ** 0.2:.2f}x")
    energy = rows["Energy to target, first crossing (modelled)"]
    assert energy[3] == "–"  # a modelled figure is never set beside the paper's CO2
    assert rows["mIoU change vs bp (points)"][1].startswith("+1.17 [+1.00, +1.50] (range of 3 seeds)")
    text = (study / "headline.md").read_text()
    assert "CLOCK FLAG" in text and "seeds [1]" in text  # BP seed 1 was slowed by another process
    assert "1 of 106 scored training segments shared their cores" in text
    assert "identity/seed5 (running)" in text  # unfinished: listed, not scored
    assert "bp {'pretrain.blr': 0.02}" in text and "(from bp)" in text
    assert "not comparable with the paper's 21.4 % CO2" in text
    assert "No side-by-side step cost" in text and "median seconds per step over the unshared" in text


def test_per_seed_overhead_tuning_budget_rows(written, study):
    per_seed = _rows(study / "per_seed.md")
    assert per_seed["dbp/3"][5] == "50" and per_seed["dbp/3"][9] == "1.07x"  # sustained later
    assert per_seed["bp/5"][4] == "∞" and per_seed["bp/1"][7] == "130.0" and per_seed["bp/1"][12] == "1"
    assert per_seed["bp/1"][11] == "43.5 (interpolated)" and per_seed["dbp/0"][11] == "31.2 (at most)"
    # the primary quantity per seed: a bound (DBP at most 31.25 s against BP's 25 x 2^0.8 s)
    assert per_seed["dbp/0"][10] == ">= 1.39x" and per_seed["bp/0"][10] == "–" and per_seed["dbp/2"][10] == "–"
    assert "identity/5" not in per_seed
    overhead = _rows(study / "overhead.md")
    assert overhead["dbp"][3] == "not measured" and overhead["dbp"][5].startswith("1.250 [1.250, 1.250]")
    assert overhead["bp"][8] == "1 of 38"
    tuning = _rows(study / "tuning.md")
    assert [r for r, row in tuning.items() if row[-1].startswith("yes")] == ["bp__blr=0.02", "dbp__blr=0.01"]
    assert tuning["bp__blr=0.02"][-1] == "yes (margin 0.0500)" and tuning["bp__blr=0.02"][-2] == "yes"
    assert tuning["dbp__blr=0.02"][5] == "∞" and tuning["dbp__blr=0.02"][-2] == "no"  # diverged
    budgets = (study / "budgets.md").read_text()
    assert "43.5 s (interpolated)" in budgets and "31.2 s (at most)" in budgets  # 25 x 2^0.8
    relaxed = _rows(study / "relaxed.md")
    assert [r.split()[0] for r in relaxed] == ["+0%", "+1%", "+2%", "+5%"]
    arms = _rows(study / "arms.md")  # every arm beside BP: dbp as in the headline, the control
    assert list(arms) == ["dbp", "identity"]
    assert arms["dbp"][2] == "1.39x median (in [1.39x, ∞]) [1.39x, ∞] (range of 2 seeds)"
    assert arms["dbp"][6] == "tuned arm"
    assert arms["dbp"][4] == f"{(2 ** 4 * 40 / 30) ** 0.2:.2f}x" and arms["dbp"][5] == "not measured"
    assert arms["identity"][2] == "n/a (no budget ladder)" and arms["identity"][6] == "control of bp"


def test_downstream_table_probe_rows_and_per_class_csv(written, study):
    names = {p.name for p in written}
    assert {"downstream.md", "downstream.tex", "downstream.csv", "probe_runs.csv", "per_class_iou.csv"} <= names
    lines = [ln for ln in (study / "downstream.md").read_text().splitlines() if ln.startswith("| ")][1:]
    rows = {(r[0].split()[0], r[1], r[2]): r for r in ([c.strip() for c in ln.strip("|").split(" | ")]
                                                       for ln in lines)}
    dbp = rows[("Linear", "dbp", "bp")]
    assert dbp[3] == "62.5 vs 50.0" and dbp[4] == "26.67 vs 24.00"  # pre-training s, mean mIoU
    assert dbp[5] == "+2.67 [+2.00, +3.00] (range of 3 seeds)" and dbp[7] == "p = 0.25 (sign-flip)"
    assert rows[("Linear", "dbp", EQUAL)][3] == "62.5 vs 62.0"  # BP given DBP's wall-clock
    assert rows[("Linear", "bp", "scratch")][3] == "50.0 vs 0.0"
    assert rows[("Fine-tune", "dbp", "bp")][5].startswith("+1.17 [+1.00, +1.50]")
    headline = _rows(study / "headline.md")
    assert headline["Linear-probe mIoU change vs bp (points)"][1] == "+2.67 [+2.00, +3.00] (range of 3 seeds)"
    assert headline[f"Linear-probe mIoU change vs {EQUAL} (points)"][1].startswith("+2.33")
    assert headline["Linear-probe mIoU change vs bp (points)"][3] == "–"  # the paper's +1.1 is fine-tuned
    assert "Linear probe: a linear head on the frozen encoder's patch features (standardised), 3 head" \
        in (study / "headline.md").read_text()
    classes = (study / "per_class_iou.csv").read_text().splitlines()
    assert classes[0] == "run_id,class,iou,n,measure" and "dbp,wall,0.26666666666666666,3,probe" in classes


def test_readme_block_is_filled_from_the_headline(study, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{R.README_START}\nold\n{R.README_END}\noutro\n")
    R.write_report(study, "synthetic", readme=readme)
    text = readme.read_text()
    assert "\n".join((study / f"{t}.md").read_text()
                     for t in ("headline", "reading", "sensitivity", "stability", "arms", "downstream")) in text
    assert "**Reading (generated from the records).** DBP's budget curve reaches the target 1.39x" in text
    assert "old" not in text
    assert text.startswith("intro\n") and text.endswith("outro\n")
    with pytest.raises(ValueError, match="no <!-- headline:start -->"):
        R.update_readme(study / "headline.md", "x")


def test_results_side_imports_no_torch():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import dbp.analysis, dbp.stats, dbp.config, dbp.report, dbp.figures, dbp.cli\n"
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------- figures

def test_figures_written_at_size(study, tmp_path):
    paths = F.write_figures(study, tmp_path / "figs", "synthetic")
    assert {p.stem for p in paths} == FIGURES and len(paths) == 2 * len(FIGURES)
    for p in paths:
        if p.suffix == ".png":
            assert image.imread(p).shape[:2] == (720, 960)  # 6.4 x 4.8 in at 150 dpi
        else:
            assert p.read_bytes().startswith(b"%PDF")


def test_time_to_target_draws_every_seed_and_misses_above_the_axis(analysis):
    btt = analysis.budget_ttt.copy()
    btt.loc[(btt["arm"] == "bp") & (btt["seed"] == 1), ["seconds", "kind"]] = [math.inf, "miss"]
    fig, data = F.fig_time_to_target(dataclasses.replace(analysis, budget_ttt=btt))
    d = data.set_index("arm")
    assert d["misses"].to_dict() == {"bp": 1, "dbp": 0}
    assert d["geo_mean"].to_dict() == pytest.approx({"bp": 25 * 2 ** 0.8, "dbp": 31.25})  # budget curves, log-budget
    ax = fig.axes[0]
    top = ax.get_ylim()[1]
    crosses = [ln for ln in ax.lines if ln.get_marker() == "x"]
    assert len(crosses) == 1 and crosses[0].get_ydata()[0] > top / 1.12  # above the value axis
    seeds = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert [len(ln.get_xdata()) for ln in seeds] == [1, 2]  # bp: one seed reached, dbp: two


def test_loss_figure_draws_each_seed_and_keeps_identity_visible(analysis):
    fig, data = F.fig_loss(analysis, "step")
    lines = fig.axes[0].lines
    assert sum(ln.get_color() == "C1" for ln in lines) == 6  # one per DBP seed
    identity = [ln for ln in lines if ln.get_color() == "C2"]
    assert len(identity) == 5 and all(ln.get_linestyle() == "--" for ln in identity)
    assert fig.axes[0].get_yscale() == "log"


def test_loss_figure_zooms_a_second_panel_on_the_target(analysis):
    fig, data = F.fig_loss(analysis, "step")
    assert len(fig.axes) == 2
    whole, zoom = fig.axes
    low, high = zoom.get_ylim()
    lowest, target = data["val_loss"].min(), analysis.target  # 0.44 and 0.52 here
    assert lowest - 0.02 <= low <= lowest < target < high <= target * 1.1
    assert zoom.get_yscale() == "linear" and zoom.get_xlim() == (25, 50)  # second half of 50 steps
    for ax in (whole, zoom):  # the target in both panels
        assert any(list(ln.get_ydata()) == [target, target] for ln in ax.lines)
    assert any("zoomed" in t.get_text() for t in fig.texts)  # the caption says so


def test_downstream_figure_puts_every_encoder_at_its_pre_training_cost(analysis):
    fig, data = F.fig_downstream(analysis)
    probe = data[data["measure"] == "linear probe"].set_index("run_id")
    assert list(probe.index) == ["bp", "dbp", "scratch", EQUAL]
    assert probe["seconds"].to_dict() == pytest.approx({"bp": 50.0, "dbp": 62.5, "scratch": 0.0, EQUAL: 62.0})
    assert probe.loc["dbp", "mIoU"] == pytest.approx(0.2667, abs=1e-4) and len(fig.axes) == 2
    means = {ln.get_label(): ln for ln in fig.axes[0].lines if not ln.get_label().startswith("_")}
    assert means[EQUAL].get_color() == F.COLORS["bp"] and means[EQUAL].get_marker() == "D"


def test_energy_figure_is_labelled_modelled(analysis):
    fig, _ = F.fig_energy(analysis)
    assert "modelled" in fig._suptitle.get_text()
    none = dataclasses.replace(analysis, runs=analysis.runs.assign(energy_kind="none"))
    assert F.fig_energy(none) is None


def test_figures_skip_absent_data(tmp_path):
    assert F.write_figures(tmp_path / "nothing", tmp_path / "f0", "empty") == []
    plain = write_study(tmp_path / "s", finetune=False)
    paths = F.write_figures(plain, tmp_path / "f1", "s")
    assert {p.stem for p in paths} == FIGURES - {"miou"}
    assert math.isfinite(R.analyze(plain, "s").target)


# ----------------------------------------------------------------------------- the reference study

REPO = Path(__file__).resolve().parents[1]


def test_committed_reference_study_regenerates_its_tables_and_the_readme(tmp_path):
    """results/default holds the raw records of the README's study: re-analysing them gives
    the committed tables, and the README's result block is the committed headline."""
    committed = REPO / "results" / "default"
    copy = tmp_path / "default"

    def records_only(folder: str, names: list[str]) -> list[str]:  # not the tables, not weights
        top = Path(folder) == committed
        return [n for n in names if (top and n.endswith((".md", ".tex", ".csv")))
                or n.endswith((".pt", ".pth")) or n in ("logs", "export", "benchmarks")]
    shutil.copytree(committed, copy, ignore=records_only)
    R.write_report(copy, "default")
    for table in ("headline", "reading", "sensitivity", "stability", "arms", "downstream", "per_seed",
                  "overhead", "tuning", "budgets", "relaxed"):
        assert (copy / f"{table}.md").read_text() == (committed / f"{table}.md").read_text(), table
    assert "Left out" not in (copy / "headline.md").read_text()  # every run folder is the study's
    readme = (REPO / "README.md").read_text()
    block = readme.split(R.README_START)[1].split(R.README_END)[0]
    assert block == "\n" + R.readme_block({f"{t}.md": (committed / f"{t}.md").read_text()
                                           for t in ("reading", *R.README_TABLES)})
    runs = [json.loads(p.read_text()) for p in (committed / "pretrain").glob("*/seed*/run.json")]
    assert runs and all(r["status"] == "finished" and not r["provenance"]["git_dirty"] for r in runs)
    assert {r["role"] for r in runs} == {"target", "tuning", "scored", "downstream"}


def _records(tmp_path) -> Path:
    """A copy of the committed study's records (not its tables, not weights)."""
    committed = REPO / "results" / "default"
    copy = tmp_path / "default"
    shutil.copytree(committed, copy, ignore=lambda d, names: [
        n for n in names if (Path(d) == committed and n.endswith((".md", ".tex", ".csv", ".html")))
        or n.endswith((".pt", ".pth")) or n in ("logs", "export", "benchmarks")])
    return copy


@pytest.mark.parametrize("record", ["pretrain/dbp/seed3/metrics.csv", "stepcost/rounds.csv"])
def test_a_truncated_record_is_named_never_read(tmp_path, record):
    """Issue 24: a metrics.csv cut inside its last row, or a step-cost record cut in half, was
    read as valid and moved the speed-up with exit 0. Now the summary stops, naming the file."""
    copy = _records(tmp_path)
    path = copy / record
    text = path.read_text()
    path.write_text(text[: text.index("\n", len(text) // 2) - 3])  # cut inside a row
    out = subprocess.run([sys.executable, "-m", "dbp", "summarize", "--results", str(copy)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"dbp summarize: {path}: truncated (no header, or the last row is cut off)"]
    assert not (copy / "headline.md").exists()  # no tables from it


def test_a_deleted_scored_run_is_named(tmp_path):
    copy = _records(tmp_path)
    shutil.rmtree(copy / "pretrain" / "dbp" / "seed3")
    a = R.analyze(copy, "default")
    assert a.missing == ["dbp/seed3"] and a.stray == []
    # seed 3's budget curve keeps its 40- and 120-step runs; the flag names what it lacks
    assert sorted(a.budgets.query("arm == 'dbp' and seed == 3")["planned_steps"]) == [40, 120]
    assert "MISSING RUNS: 1 runs the study declares have no records (not scored, as unfinished runs " \
           "are not): dbp/seed3." in R._flags(a)


@pytest.mark.parametrize("record,what", [("pretrain/bp/seed0/run.json", "not a readable JSON file"),
                                         ("probe/dbp/seed1/metrics.json", "not a readable JSON file"),
                                         ("tuning/selected.json", "not a readable JSON file")])
def test_a_truncated_json_record_is_named_never_read(tmp_path, record, what):
    """Issue 24, every record the summary reads: a JSON file cut short stops it in one line."""
    copy = _records(tmp_path)
    path = copy / record
    path.write_text(path.read_text()[:200])
    out = subprocess.run([sys.executable, "-m", "dbp", "summarize", "--results", str(copy)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"dbp summarize: {path}: {what}")
    assert not (copy / "headline.md").exists()


def test_deleted_downstream_records_are_named(tmp_path):
    """A fine-tune or probe the study declares but that left no metrics.json is named, as a
    missing pre-training run is, instead of silently shrinking the downstream table."""
    copy = _records(tmp_path)
    shutil.rmtree(copy / "probe" / "cadamw" / "seed2")
    shutil.rmtree(copy / "finetune" / "scratch" / "seed0")
    a = R.analyze(copy, "default")
    assert a.missing == ["finetune/scratch/seed0", "probe/cadamw/seed2"]
    assert sorted(a.probe.query("run_id == 'cadamw'")["seed"]) == [0, 1, 3, 4, 5]
    assert "MISSING RUNS: 2 runs" in R._flags(a)


def test_reproduce_names_a_truncated_record(tmp_path):
    copy = _records(tmp_path)
    R.write_report(copy, "default")
    table = copy / "speedups.csv"
    table.write_text(table.read_text()[:300])
    out = subprocess.run([sys.executable, "-m", "dbp", "reproduce", "--reference", str(copy),
                          "--results", str(copy)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"dbp reproduce: {table}: truncated (no header, or the last row is cut off)"]
