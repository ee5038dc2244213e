"""Analysis on a synthetic study whose answers are known by construction.

The study (`write_study`): validation every 10 steps of a 50-step base budget; BP takes 1 s
per step, DBP and the identity control 1.25 s; CPU use 2 cores (2 threads) except one
segment of BP seed 1 that another process slowed 10x (CPU use 0.5: shared).
- Target: five BP target-setting runs (seeds 100-104) with best losses 0.50 ... 0.54, so the
  target is 0.52. Scored BP runs never enter it.
- Scored seeds 0-5: BP reaches 0.52 at step 40 (seed 5: never); DBP at step 20 (seed 3: 30);
  identity has BP's losses (seed 5 is unfinished: listed, not scored).
  Primary time = steps x median step time: BP 40 s, DBP 25 s (seed 3: 37.5 s).
- Tuning (seed 200): bp__blr=0.01 final 0.60, bp__blr=0.02 final 0.55, dbp__blr=0.01 final
  0.50, dbp__blr=0.02 diverged: winners bp 0.02, dbp 0.01; identity copies bp.
- Budgets on seeds 0, 1: 25 and 75 steps; BP finals 0.60 / 0.48, DBP 0.50 / 0.43.
- Downstream (seeds 0-2): the equal-compute BP run bp__equal_compute_dbp (role "downstream",
  62 planned steps = DBP's 50 x 1.25 s / 1 s) and linear-probe records of every encoder: DBP
  beats BP by 3, 3, 2 points and BP at DBP's wall-clock by 2.5, 2.5, 2.
"""
import json
import math

import numpy as np
import pandas as pd
import pytest

from dbp import analysis as A

STEPS = [0, 10, 20, 30, 40, 50]
NAN = math.nan
BP = [2.0, 0.9, 0.7, 0.6, 0.52, 0.50]
BP_MISS = [2.0, 0.9, 0.7, 0.6, 0.55, 0.53]
DBP = [2.0, 0.8, 0.51, 0.47, 0.45, 0.44]
DBP_LATE = [2.0, 0.8, 0.60, 0.50, 0.53, 0.44]  # first at 30, rises again: sustained at 50
SEC = {"bp": 1.0, "dbp": 1.25, "identity": 1.25}
BATCH, KWH_PER_S = 64, 1e-3
MIOU = {"bp": [0.30, 0.32, 0.34], "dbp": [0.31, 0.335, 0.35], "scratch": [0.10, 0.12, 0.11]}
EQUAL = "bp__equal_compute_dbp"
PROBE = {"bp": [0.24, 0.23, 0.25], "dbp": [0.27, 0.26, 0.27], EQUAL: [0.245, 0.235, 0.25],
         "scratch": [0.21, 0.21, 0.22]}


def _metrics(losses, sec, slow_segment: int | None = None) -> pd.DataFrame:
    steps = np.array(STEPS[:len(losses)], float)
    dt = np.diff(steps, prepend=0.0) * sec
    util = np.full(len(steps), 2.0)
    if slow_segment is not None:  # another process on the cores: 10x the wall time, a quarter CPU
        dt[slow_segment] *= 10
        util[slow_segment] = 0.5
    seconds = np.cumsum(dt)
    return pd.DataFrame({
        "step": steps.astype(int), "epoch": steps / 100, "images_seen": steps * BATCH,
        "train_seconds": seconds, "eval_seconds": 0.1, "checkpoint_seconds": 0.0,
        "train_loss": [NAN, *losses[1:]], "val_loss": losses, "energy_kwh": seconds * KWH_PER_S,
        "co2_kg": seconds * KWH_PER_S * 0.3, "images_per_second": BATCH / sec, "lr": 1e-3,
        "decor_loss": 0.1, "mean_abs_corr": np.linspace(0.4, 0.2, len(steps)),
        "cpu_seconds": np.cumsum(dt * util), "cpu_util": [NAN, *util[1:]], "load_avg": 2.0})


def write_run(root, run_id, arm, seed, losses, role="scored", status="finished", steps=50,
              sweep=None, slow_segment=None):
    d = root / "pretrain" / run_id / f"seed{seed}"
    d.mkdir(parents=True)
    _metrics(losses, SEC[arm], slow_segment).to_csv(d / "metrics.csv", index=False)
    info = {"run_id": run_id, "arm": arm, "seed": seed, "role": role, "status": status,
            "sweep": sweep or {}, "config": {"pretrain": {"steps": steps}},
            "macs_per_step": 1e6, "extra_macs_per_step": 0.0 if arm == "bp" else 2e5,
            "energy": {"method": "codecarbon 3.3.2 task API: CPU estimated (TDP x load)"},
            "provenance": {"cpu_model": "Test CPU", "gpu_names": [], "torch_threads": 2}}
    (d / "run.json").write_text(json.dumps(info))


def write_finetune(root, arm, seed, miou):
    d = root / "finetune" / arm / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "arm": arm, "seed": seed, "mIoU": miou, "mAcc": miou + 0.1, "aAcc": 0.7,
        "per_class_iou": {"wall": miou, "sky": NAN}, "iterations": 100, "train_seconds": 10.0,
        "energy_kwh": 1e-3, "co2_kg": 3e-4}))


def write_probe(root, run_id, arm, seed, miou):
    d = root / "probe" / run_id / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "arm": arm, "seed": seed, "mIoU": miou, "aAcc": 0.6, "heads": 3, "features": "standardised", "seconds": 5.0,
        "per_class_iou": {"wall": miou, "sky": None}}))


def write_study(root, scored_bp=None, finetune=True):
    for seed, best in zip(range(100, 105), (0.50, 0.51, 0.52, 0.53, 0.54)):
        write_run(root, "bp", "bp", seed, [2.0, 0.9, 0.7, 0.6, 0.55, best], role="target")
    for seed in range(6):
        bp = (scored_bp or {}).get(seed, BP_MISS if seed == 5 else BP)
        write_run(root, "bp", "bp", seed, bp, slow_segment=3 if seed == 1 else None)
        write_run(root, "dbp", "dbp", seed, DBP_LATE if seed == 3 else DBP)
        write_run(root, "identity", "identity", seed, bp, status="running" if seed == 5 else "finished")
    for run_id, arm, losses, status in [("bp__blr=0.01", "bp", [2.0, 0.8, 0.6], "finished"),
                                        ("bp__blr=0.02", "bp", [2.0, 0.8, 0.55], "finished"),
                                        ("dbp__blr=0.01", "dbp", [2.0, 0.7, 0.50], "finished"),
                                        ("dbp__blr=0.02", "dbp", [2.0, NAN], "diverged")]:
        write_run(root, run_id, arm, 200, losses, role="tuning", status=status,
                  sweep={"pretrain.blr": run_id.split("=")[1]})
    for seed in (0, 1):
        for arm, finals in (("bp", (0.60, 0.48)), ("dbp", (0.50, 0.43))):
            for steps, final_loss in zip((25, 75), finals):
                write_run(root, f"{arm}__steps={steps}", arm, seed, [2.0, 0.9, final_loss], steps=steps,
                          sweep={"pretrain.steps": steps})
    for arm, values in (MIOU.items() if finetune else ()):
        for seed in range(3):
            write_finetune(root, arm, seed, values[seed])
    for run_id, values in PROBE.items():
        for seed in range(3):
            if run_id == EQUAL:
                write_run(root, EQUAL, "bp", seed, BP, role="downstream", steps=62)
            write_probe(root, run_id, run_id.split("__")[0], seed, values[seed])
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def runs(study):
    return A.load_runs(study)


@pytest.fixture(scope="module")
def curves(study, runs):
    return A.load_pretrain(study, runs)


@pytest.fixture(scope="module")
def step_sec(curves, runs):
    return A.arm_step_seconds(A.segments(curves, runs))


@pytest.fixture(scope="module")
def strict(curves, runs, step_sec):
    return A.time_to_target(curves, A.final(runs), A.target_loss(curves)[0], step_sec)


def _col(df, arm, column, run_id=None):
    d = df[(df["arm"] == arm) & (df["run_id"] == (run_id or arm))]
    return d.sort_values("seed")[column].tolist()


# ----------------------------------------------------------------------------- loading

def test_runs_carry_roles_and_overrides(runs):
    assert runs.groupby("role").size().to_dict() == {"scored": 18 + 8, "target": 5, "tuning": 4,
                                                     "downstream": 3}
    assert runs.loc[runs["run_id"] == "bp__blr=0.02", "sweep.pretrain.blr"].item() == 0.02  # text -> number
    assert set(runs["energy_kind"]) == {"modelled"}
    assert A.unfinished(runs)[["run_id", "seed", "status"]].values.tolist() == [["identity", 5, "running"]]


@pytest.mark.parametrize("breakage, match", [
    ("drop_column", "missing columns"), ("bad_json", "not a readable JSON"),
    ("seed_mismatch", "seed 1 but folder seed0"), ("no_rows", "no rows"),
])
def test_malformed_files_are_named(tmp_path, breakage, match):
    write_run(tmp_path, "bp", "bp", 0, BP)
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


# ----------------------------------------------------------------------------- target

def test_target_is_the_median_of_the_target_setting_runs_only(curves, tmp_path):
    assert A.target_loss(curves) == (pytest.approx(0.52), 5)
    better = write_study(tmp_path / "better", scored_bp={s: [2.0, 0.5, 0.3, 0.2, 0.1, 0.05] for s in range(6)})
    assert A.target_loss(A.load_pretrain(better)) == (pytest.approx(0.52), 5)  # scored runs changed
    with pytest.raises(ValueError, match="no finished 'bp' target-setting runs"):
        A.target_loss(curves[curves["role"] != "target"])


# ----------------------------------------------------------------------------- tuning

def _trials(root, arm, finals, seeds=(200, 201)):
    """Tuning trials of `arm`: {blr: (final of the trial, final of its replicate)} per seed."""
    for blr, (orig, rep) in finals.items():
        for seed in seeds:
            for run_id, final_loss, sweep in ((f"{arm}__blr={blr}", orig, {"pretrain.blr": blr}),
                                              (f"{arm}__blr={blr}__perturb=1e-06", rep,
                                               {"pretrain.blr": blr, "pretrain.perturb": 1e-6})):
                write_run(root, run_id, arm, seed, [2.0, 0.8, 0.6, final_loss], role="tuning", sweep=sweep)


@pytest.mark.parametrize("chaotic", [(0.400, 0.410), (0.410, 0.400), (0.395, 0.399)])
def test_a_rate_that_moves_with_a_nudge_never_beats_a_stable_one(tmp_path, chaotic):
    """The chaotic rate ends lower on average, but its replicate ends 1-2.5 % away (another
    machine's rounding would move it as much): the stable rate wins on every 'machine'
    (order of the pair) and the table says why."""
    _trials(tmp_path, "bp", {0.004: (0.4200, 0.4200004), 0.016: chaotic})
    chosen = A.select_tuned(tmp_path, ["bp"], ["pretrain.blr"], [200, 201], {}, tolerance=2e-3)
    c = chosen["arms"]["bp"]
    assert c["values"] == {"pretrain.blr": 0.004} and c["stable"]
    assert c["margin"] == math.inf  # no other stable point to beat
    if sum(chaotic) / 2 < 0.4200002:  # the chaotic rate's mean is lower: the table says so
        assert c["unstable_lower"] == pytest.approx(sum(chaotic) / 2)
    else:
        assert c["unstable_lower"] is None
    table = pd.DataFrame(chosen["table"]).set_index("run_id")
    assert table.loc["bp__blr=0.016", "replicate_gap"] == pytest.approx(abs(chaotic[0] - chaotic[1]) / min(chaotic))
    assert not table.loc["bp__blr=0.016", "stable"] and table.loc["bp__blr=0.004", "stable"]
    assert table.loc["bp__blr=0.004", "n_trials"] == 4 and table.loc["bp__blr=0.004", "n_seeds"] == 2


def test_trials_the_study_does_not_declare_are_not_candidates(tmp_path):
    """A grid point left in the results by an earlier grid never wins."""
    _trials(tmp_path, "bp", {0.004: (0.42, 0.42), 0.032: (0.30, 0.30)})
    declared = ["bp__blr=0.004", "bp__blr=0.004__perturb=1e-06"]
    chosen = A.select_tuned(tmp_path, ["bp"], ["pretrain.blr"], [200, 201], {}, trials=declared)
    assert chosen["arms"]["bp"]["values"] == {"pretrain.blr": 0.004} and len(chosen["table"]) == 1


def test_a_tie_inside_numerics_goes_to_the_earlier_grid_point(tmp_path):
    _trials(tmp_path, "dbp", {0.004: (0.4205, 0.4205), 0.008: (0.4200, 0.4200), 0.016: (0.43, 0.43)})
    c = A.select_tuned(tmp_path, ["dbp"], ["pretrain.blr"], [200, 201], {}, tolerance=2e-3)["arms"]["dbp"]
    assert c["values"] == {"pretrain.blr": 0.004}  # 0.4205 is within 0.2 % of 0.4200
    c = A.select_tuned(tmp_path, ["dbp"], ["pretrain.blr"], [200, 201], {}, tolerance=1e-4)["arms"]["dbp"]
    assert c["values"] == {"pretrain.blr": 0.008} and c["margin"] == pytest.approx(0.0005)
    assert c["within_spread"] is False  # both seeds give the same losses: spread 0


def test_a_spiking_rate_is_unstable(tmp_path):
    for seed in (200, 201):
        write_run(tmp_path, "bp__blr=0.004", "bp", seed, [2.0, 0.8, 0.6, 0.45], role="tuning",
                  sweep={"pretrain.blr": 0.004})
        write_run(tmp_path, "bp__blr=0.016", "bp", seed, [2.0, 0.5, 0.6, 0.44], role="tuning",  # +20 %
                  sweep={"pretrain.blr": 0.016})
    chosen = A.select_tuned(tmp_path, ["bp"], ["pretrain.blr"], [200, 201], {})
    assert chosen["arms"]["bp"]["values"] == {"pretrain.blr": 0.004}
    row = pd.DataFrame(chosen["table"]).set_index("run_id").loc["bp__blr=0.016"]
    assert row["spikes"] == 2 and row["worst_spike"] == pytest.approx(0.2) and not row["stable"]


def test_selection_picks_the_lowest_final_loss_per_arm(study):
    chosen = A.select_tuned(study, ["bp", "dbp"], ["pretrain.blr"], [200], {"identity": "bp"})
    arms = chosen["arms"]
    assert arms["bp"]["values"] == {"pretrain.blr": 0.02} and arms["bp"]["final_val_loss"] == 0.55
    assert arms["dbp"]["values"] == {"pretrain.blr": 0.01}  # the diverged trial counts as inf
    assert arms["identity"] == {**arms["bp"], "from": "bp"}
    assert arms["bp"]["margin"] == pytest.approx(0.05) and arms["dbp"]["margin"] == math.inf
    assert len(chosen["table"]) == 4
    with pytest.raises(ValueError, match="missing for seeds \\[201\\]"):
        A.select_tuned(study, ["bp"], ["pretrain.blr"], [200, 201], {})


# ----------------------------------------------------------------------------- contention

def test_shared_segment_is_flagged_and_the_median_step_time_ignores_it(curves, runs, step_sec):
    seg = A.segments(curves, runs)
    shared = seg[seg["shared"]]
    assert shared[["run_id", "seed", "step"]].values.tolist() == [["bp", 1, 30]]
    assert shared["sec_per_step"].item() == pytest.approx(10.0)
    assert step_sec.to_dict() == pytest.approx({"bp": 1.0, "dbp": 1.25, "identity": 1.25})


# ----------------------------------------------------------------------------- time to target

def test_first_and_sustained_crossings(strict):
    assert _col(strict, "bp", "step") == [40, 40, 40, 40, 40, math.inf]
    assert _col(strict, "dbp", "step") == [20, 20, 20, 30, 20, 20]
    assert _col(strict, "dbp", "sustained_step") == [20, 20, 20, 50, 20, 20]
    assert _col(strict, "dbp", "seconds") == pytest.approx([25, 25, 25, 37.5, 25, 25])
    assert _col(strict, "bp", "train_seconds")[1] == pytest.approx(130.0)  # measured, slowed
    assert _col(strict, "bp", "seconds")[1] == pytest.approx(40.0)         # primary: unmoved
    assert _col(strict, "dbp", "flops")[0] == pytest.approx(2 * 1.2e6 * 20)
    assert 5 not in _col(strict, "identity", "seed")  # unfinished: not scored


def test_paired_speedup_summary(strict):
    s = A.compare(strict, "dbp", "seconds")
    assert (s["n"], s["n_both"], s["n_base_miss"], s["n_arm_miss"]) == (6, 5, 1, 0)
    assert s["geo_mean"] == pytest.approx((1.6 ** 4 * (40 / 37.5)) ** 0.2)
    assert s["interval"] == "t" and s["lo"] < s["geo_mean"] < s["hi"]
    assert s["p_value"] == pytest.approx(2 / 64)  # six pairs, all favouring DBP (one by a BP miss)
    steps = A.compare(strict, "dbp", "step")
    assert steps["geo_mean"] == pytest.approx((2.0 ** 4 * (40 / 30)) ** 0.2)


# ----------------------------------------------------------------------------- budgets

def test_budget_curve_and_equal_time(runs, curves, step_sec):
    bc = A.budget_curves(A.final(runs), curves, step_sec).set_index(["arm", "seed", "planned_steps"]).sort_index()
    # BP seed 0: 25, 50, 75 steps at 1 s; DBP at 1.25 s a step
    assert bc.loc[("bp", 0), "final_val_loss"].tolist() == [0.60, 0.50, 0.48]
    assert bc.loc[("dbp", 0), "seconds"].tolist() == [31.25, 62.5, 93.75]
    assert len(bc.loc[("bp", 2)]) == 1  # seeds without a ladder have one budget only
    bc = bc.reset_index()
    e = A.equal_time(bc, "dbp").set_index(["seed", "baseline_steps"])
    # at BP's 50 s, DBP's curve (31.25 s: 0.50, 62.5 s: 0.44) gives 0.50 - 0.06 x 18.75/31.25
    assert e.loc[(0, 50), "arm_loss"] == pytest.approx(0.50 - 0.06 * 18.75 / 31.25)
    assert math.isnan(e.loc[(0, 25), "arm_loss"])  # before DBP's shortest budget


# ----------------------------------------------------------------------------- overhead, mIoU

def test_overhead_and_power(runs, curves):
    o = A.overhead(A.segments(curves, runs), runs, curves).set_index("arm")
    assert o.loc["dbp", "ratio"] == pytest.approx(1.25) and o.loc["bp", "n_shared"] == 1
    assert o.loc["dbp", "watts"] == pytest.approx(3.6e6 * KWH_PER_S)  # energy / time, in W
    assert o.loc["dbp", "energy_kind"] == "modelled"


def test_probe_against_bp_bp_at_equal_compute_and_scratch(study):
    probe = A.load_probe(study)
    assert len(probe) == 12 and set(probe.loc[probe["run_id"] == EQUAL, "arm"]) == {"bp"}
    assert probe["iou.sky"].isna().all() and probe["seconds"].eq(5.0).all()
    m = A.miou(probe, ["bp", "dbp", EQUAL]).set_index(["arm", "vs"])
    assert m.loc[("dbp", "bp"), "mean"] == pytest.approx(np.mean([0.03, 0.03, 0.02]))
    assert m.loc[("dbp", EQUAL), "mean"] == pytest.approx(np.mean([0.025, 0.025, 0.02]))
    assert m.loc[(EQUAL, "bp"), "mean"] == pytest.approx(np.mean([0.005, 0.005, 0.0]))
    assert m.loc[("bp", "scratch"), "vs_mean"] == pytest.approx(np.mean(PROBE["scratch"]))
    assert ("bp", EQUAL) not in m.index  # only an arm's own equal-compute run is its reference
    classes = A.per_class_iou(probe).set_index(["run_id", "class"])
    assert classes.loc[("dbp", "wall"), "iou"] == pytest.approx(np.mean(PROBE["dbp"]))
    assert classes.loc[("dbp", "sky"), "n"] == 0


def test_downstream_runs_stay_out_of_the_headline_but_have_a_cost(runs, curves, step_sec):
    assert EQUAL not in set(A.budget_curves(A.final(runs), curves, step_sec)["run_id"])
    assert EQUAL not in set(A.time_to_target(curves, A.final(runs), 0.52, step_sec)["run_id"])
    assert set(A.segments(curves, runs).query("role == 'scored'")["run_id"]) >= {"bp", "dbp"}
    assert step_sec.to_dict() == pytest.approx({"bp": 1.0, "dbp": 1.25, "identity": 1.25})
    cost = A.pretrain_seconds(runs, step_sec).set_index(["run_id", "seed"])["seconds"]
    assert cost[(EQUAL, 0)] == 62.0 and cost[("dbp", 0)] == 62.5  # BP given DBP's wall-clock


def test_miou_against_bp_and_scratch(study):
    m = A.miou(A.load_finetune(study), ["bp", "dbp"]).set_index(["arm", "vs"])
    assert m.loc[("dbp", "bp"), "mean"] == pytest.approx(np.mean([0.01, 0.015, 0.01]))
    assert m.loc[("dbp", "bp"), "interval"] == "range" and m.loc[("dbp", "bp"), "p_value"] == 0.25
    assert m.loc[("bp", "scratch"), "mean"] == pytest.approx(np.mean([0.20, 0.20, 0.23]))


# ----------------------------------------------------------------------------- side-by-side step cost

def _rounds(n=9, slow_round=None, shared_round=None) -> pd.DataFrame:
    """Interleaved records: BP 100 ms, DBP 120 ms, identity 121 ms per step (2 steps a turn),
    2 threads at full use; `slow_round`: another process tripled every turn of that round
    but DBP's; `shared_round`: BP's turn used a quarter of its CPU there."""
    rows = []
    for r in range(n):
        for arm, sec in (("bp", 0.1), ("dbp", 0.12), ("identity", 0.121)):
            wall = 2 * sec * (3 if r == slow_round and arm != "dbp" else 1)
            cpu = 2 * wall * (0.25 if r == shared_round and arm == "bp" else 1)
            rows.append({"round": r, "position": 0, "arm": arm, "steps": 2, "wall_seconds": wall,
                         "cpu_seconds": cpu, "threads": 2})
    return pd.DataFrame(rows)


def test_side_by_side_ratio_ignores_disturbed_rounds():
    c = A.round_ratios(_rounds(slow_round=4, shared_round=7)).set_index("arm")
    assert c.loc["dbp", "ratio"] == pytest.approx(1.2) and c.loc["identity", "ratio"] == pytest.approx(1.21)
    assert c.loc["dbp", "sec_per_step"] == pytest.approx(0.12)
    assert (c["rounds"] == 9).all() and (c["disturbed"] == 2).all()  # the slow one and the shared one
    assert c.loc["dbp", "ratio_q25"] == pytest.approx(1.2) == c.loc["dbp", "ratio_q75"]


def test_headline_step_time_is_bp_study_median_times_side_by_side_ratio(curves, runs):
    seg = A.segments(curves, runs)
    cost = A.round_ratios(_rounds())
    sec = A.arm_step_seconds(seg, cost)  # the study's own medians say 1.25 for both
    assert sec.to_dict() == pytest.approx({"bp": 1.0, "dbp": 1.2, "identity": 1.21})
    o = A.overhead(seg, runs, curves, cost).set_index("arm")
    assert o.loc["dbp", "ratio"] == pytest.approx(1.2) and o.loc["dbp", "study_ratio"] == pytest.approx(1.25)
    assert A.arm_step_seconds(seg, A.round_ratios(pd.DataFrame())).to_dict() == pytest.approx(
        {"bp": 1.0, "dbp": 1.25, "identity": 1.25})  # not measured: each arm's own median
