"""Analysis on synthetic studies whose answers are known by construction.

The study (see `write_study`): validation every 10 steps; BP takes 1 s per step, DBP and
the identity control 1.25 s. BP seeds reach best losses 0.50 / 0.52 / 0.54, so the target
is 0.52: BP seed 0 reaches it at step 40 (40 s), seed 1 ties it at step 50 (50 s), seed 2
never does. DBP reaches it at steps 20 / 20 / 30 (25 / 25 / 37.5 s). Identity has BP's
losses at DBP's step time. Sweep points cover a normal, a diverged-before-reaching, a
reached-then-diverged and a step-0-only run.
"""
import json
import math

import numpy as np
import pandas as pd
import pytest

from dbp import analysis as A
from dbp.config import load_config, to_dict

STEPS = [0, 10, 20, 30, 40, 50]
NAN = math.nan
LOSSES = {
    ("bp", 0): [2.0, 0.9, 0.7, 0.6, 0.50, 0.51],
    ("bp", 1): [2.0, 0.9, 0.7, 0.6, 0.55, 0.52],
    ("bp", 2): [2.0, 0.9, 0.7, 0.6, 0.56, 0.54],
    ("dbp", 0): [2.0, 0.8, 0.51, 0.47, 0.45, 0.44],
    ("dbp", 1): [2.0, 0.8, 0.50, 0.49, 0.48, 0.47],
    ("dbp", 2): [2.0, 0.8, 0.60, 0.52, 0.52, 0.49],  # ties the target twice: the first counts
    ("identity", 0): [2.0, 0.9, 0.7, 0.6, 0.50, 0.51],
    ("identity", 1): [2.0, 0.9, 0.7, 0.6, 0.55, 0.52],
    ("identity", 2): [2.0, 0.9, 0.7, 0.6, 0.56, 0.54],
}
SWEEP = {  # run_id: (sweep point, losses, status), seed 0 only
    "dbp__a": ({"dbp.decor_lr": "0.001", "dbp.kappa": "0.1"}, [2.0, 0.8, 0.51, 0.47, 0.45, 0.44],
               "finished"),  # as the CLI records them: text
    "dbp__b": ({"dbp.decor_lr": 1e-3, "dbp.kappa": 0.5}, [2.0, 0.8, NAN], "diverged"),
    "dbp__c": ({"dbp.decor_lr": 1e-2, "dbp.kappa": 0.1}, [2.0, 0.5, NAN], "diverged"),
    "dbp__d": ({"dbp.decor_lr": 1e-2, "dbp.kappa": 0.5}, [2.0], "running"),
}
SEC_PER_STEP = {"bp": 1.0, "dbp": 1.25, "identity": 1.25}
BATCH, KWH_PER_S, KG_PER_KWH = 64, 1e-3, 0.3
MIOU = {"bp": [0.30, 0.32, 0.34], "dbp": [0.31, 0.335, 0.35], "scratch": [0.10, 0.12, 0.11]}


def _metrics(losses: list[float], sec_per_step: float) -> pd.DataFrame:
    steps = np.array(STEPS[:len(losses)])
    seconds = steps * sec_per_step
    energy = seconds * KWH_PER_S
    return pd.DataFrame({
        "step": steps, "epoch": steps / 100, "images_seen": steps * BATCH, "train_seconds": seconds,
        "eval_seconds": 0.1 * np.arange(1, len(steps) + 1), "checkpoint_seconds": 0.0,
        "train_loss": [NAN, *losses[1:]], "val_loss": losses, "energy_kwh": energy,
        "co2_kg": energy * KG_PER_KWH,
        "images_per_second": [NAN, *[BATCH / sec_per_step] * (len(steps) - 1)], "lr": 1e-3,
        "decor_loss": 0.1, "mean_abs_corr": np.linspace(0.4, 0.2, len(steps))})


def write_run(root, run_id: str, arm: str, seed: int, losses: list[float], status: str = "finished",
              sweep: dict | None = None) -> None:
    d = root / "pretrain" / run_id / f"seed{seed}"
    d.mkdir(parents=True)
    _metrics(losses, SEC_PER_STEP[arm]).to_csv(d / "metrics.csv", index=False)
    info = {"run_id": run_id, "sweep": sweep or {}, "arm": arm, "seed": seed, "status": status,
            "config": to_dict(load_config(None)), "effective_batch": BATCH,
            "provenance": {"cpu_model": "Test CPU", "gpu_names": []}}
    (d / "run.json").write_text(json.dumps(info))


def write_finetune(root, arm: str, seed: int, miou: float) -> None:
    d = root / "finetune" / arm / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "arm": arm, "seed": seed, "mIoU": miou, "mAcc": miou + 0.1, "aAcc": 0.7,
        "per_class_iou": {"wall": miou, "sky": NAN}, "iterations": 100, "train_seconds": 10.0,
        "energy_kwh": 1e-3, "co2_kg": 3e-4}))


def write_study(root, seeds=(0, 1, 2), sweep: bool = True, finetune: bool = True):
    for (arm, seed), losses in LOSSES.items():
        if seed in seeds:
            write_run(root, arm, arm, seed, losses)
    for run_id, (point, losses, status) in (SWEEP.items() if sweep else ()):
        write_run(root, run_id, "dbp", 0, losses, status, point)
    for arm, values in (MIOU.items() if finetune else ()):
        for seed in seeds:
            write_finetune(root, arm, seed, values[seed])
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def curves(study):
    return A.load_pretrain(study)


@pytest.fixture(scope="module")
def strict(curves):
    return A.time_to_target(curves, A.target_loss(curves))


def _by_run(df: pd.DataFrame, run_id: str, column: str) -> list:
    return df[df["run_id"] == run_id].sort_values("seed")[column].tolist()


# ----------------------------------------------------------------------------- loading

def test_load_pretrain_is_tidy(curves):
    assert len(curves) == 9 * 6 + 6 + 3 + 3 + 1
    assert list(curves.columns[:len(A.PRETRAIN_COLUMNS)]) == A.PRETRAIN_COLUMNS
    assert A.sweep_columns(curves) == ["sweep.dbp.decor_lr", "sweep.dbp.kappa"]
    lr = curves.loc[curves["run_id"] == "dbp__a", "sweep.dbp.decor_lr"]
    assert lr.eq(1e-3).all()  # recorded as text, loaded as a number
    assert curves["cpu_model"].eq("Test CPU").all()
    assert sorted(curves.loc[A.is_sweep(curves), "run_id"].unique()) == sorted(SWEEP)
    assert curves.loc[curves["run_id"] == "dbp__b", "status"].eq("diverged").all()


def test_load_finetune(study):
    ft = A.load_finetune(study)
    assert len(ft) == 9 and set(A.FINETUNE_COLUMNS) <= set(ft.columns)
    assert {"iou.wall", "iou.sky"} <= set(ft.columns)
    assert _by_run(ft, "dbp", "mIoU") == MIOU["dbp"]


def test_missing_folders_give_empty_frames_with_columns(tmp_path):
    assert list(A.load_pretrain(tmp_path).columns) == A.PRETRAIN_COLUMNS
    assert list(A.load_finetune(tmp_path).columns) == A.FINETUNE_COLUMNS
    assert A.load_pretrain(tmp_path).empty and A.load_finetune(tmp_path).empty


@pytest.mark.parametrize("breakage, match", [
    ("drop_column", "missing columns"), ("bad_json", "not a readable JSON"),
    ("seed_mismatch", "seed 1 but folder seed0"), ("no_rows", "no rows"),
])
def test_malformed_files_are_named(tmp_path, breakage, match):
    write_run(tmp_path, "bp", "bp", 0, LOSSES["bp", 0])
    d = tmp_path / "pretrain" / "bp" / "seed0"
    if breakage == "drop_column":
        pd.read_csv(d / "metrics.csv").drop(columns="val_loss").to_csv(d / "metrics.csv", index=False)
    elif breakage == "no_rows":
        pd.read_csv(d / "metrics.csv").iloc[:0].to_csv(d / "metrics.csv", index=False)
    elif breakage == "bad_json":
        (d / "run.json").write_text("{not json")
    else:
        (d / "run.json").write_text(json.dumps({"arm": "bp", "seed": 1, "status": "finished"}))
    with pytest.raises(ValueError, match=match) as err:
        A.load_pretrain(tmp_path)
    assert str(d) in str(err.value)


def test_malformed_finetune_is_named(tmp_path):
    write_finetune(tmp_path, "bp", 0, 0.3)
    path = tmp_path / "finetune" / "bp" / "seed0" / "metrics.json"
    path.write_text(json.dumps({"mIoU": 0.3}))
    with pytest.raises(ValueError, match="missing keys") as err:
        A.load_finetune(tmp_path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- targets

def test_target_is_median_of_bp_bests(curves):
    assert A.target_loss(curves) == pytest.approx(0.52)
    summary = A.run_summary(curves)
    assert _by_run(summary, "bp", "best_val_loss") == [0.50, 0.52, 0.54]
    relaxed = A.relaxed_targets(0.52)
    assert relaxed[0.0] == 0.52 and relaxed[0.05] == pytest.approx(0.546)


def test_no_baseline_runs_is_an_error(curves):
    with pytest.raises(ValueError, match="no 'bp' runs"):
        A.target_loss(curves[curves["arm"] != "bp"])


def test_time_to_target_known_answers(strict):
    assert _by_run(strict, "bp", "train_seconds") == [40.0, 50.0, math.inf]
    assert _by_run(strict, "bp", "reached") == [True, True, False]
    assert _by_run(strict, "dbp", "train_seconds") == [25.0, 25.0, 37.5]
    assert _by_run(strict, "dbp", "step") == [20, 20, 30]  # seed 2: first of two ties
    assert _by_run(strict, "dbp", "images_seen") == [20 * BATCH, 20 * BATCH, 30 * BATCH]
    assert _by_run(strict, "dbp", "energy_kwh") == pytest.approx([0.025, 0.025, 0.0375])
    assert _by_run(strict, "dbp", "co2_kg") == pytest.approx([0.0075, 0.0075, 0.01125])
    assert _by_run(strict, "identity", "train_seconds") == [50.0, 62.5, math.inf]


def test_diverged_and_step0_only_runs(strict):
    assert _by_run(strict, "dbp__b", "train_seconds") == [math.inf]  # diverged before reaching
    assert _by_run(strict, "dbp__c", "step") == [10]                # reached, then diverged
    assert _by_run(strict, "dbp__d", "reached") == [False]          # only step 0
    assert len(strict) == 13  # every run is counted, none dropped


def test_interpolation_is_optional_and_linear(curves):
    exact = A.time_to_target(curves, 0.52, interpolate=True)
    # BP seed 0: 0.6 at step 30, 0.50 at step 40 -> 0.52 at 80 % of the way
    assert _by_run(exact, "bp", "step")[0] == pytest.approx(38.0)
    assert _by_run(exact, "bp", "train_seconds")[0] == pytest.approx(38.0)
    assert _by_run(exact, "bp", "train_seconds")[1:] == [50.0, math.inf]  # tie: no shift; never: inf
    assert _by_run(exact, "dbp", "train_seconds")[2] == 37.5  # lands exactly on a point


def test_relaxed_targets_stack(curves):
    ttt = A.times_to_targets(curves)
    assert sorted(ttt["relax"].unique()) == list(A.RELAXED)
    at5 = ttt[ttt["relax"] == 0.05]
    assert _by_run(at5, "bp", "step") == [40, 50, 50]  # target 0.546: BP seed 2 now reaches it
    with pytest.raises(ValueError, match="several targets"):
        A.paired(ttt, "dbp")


# ----------------------------------------------------------------------------- paired statistics

def test_paired_speedups_and_inf(strict):
    p = A.paired(strict, "dbp")
    assert p["speedup"].tolist() == [1.6, 2.0, math.inf]       # 40/25, 50/25, BP never reached
    assert p["reduction"].tolist() == pytest.approx([0.375, 0.5, 1.0])
    ident = A.paired(strict, "identity")
    assert ident["speedup"].iloc[:2].tolist() == [0.8, 0.8] and math.isnan(ident["speedup"].iloc[2])


def test_summary_of_pairs(strict):
    s = A.summarize_paired(A.paired(strict, "dbp"), n_boot=2000)
    assert s["speedup"] == 2.0 and s["reduction"] == 0.5
    assert s["speedup_lo"] <= s["speedup"] <= s["speedup_hi"]
    assert s["reduction_lo"] <= s["reduction"] <= s["reduction_hi"]
    assert s["speedup_lo"] >= 1.6 and s["speedup_hi"] == math.inf
    assert (s["n_seeds"], s["n_undefined"], s["n_not_reached"], s["n_base_not_reached"]) == (3, 0, 0, 1)
    assert s["test"] == "sign" and s["p_value"] == pytest.approx(0.25)  # 3 of 3 faster
    ident = A.summarize_paired(A.paired(strict, "identity"), n_boot=2000)
    assert ident["n_undefined"] == 1 and ident["speedup"] == 0.8  # neither reached: counted, not used
    assert ident["reduction"] == pytest.approx(-0.25)


def test_arm_never_reaching_scores_minus_inf():
    ttt = pd.DataFrame({"run_id": ["bp", "dbp"], "arm": ["bp", "dbp"], "seed": [0, 0],
                        "train_seconds": [10.0, math.inf], "reached": [True, False]})
    s = A.summarize_paired(A.paired(ttt, "dbp"))
    assert s["speedup"] == 0.0 and s["reduction"] == -math.inf and s["n_not_reached"] == 1


def test_one_seed_gives_degenerate_interval(tmp_path):
    curves = A.load_pretrain(write_study(tmp_path, seeds=(1,), sweep=False, finetune=False))
    ttt = A.time_to_target(curves, A.target_loss(curves))
    s = A.summarize_paired(A.paired(ttt, "dbp"))
    assert s["ci_degenerate"] and s["speedup_lo"] == s["speedup"] == s["speedup_hi"] == 2.0
    assert s["test"] == "sign" and s["p_value"] == 1.0


def test_bootstrap_ci_properties():
    x = [1.0, 2.0, 3.0, 4.0, 10.0]
    lo, hi = A.bootstrap_ci(x, seed=3)
    assert 1.0 <= lo <= np.median(x) <= hi <= 10.0
    assert A.bootstrap_ci(x, seed=3) == (lo, hi)  # seeded: reproducible
    assert A.bootstrap_ci([5.0]) == (5.0, 5.0)
    assert all(math.isnan(v) for v in A.bootstrap_ci([]))
    lo, hi = A.bootstrap_ci([1.0, 2.0, math.inf], n_boot=500)
    assert lo >= 1.0 and hi == math.inf


def test_paired_test_choice_and_inf():
    assert A.paired_test([0.1, 0.2, -0.3]) == ("sign", pytest.approx(1.0))
    assert A.paired_test([0.0, math.nan]) == ("none", 1.0)
    name, p = A.paired_test([1, 2, 3, 4, 5])
    assert name == "wilcoxon" and p == pytest.approx(2 / 32)  # exact: all five positive
    # ranks only: +inf behaves as the largest difference
    assert A.paired_test([1, 2, 3, 4, math.inf])[1] == A.paired_test([1, 2, 3, 4, 9])[1]
    assert A.paired_test([-1, 2, 3, -4, math.inf, 0.5])[1] == A.paired_test([-1, 2, 3, -4, 99, 0.5])[1]
    for d in ([1, -1, 2, -2, 3], [1, 1, 1, 1, 1, -1], [math.inf, -math.inf, 1, 2, 3]):
        assert 0.0 <= A.paired_test(d)[1] <= 1.0


def test_comparisons_table(strict):
    cmp = A.comparisons(strict, ["dbp", "identity"], n_boot=500)
    assert len(cmp) == 8 and set(cmp["metric"]) == {"train_seconds", "energy_kwh", "co2_kg", "step"}
    steps = cmp.set_index(["run_id", "metric"]).loc[("dbp", "step")]
    assert steps["speedup"] == 2.5  # 40/20, 50/20, inf -> median 50/20
    energy = cmp.set_index(["run_id", "metric"]).loc[("dbp", "energy_kwh")]
    assert energy["reduction"] == pytest.approx(0.5)  # energy is proportional to time here


def test_arm_summary(strict):
    s = A.arm_summary(strict, n_boot=500).set_index("run_id")
    assert s.loc["bp", "median"] == 50.0 and s.loc["bp", "n_reached"] == 2
    assert s.loc["dbp", "median"] == 25.0 and s.loc["dbp", "lo"] <= 25.0 <= s.loc["dbp", "hi"]
    assert s.loc["dbp__b", "median"] == math.inf


# ----------------------------------------------------------------------------- FLOPs

def test_dbp_extra_macs_analytic():
    # out=4, d=2, 10 tokens, f=0.1 -> n_sub=1
    assert A.dbp_extra_macs([(4, 2)], 10, 0.1, 1, fused=True) == 2 * 4 * 4 + 2 * 1 * 4 + 8
    assert A.dbp_extra_macs([(4, 2)], 10, 0.1, 1, fused=False) == 2 * 10 * 4 + 1 * 4 + 8
    assert A.dbp_extra_macs([(4, 2)], 10, 0.1, 2, fused=True) == 32 + (8 + 8) / 2
    assert A.dbp_extra_macs([(4, 2), (4, 2)], 10, 0.01, 1, fused=True) == 2 * 48  # n_sub >= 1


def test_add_flops(strict):
    t = A.add_flops(strict, 100.0, {"dbp": 10.0, "identity": 10.0, "dbp__a": 20.0, "dbp__b": 0,
                                    "dbp__c": 0, "dbp__d": 0})
    assert _by_run(t, "dbp", "flops") == [2 * 110 * 20, 2 * 110 * 20, 2 * 110 * 30]
    assert _by_run(t, "bp", "flops") == [2 * 100 * 40, 2 * 100 * 50, math.inf]
    assert _by_run(t, "dbp__a", "flops") == [2 * 120 * 20]  # run_id beats arm
    with pytest.raises(KeyError, match="identity"):
        A.add_flops(strict, 100.0, {"dbp": 10.0})


# ----------------------------------------------------------------------------- overhead .. sweep

def test_step_time_overhead(curves):
    o = A.overhead(curves).set_index("run_id")
    assert o.loc[["dbp", "identity"], "ratio"].tolist() == pytest.approx([1.25, 1.25])
    assert o.loc["bp", "sec_per_step"] == pytest.approx(1.0)
    assert o.loc["dbp", "images_per_second"] == pytest.approx(BATCH / 1.25)
    assert math.isnan(o.loc["dbp__d", "sec_per_step"])  # only step 0: no segment


def test_miou_difference(study):
    m = A.miou(A.load_finetune(study), n_boot=2000).set_index("run_id")
    assert m.loc["dbp", "diff"] == pytest.approx(np.mean([0.01, 0.015, 0.01]))
    assert m.loc["dbp", "diff_lo"] <= m.loc["dbp", "diff"] <= m.loc["dbp", "diff_hi"]
    assert m.loc["dbp", "mIoU_lo"] <= m.loc["dbp", "mIoU"] <= m.loc["dbp", "mIoU_hi"]
    assert m.loc["dbp", "test"] == "sign" and 0 <= m.loc["dbp", "p_value"] <= 1
    assert m.loc["scratch", "diff"] < 0 and m.loc["bp", "n_pairs"] == 3


def test_equal_budget(curves, study):
    e = A.equal_budget(curves, A.load_finetune(study))
    assert e["budget"].eq(50.0).all()  # the shortest finished run: BP's 50 steps x 1 s
    assert _by_run(e, "dbp", "step") == [40, 40, 40]  # 40 x 1.25 s = 50 s
    assert _by_run(e, "dbp", "val_loss") == [0.45, 0.48, 0.52]
    assert _by_run(e, "dbp", "mIoU") == MIOU["dbp"]
    assert math.isnan(_by_run(e, "dbp__b", "val_loss")[0])  # diverged within the budget
    assert _by_run(A.equal_budget(curves, budget=25.0), "bp", "step") == [20, 20, 20]


def test_sweep_table(curves, strict):
    s = A.sweep_table(curves, strict).set_index("run_id")
    assert list(s.index) == sorted(SWEEP)
    assert s.loc["dbp__a", "time_to_target"] == 25.0 and s.loc["dbp__a", "final_val_loss"] == 0.44
    assert s.loc["dbp__b", "n_diverged"] == 1 and s.loc["dbp__b", "final_val_loss"] == math.inf
    assert s.loc["dbp__c", "n_reached"] == 1 and s.loc["dbp__d", "time_to_target"] == math.inf
    assert s.loc["dbp__b", "sweep.dbp.kappa"] == 0.5
