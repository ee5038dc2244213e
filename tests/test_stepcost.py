"""The interleaved step-cost measurement: turn order, warm-up, records; one real run; the
benchmark's verdict against the MAC model."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dbp import analysis as A
from dbp.embedded import make_embedded
from dbp.stepcost import COLUMNS, interleave


def test_interleave_shuffles_each_round_and_times_only_after_warmup():
    calls = []
    turns = {a: (lambda a=a: calls.append(a)) for a in ("bp", "dbp", "identity")}
    rows = interleave(turns, rounds=20, warmup=2, seed=1, steps={"dbp": 4})
    assert len(calls) == 3 * 22 and len(rows) == 3 * 20
    orders = {tuple(calls[i:i + 3]) for i in range(0, len(calls), 3)}
    assert all(sorted(o) == ["bp", "dbp", "identity"] for o in orders) and len(orders) > 1
    df = pd.DataFrame(rows)
    assert list(df.columns) == COLUMNS
    assert df.groupby("arm")["steps"].unique().to_dict() == {"bp": [1], "dbp": [4], "identity": [1]}
    assert df.groupby("round")["arm"].nunique().eq(3).all()
    assert (df["wall_seconds"] >= 0).all() and (df["cpu_seconds"] >= 0).all()


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "dbp_step_cost.py"


def _bench():
    """benchmarks/dbp_step_cost.py as a module (imports torch, runs nothing)."""
    if "dbp_step_cost" not in sys.modules:
        spec = importlib.util.spec_from_file_location("dbp_step_cost", BENCH)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["dbp_step_cost"]


def test_step_cost_benchmark_holds_each_row_to_its_mac_model_within_noise():
    classify = _bench().classify
    # quartiles 1.10 / 1.20: band 0.05 around the model 1.15
    assert classify(1.19, 1.15, 1.10, 1.20) == "PASS"
    assert classify(1.21, 1.15, 1.10, 1.20) == "ABOVE MODEL"
    assert classify(1.09, 1.15, 1.10, 1.20) == "BELOW MODEL"
    # quartiles 1.14 / 1.16 (half-spread 0.01): the band is widened to 0.03
    assert classify(1.17, 1.15, 1.14, 1.16) == "PASS"
    assert classify(1.125, 1.15, 1.14, 1.16) == "PASS"
    assert classify(1.19, 1.15, 1.14, 1.16) == "ABOVE MODEL"
    assert classify(1.11, 1.15, 1.14, 1.16) == "BELOW MODEL"


@pytest.mark.slow
def test_stepcost_cli_measures_every_arm_of_a_study(tmp_path):
    root = make_embedded(tmp_path / "emb", seed=0, imagenet_per_class=4, imagenet_val_per_class=1,
                         ade_train=2, ade_val=1, image_size=32)
    out = tmp_path / "stepcost" / "rounds.csv"
    sets = [f"data.root={root / 'imagenet'}", "data.kind=imagenet", "data.fraction=1.0",
            "pretrain.batch_size=8", "arms=[bp,dbp,identity]", "stepcost.rounds=6", "stepcost.warmup=1"]
    done = subprocess.run([sys.executable, "-m", "dbp", "stepcost", *(a for s in sets for a in ("--set", s)),
                           "--seed", "0", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pd.read_csv(out)
    assert len(rows) == 18 and set(rows["arm"]) == {"bp", "dbp", "identity"}
    c = A.round_ratios(rows).set_index("arm")
    assert c.loc["bp", "ratio"] == 1.0
    assert (c["rounds"] == 6).all() and (c["ratio"] > 0).all()  # timing itself: benchmarks/
    printed = {ln.split()[0]: ln for ln in done.stdout.splitlines() if "ratio to bp" in ln}
    assert f"ratio to bp {c.loc['dbp', 'ratio']:.3f}" in printed["dbp"]  # the summary of the file


@pytest.mark.slow
def test_step_cost_benchmark_quick_mode_writes_its_table(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--check", "--arms", "bp",
                           "dbp_fused_f0.1_k4", "--out", str(tmp_path / "rounds.csv")],
                          capture_output=True, text=True)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "rounds.csv")
    assert len(rows) == 2 * 4 and rows.groupby("arm")["steps"].first().to_dict() == {
        "bp": 1, "dbp_fused_f0.1_k4": 4}  # a turn of the every-4 arm is one whole cycle
    table = {ln.split()[0]: ln.split() for ln in done.stdout.splitlines() if ln.startswith(("bp ", "dbp_"))}
    assert table["bp"][2] == "1.000"
    q = A.round_ratios(rows).set_index("arm").loc["dbp_fused_f0.1_k4"]
    assert table["dbp_fused_f0.1_k4"][2] == f"{q['ratio']:.3f}"
    verdict = [ln.split() for ln in done.stdout.splitlines() if ln.startswith("  dbp_fused_f0.1_k4 ")]
    assert len(verdict) == 1  # '  <arm>  measured <ratio>  MAC model <pred>  band +-<b>  <verdict>'
    name, _, measured, _, _, model, _, band, *word = verdict[0]
    assert (measured, model) == (table[name][2], table[name][6]) and float(band[2:]) >= 0.03  # 6: pred
    assert " ".join(word) in ("PASS", "ABOVE MODEL", "BELOW MODEL")
    assert done.returncode == (0 if word == ["PASS"] else 1)  # --check
