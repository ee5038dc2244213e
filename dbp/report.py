"""The paper's tables from a study's runs: Markdown and LaTeX beside tidy CSVs in results/<study>/.

`analyze` computes every tidy table once (the figures use it too); the `*_table` functions
turn it into display tables, ours beside the paper's where that is a like-for-like
comparison; `write_report` writes them all atomically. Reads records only: no torch.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from dbp import analysis as A
from dbp import speedup as SP
from dbp.arms import REGISTRY
from dbp.records import atomic_write_text

PAPER = {"seconds": "21.1 %", "mIoU": "+1.1"}


def readme_markers(block: str) -> tuple[str, str]:
    """The README's start and end markers around a generated block."""
    return f"<!-- {block}:start -->", f"<!-- {block}:end -->"


README_START, README_END = readme_markers("headline")
README_TABLES = ("headline", "sensitivity", "stability", "arms", "downstream")


# ----------------------------------------------------------------------------- analysis

@dataclass(frozen=True)
class Analysis:
    """Every tidy table of one study, computed once."""
    study: str
    runs: pd.DataFrame
    curves: pd.DataFrame
    finetune: pd.DataFrame
    target: float
    n_target: int
    segments: pd.DataFrame
    step_cost: pd.DataFrame     # side-by-side step-time ratios (empty: not measured)
    step_sec: pd.Series
    ttt: pd.DataFrame           # scored runs at every target (column relax)
    comparisons: pd.DataFrame   # each arm vs BP, every cost, strict target
    clock: pd.DataFrame         # identity's whole-run time ratio against its step-time ratio, per seed
    overhead: pd.DataFrame
    budgets: pd.DataFrame
    budget_ttt: pd.DataFrame    # budget-curve crossings at every target (column relax)
    speedups: pd.DataFrame      # budget-curve speed-ups: every reading at the target, the primary at relaxed ones
    stability: pd.DataFrame     # spikes and divergences of the scored runs, per arm
    tuning: pd.DataFrame
    sweep: pd.DataFrame
    selected: dict | None
    miou: pd.DataFrame          # fine-tune mIoU differences (arm vs BP, equal-compute BP, scratch)
    probe: pd.DataFrame         # linear-probe runs (frozen encoders)
    probe_diffs: pd.DataFrame   # linear-probe mIoU differences, as `miou`
    encoder_seconds: pd.DataFrame  # per pre-training run: steps x step time (any role)
    arms: list[str]
    hardware: str
    level: float
    stray: list[str]            # run folders the study's config does not declare: left out
    missing: list[str]          # runs the study's config declares that have no folder

    @property
    def strict(self) -> pd.DataFrame:
        return self.ttt[self.ttt["relax"] == 0]

    @property
    def budget_strict(self) -> pd.DataFrame:
        return self.budget_ttt[self.budget_ttt["relax"] == 0]

    def speedup(self, arm: str, reading: str = "primary", relax: float = 0.0) -> dict | None:
        """The budget-curve summary of `arm` (speedup.summarize), or None."""
        s = self.speedups
        r = s[(s["arm"] == arm) & (s["reading"] == reading) & (s["relax"] == relax)] if len(s) else s
        return r.iloc[0].to_dict() if len(r) else None

    @cached_property
    def choices(self) -> dict[str, dict]:
        """Each tuned arm's winner as the protocol picks it from the tuning table (A.choose), so
        the report shows the rule's margins whatever version of `dbp select` wrote the study's
        selection; a winner that differs from the selection's is an error."""
        sel = {arm: c for arm, c in (self.selected or {}).get("arms", {}).items() if not c.get("from")}
        keys = (self.selected or {}).get("keys", [])
        out = {}
        for arm, c in sel.items():
            out[arm] = A.choose(A.grid_order(self.tuning, arm, keys),
                                self.selected.get("tolerance", A.REPLICATE_TOLERANCE))
            if out[arm]["run_id"] != c["run_id"]:
                raise ValueError(f"tuning/selected.json: {arm}'s winner {c['run_id']} is not the protocol's "
                                 f"{out[arm]['run_id']} (selected under another rule?)")
        return out

    @property
    def seeds(self) -> list[int]:
        return sorted(self.runs.loc[self.runs["role"] == "scored", "seed"].unique().tolist())

    @property
    def energy_kind(self) -> str:
        kinds = set(self.runs.loc[self.runs["role"] == "scored", "energy_kind"])
        return "measured" if kinds == {"measured"} else "none" if kinds <= {"none"} else "modelled"


def analyze(results_dir: str | Path, study: str, *, level: float = 0.95) -> Analysis:
    """Load results/<study> (`results_dir`) and compute every table of the report."""
    runs, stray, missing = _declared(A.load_runs(results_dir), Path(results_dir) / "config.yaml")
    if runs.empty:
        raise ValueError(f"{results_dir}: no pre-training runs")
    curves, finetune, probe = A.load_pretrain(results_dir, runs), A.load_finetune(results_dir), \
        A.load_probe(results_dir)
    done = A.final(runs)
    target, n_target = A.target_loss(curves[curves["status"].isin(A.FINAL)])
    seg = A.segments(curves, runs)
    rounds = A.load_step_cost(results_dir)
    cost = A.round_ratios(rounds)
    ratio = cost.set_index("arm")["ratio"] if len(cost) else pd.Series(dtype=float)
    step_sec = A.arm_step_seconds(seg, cost)
    ttt = pd.concat([A.time_to_target(curves, done, t, step_sec).assign(relax=r)
                     for r, t in A.relaxed_targets(target).items()], ignore_index=True)
    arms = ordered_arms(runs.loc[runs["role"] == "scored", "arm"])
    others = [a for a in arms if a != A.BASELINE]
    bc = A.budget_curves(done, curves, step_sec)
    targets = A.relaxed_targets(target)
    speedups = SP.speedups(bc, targets, rounds, ratio, others, level)
    head = speedups[(speedups["arm"] == "dbp") & (speedups["reading"] == "primary")] if len(speedups) else speedups
    sel_path = Path(results_dir) / "tuning" / "selected.json"
    selected = A.read_json(sel_path, ["arms"]) if sel_path.is_file() else {}
    return Analysis(
        study=study, runs=runs, curves=curves, finetune=finetune, target=target, n_target=n_target,
        segments=seg, step_cost=cost, step_sec=step_sec, ttt=ttt,
        comparisons=A.comparisons(ttt[ttt["relax"] == 0], others, level=level),
        clock=SP.clock_check(A.run_summary(curves), ratio if len(ratio) else step_sec / step_sec.get(A.BASELINE, math.nan),
                             float(head["median"].iloc[0]) if len(head) else math.nan),
        overhead=A.overhead(seg, runs, curves, cost), budgets=bc,
        budget_ttt=pd.concat([SP.crossings(bc, t).assign(relax=r) for r, t in targets.items()], ignore_index=True),
        speedups=speedups, stability=SP.stability(runs, curves, A.SPIKE_RISE),
        tuning=A.tuning_table(runs, curves, tolerance=selected.get("tolerance", A.REPLICATE_TOLERANCE)),
        sweep=A.tuning_table(runs, curves, role="sweep"), selected=selected or None,
        miou=_differences(finetune, level), probe=probe, probe_diffs=_differences(probe, level),
        encoder_seconds=A.pretrain_seconds(runs, step_sec), arms=arms, hardware=_hardware(runs),
        level=level, stray=stray, missing=missing)


def _declared(runs: pd.DataFrame, config: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The runs the study's resolved config (results/<study>/config.yaml) declares, the folders
    it does not (left by an earlier config: never read as this study's), and the declared runs
    that have no record (deleted or never run: listed, as unfinished runs are): pre-training
    runs by folder, fine-tunes and probes by their metrics.json. Without the file, every run."""
    if not config.is_file():
        return runs, [], []
    from dbp.config import load_config
    from dbp.downstream import probe_arms, probe_seeds
    from dbp.jobs import study_runs
    cfg = load_config(config)
    declared = {(r.run_id, s) for r in study_runs(cfg).values() for s in r.seeds}
    present = set(runs[["run_id", "seed"]].itertuples(index=False, name=None)) if len(runs) else set()
    keep = [k in declared for k in runs[["run_id", "seed"]].itertuples(index=False, name=None)]
    name = lambda keys: [f"{r}/seed{s}" for r, s in sorted(keys)]  # noqa: E731
    downstream = [f"{stage}/{a}/seed{s}" for stage, arms, seeds in
                  (("finetune", cfg.finetune_arms(), cfg.finetune_seeds()),
                   ("probe", probe_arms(cfg), probe_seeds(cfg))) for a in arms for s in seeds
                  if not (config.parent / stage / a / f"seed{s}" / "metrics.json").is_file()]
    return runs[keep] if len(runs) else runs, name(present - declared), name(declared - present) + downstream


def _differences(downstream: pd.DataFrame, level: float) -> pd.DataFrame:
    """`A.miou` for every pre-trained encoder of a downstream table (not scratch)."""
    encoders = [r for r in ordered_arms(downstream["run_id"]) if r != "scratch"]
    return A.miou(downstream, encoders, level) if len(downstream) else pd.DataFrame()


def ordered_arms(arms: Iterable[str]) -> list[str]:
    """Distinct arms, the registered ones first in the registry's order (BP, then by name)
    and the fine-tuning-only "scratch", then the rest alphabetically."""
    known = [*REGISTRY, "scratch"]
    return sorted(set(arms), key=lambda r: (known.index(r) if r in known else len(known), r))


def _hardware(runs: pd.DataFrame) -> str:
    cpus = " / ".join(sorted(set(runs["cpu_model"].dropna()) - {""})) or "unknown CPU"
    gpus = " / ".join(sorted(set(runs["gpu_names"].dropna()) - {""})) or "no GPU"
    return f"{cpus}; {gpus}"


# ----------------------------------------------------------------------------- formatting

def _num(x: float, fmt: str = ".3g") -> str:
    if isinstance(x, (float, np.floating)) and math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return format(x, fmt)


def _pct(x: float) -> str:
    return _num(x) if not math.isfinite(x) else f"{100 * x:.1f} %"


def _times(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else _num(x)


def _interval(r, fmt) -> str:
    """"[lo, hi]" of a t interval, or "range of n seeds [lo, hi]" below the minimum."""
    if r["interval"] == "none":
        return "(no pair)"
    n = r["n_both"] if "n_both" in r else r["n"]
    label = "95 % t interval" if r["interval"] == "t" else f"range of {n} seeds"
    return f"[{fmt(r['lo'])}, {fmt(r['hi'])}] ({label})"


def _seeds(r) -> str:
    return (f"{r['n']} (both reached {r['n_both']}; missed: BP {r['n_base_miss']}, "
            f"arm {r['n_arm_miss']})")


# ----------------------------------------------------------------------------- tables

PRIMARY = "Wall-clock to target, budget curve (primary)"
HEADLINE_ROWS = [("Wall-clock to target, first crossing (steps x step time)", "seconds"),
                 ("Wall-clock to target, first crossing (measured)", "train_seconds"),
                 ("CPU time to target, first crossing", "cpu_seconds"),
                 ("Steps to target, first crossing", "step"),
                 ("FLOPs to target, first crossing", "flops"),
                 ("Energy to target, first crossing", "energy_kwh"),
                 ("Wall-clock to target, sustained crossing (steps x step time)", "sustained_seconds")]


def headline_table(a: Analysis, arm: str = "dbp") -> pd.DataFrame:
    """The headline: speed-up T_BP / T_arm (geometric mean over seeds, interval or range)
    and reduction 1 - 1/speed-up for every cost, the budget-curve reading, and mIoU."""
    cmp = a.comparisons[a.comparisons["arm"] == arm].set_index("metric") if len(a.comparisons) else None
    rows = [_budget_row(a, arm)]
    for label, metric in HEADLINE_ROWS:
        if metric == "energy_kwh":
            label = f"{label} ({a.energy_kind})"
        if cmp is None or metric not in cmp.index or (metric == "energy_kwh" and a.energy_kind == "none"):
            continue
        r = cmp.loc[metric]
        paper = "–"
        rows.append(_speedup_row(label, r, paper))
    rows += _miou_rows(a.miou, arm, "mIoU") + _miou_rows(a.probe_diffs, arm, "Linear-probe mIoU")
    return pd.DataFrame(rows)


def _speedup_row(label: str, r, paper: str) -> dict:
    g = r["geo_mean"]
    return {"Quantity": label, "Ours [interval]": f"{_times(g)} {_interval(r, _times)}",
            "Reduction": _pct(1 - 1 / g) if g > 0 else _num(g), "Paper": paper, "Seeds": _seeds(r),
            "Exact paired test": f"p = {r['p_value']:.3g} (sign-flip)"}


def _budget_row(a: Analysis, arm: str, relax: float = 0.0) -> dict:
    """Time to target read off each seed's budget curve (fully decayed runs), paired: the
    primary row, beside the paper's wall-clock figure (docs/protocol.md rules 8, 9, 11)."""
    r = a.speedup(arm, relax=relax)
    if r is None:
        return {"Quantity": PRIMARY, "Ours [interval]": "n/a (no budget ladder)", "Reduction": "–",
                "Paper": PAPER["seconds"], "Seeds": "0", "Exact paired test": "–"}
    m = r["median"]
    return {"Quantity": PRIMARY, "Ours [interval]": f"{_median(r)} {_order_interval(r)}",
            "Reduction": _pct(1 - 1 / m) if m > 0 else _num(m), "Paper": PAPER["seconds"],
            "Seeds": _bounds(r), "Exact paired test": f"p = {r['p_value']:.3g} (signed-rank, bounds "
            f"and step cost at their worst)" if r["step_cost"] else f"p = {r['p_value']:.3g} (signed-rank)"}


def _median(r: dict) -> str:
    """The median ratio; its range where bounds reach it."""
    same = math.isclose(r["median_lo"], r["median_hi"])
    return f"{_times(r['median'])} median" + ("" if same else
                                              f" (in [{_times(r['median_lo'])}, {_times(r['median_hi'])}])")


def _order_interval(r: dict) -> str:
    """"[lo, hi] (what interval)" of a budget-curve summary."""
    cost = ", step cost in" if r["step_cost"] else ""
    what = (f"{100 * r['coverage']:.1f} % order-statistic interval{cost}" if r["interval"] == "order"
            else f"range of {r['n_defined']} seeds{cost}")
    return f"[{_times(r['lo'])}, {_times(r['hi'])}] ({what})"


def _bounds(r: dict) -> str:
    open_ = r["n"] - r["n_defined"]
    return (f"{r['n']} ({r['n_exact']} exact, {r['n_at_least']} at least, {r['n_at_most']} at most"
            + (f", {open_} open" if open_ else "") + ")")


def _miou_rows(diffs: pd.DataFrame, arm: str, what: str) -> list[dict]:
    """Headline rows: the arm's paired `what` change against each reference; the paper's
    +1.1 beside the fine-tuned one against BP only."""
    rows = []
    for r in diffs[diffs["arm"] == arm].to_dict("records") if len(diffs) else []:
        rows.append({"Quantity": f"{what} change vs {r['vs']} (points)",
                     "Ours [interval]": f"{_points(r['mean'])} {_interval(r, _points)}",
                     "Reduction": "–",
                     "Paper": PAPER["mIoU"] if (what, r["vs"]) == ("mIoU", "bp") else "–",
                     "Seeds": str(r["n"]), "Exact paired test": f"p = {r['p_value']:.3g} (sign-flip)"})
    return rows


def _points(x: float) -> str:
    return _num(100 * x, "+.2f")


def downstream_table(a: Analysis) -> pd.DataFrame:
    """Every downstream comparison, probe then fine-tune: each encoder against scratch, BP
    and BP given its wall-clock, as paired differences over seeds, beside what each encoder's
    pre-training cost (steps x step time)."""
    cost = a.encoder_seconds.groupby("run_id")["seconds"].mean()
    rows = []
    for what, diffs in (("Linear probe (frozen encoder)", a.probe_diffs),
                        ("Fine-tune (UperNet, the paper's protocol)", a.miou)):
        for r in diffs.to_dict("records") if len(diffs) else []:
            rows.append({"Measure": what, "Encoder": r["arm"], "Against": r["vs"],
                         "Pre-training (s)": f"{_num(cost.get(r['arm'], math.nan), '.1f')} vs "
                                             f"{_num(cost.get(r['vs'], 0.0), '.1f')}",
                         "mIoU (points)": f"{100 * r['arm_mean']:.2f} vs {100 * r['vs_mean']:.2f}",
                         "Difference (points) [interval]": f"{_points(r['mean'])} {_interval(r, _points)}",
                         "Seeds": str(r["n"]), "Exact paired test": f"p = {r['p_value']:.3g} (sign-flip)"})
    return pd.DataFrame(rows, columns=["Measure", "Encoder", "Against", "Pre-training (s)", "mIoU (points)",
                                       "Difference (points) [interval]", "Seeds", "Exact paired test"])


def arms_table(a: Analysis) -> pd.DataFrame:
    """Every arm against BP on the same footing: the primary (budget-curve) speed-up, steps to
    target and the side-by-side step-time ratio, so a reader sees which arm is faster than BP
    and whether by fewer steps or by cheaper ones."""
    cost = a.overhead.set_index("arm")
    rows = []
    for arm in a.arms:
        if arm == A.BASELINE:
            continue
        primary = _budget_row(a, arm)
        steps = A.compare(a.strict, arm, "step", level=a.level) if arm in set(a.strict["arm"]) else None
        reg = REGISTRY.get(arm)
        rows.append({
            "Arm": arm, "What it is": reg.about if reg else "–",
            "Budget curve [interval]": primary["Ours [interval]"],
            "Budget curve: test": primary["Exact paired test"],
            "Steps to target (first crossing)": _times(steps["geo_mean"]) if steps is not None else "–",
            "Step time, side by side": (_num(cost.loc[arm, "ratio"], ".3f")
                                        if arm in cost.index and math.isfinite(cost.loc[arm, "side_q25"])
                                        else "not measured"),
            "Role": f"control of {reg.control_of}" if reg and reg.control_of else "tuned arm"})
    return pd.DataFrame(rows)


def relaxed_table(a: Analysis, arm: str = "dbp") -> pd.DataFrame:
    """The primary (budget-curve) and the first-crossing speed-up at the strict and the relaxed
    targets (+1 %, +2 %, +5 %): is the gain an artefact of where exactly the target falls?"""
    rows = []
    for relax, t in a.ttt.groupby("relax"):
        primary = _budget_row(a, arm, relax)
        first = _speedup_row("", A.compare(t, arm, "seconds", level=a.level), "")
        rows.append({"Target": f"+{relax:.0%} ({t['target'].iloc[0]:.4f})",
                     "Budget curve [interval]": primary["Ours [interval]"],
                     "Budget curve: test": primary["Exact paired test"],
                     "First crossing [interval]": first["Ours [interval]"],
                     "First crossing: seeds": first["Seeds"],
                     "First crossing: test": first["Exact paired test"]})
    return pd.DataFrame(rows)


def per_seed_table(a: Analysis) -> pd.DataFrame:
    """Every scored base run at the strict target: first and sustained crossing, the costs
    and the paired speed-up against BP of its seed (rule 8: every seed)."""
    t = A.base_runs(a.strict)
    best = A.run_summary(a.curves)[["run_id", "seed", "best_val_loss"]]
    t = t.merge(best, on=["run_id", "seed"])
    ratio = {arm: A.paired_ratios(a.strict, arm, "seconds") for arm in a.arms}
    curve = a.budget_strict.set_index(["arm", "seed"])
    shared = a.segments.groupby(["run_id", "seed"])["shared"].sum()
    t = t.assign(_o=t["arm"].map(a.arms.index)).sort_values(["_o", "seed"])
    return pd.DataFrame({
        "Arm": t["arm"], "Seed": t["seed"], "Status": t["status"],
        "Best val loss": t["best_val_loss"].map(lambda x: _num(x, ".4f")),
        "Step (first)": t["step"].map(lambda x: _num(x, ".0f")),
        "Step (sustained)": t["sustained_step"].map(lambda x: _num(x, ".0f")),
        "Time, steps x step time (s)": t["seconds"].map(lambda x: _num(x, ".1f")),
        "Time, measured (s)": t["train_seconds"].map(lambda x: _num(x, ".1f")),
        "CPU time (s)": t["cpu_seconds"].map(lambda x: _num(x, ".1f")),
        "Speed-up vs BP, first crossing": [_times(ratio[r.arm].get(r.seed, math.nan)) for r in t.itertuples()],
        "Speed-up vs BP, budget curve (primary)": [_seed_speedup(a, r.arm, r.seed) for r in t.itertuples()],
        "Budget curve (s)": [f"{_num(curve.loc[(r.arm, r.seed), 'seconds'], '.1f')} ({curve.loc[(r.arm, r.seed), 'kind']})"
                             if (r.arm, r.seed) in curve.index else "–" for r in t.itertuples()],
        "Shared segments": [int(shared.get((r.run_id, r.seed), 0)) for r in t.itertuples()],
    })


def _seed_speedup(a: Analysis, arm: str, seed: int) -> str:
    """One seed's primary T_BP / T_arm: exact, at least (>=) or at most (<=); – for BP."""
    r = a.speedup(arm)
    value = (r or {}).get("seeds", {}).get(int(seed))
    if value is None or not math.isfinite(value[0]):
        return "–" if value is None else "open (both beyond the ladder)"
    return {1: ">= ", -1: "<= ", 0: ""}[value[1]] + _times(math.exp(value[0]))


def sensitivity_table(a: Analysis) -> pd.DataFrame:
    """Every arm's budget-curve speed-up under each reading of the curve (docs/protocol.md
    rule 9): does the conclusion depend on how a non-monotone curve, the interpolation or
    the step cost's uncertainty is treated?"""
    s = a.speedups[a.speedups["relax"] == 0] if len(a.speedups) else a.speedups
    return pd.DataFrame([{
        "Arm": r["arm"], "Reading": r["reading"], "Median [interval]": f"{_median(r)} {_order_interval(r)}",
        "Test": f"p = {r['p_value']:.3g}", "Seeds": _bounds(r),
        "Geometric mean, exact seeds [t interval]": (f"{_times(r['geo_mean'])} [{_times(r['t_lo'])}, "
                                                     f"{_times(r['t_hi'])}] ({r['n_exact']} seeds)"
                                                     if r["t_interval"] == "t" else
                                                     f"{_times(r['geo_mean'])} ({r['n_exact']} seeds: no interval)"),
        "Conclusion": r["conclusion"]} for r in s.to_dict("records")])


def stability_table(a: Analysis) -> pd.DataFrame:
    """Per arm: scored runs that spiked or diverged (docs/protocol.md rule 15)."""
    st = a.stability.assign(_o=a.stability["arm"].map(a.arms.index)).sort_values("_o")
    return pd.DataFrame({
        "Arm": st["arm"], "Scored runs": st["runs"],
        "Runs with a spike": st["runs_spiked"].astype(str),
        "Seeds with a spike": st["seeds_spiked"].map(lambda x: ", ".join(map(str, x)) or "none"),
        "Worst rise (run)": [f"{_pct(w)} ({run})" if w > 0 else "none" for w, run in st[["worst", "worst_run"]].to_numpy()],
        "Diverged": st["diverged"].astype(str)})


def overhead_table(a: Analysis) -> pd.DataFrame:
    """Step time per arm and its ratio to BP (rule 6), throughput, contention, mean power."""
    o = a.overhead.assign(_o=a.overhead["arm"].map(a.arms.index)).sort_values("_o")
    ratio = lambda r, lo, hi: f"{_num(r, '.3f')} [{_num(lo, '.3f')}, {_num(hi, '.3f')}]"  # noqa: E731
    return pd.DataFrame({
        "Arm": o["arm"], "Runs": o["n_runs"],
        "Seconds per step (headline)": o["sec_per_step"].map(lambda x: _num(x, ".4f")),
        "Side-by-side ratio vs BP [quartiles]": [
            ratio(*x) if math.isfinite(x[1]) else "not measured"
            for x in o[["ratio", "side_q25", "side_q75"]].to_numpy()],
        "Side-by-side CPU-time ratio": o["cpu_ratio"].map(lambda x: _num(x, ".3f")),
        "Study ratio vs BP [per-seed min, max]": [
            ratio(*x) for x in o[["study_ratio", "ratio_min", "ratio_max"]].to_numpy()],
        "Images/s (median)": o["images_per_second"].map(lambda x: _num(x, ".1f")),
        "CPU use (cores, median)": o["cpu_util"].map(lambda x: _num(x, ".2f")),
        "Shared segments": [f"{s} of {n}" for s, n in o[["n_shared", "n_segments"]].to_numpy()],
        "Mean power (W)": [f"{_num(w, '.1f')} ({k})" for w, k in o[["watts", "energy_kind"]].to_numpy()],
    })


def tuning_display(a: Analysis, table: pd.DataFrame) -> pd.DataFrame:
    """Every grid point (or sweep point): its values, seeds and trials, mean final validation
    loss, seed spread, numerics-replicate gap, spikes and stability; the winner per arm is
    marked with its margin to the runner-up (flagged when inside the seed spread)."""
    winners = {c["run_id"]: c for c in a.choices.values()}
    keys = {c: c.removeprefix(A.SWEEP) for c in A.sweep_columns(table) if table[c].notna().any()}
    out = table[["run_id", "arm", *keys]].rename(columns={"run_id": "Run", "arm": "Arm", **keys})

    def selected(run_id: str) -> str:
        c = winners.get(run_id)
        if c is None:
            return ""
        notes = [f"margin {_num(c['margin'], '.4f')}", "WITHIN SEED SPREAD" if c["within_spread"] else "",
                 "" if c["stable"] else "NO STABLE POINT",
                 f"an unstable point reached {c['unstable_lower']:.4f}" if c["unstable_lower"] else ""]
        return f"yes ({'; '.join(n for n in notes if n)})"
    return out.astype(str).assign(**{
        "Seeds": table["n_seeds"].astype(str).to_numpy(),
        "Trials": table["n_trials"].astype(str).to_numpy(),
        "Final val loss (mean)": table["final_val_loss"].map(lambda x: _num(x, ".4f")).to_numpy(),
        "Seed spread": table["seed_spread"].map(lambda x: _num(x, ".4f")).to_numpy(),
        "Replicate gap": table["replicate_gap"].map(lambda x: _num(100 * x, ".2g") + " %").to_numpy(),
        "Spikes (worst)": [f"{n} ({_pct(w)})" for n, w in zip(table["spikes"], table["worst_spike"])],
        "Stable": ["yes" if s else "no" for s in table["stable"]],
        "Selected": [selected(r) for r in table["run_id"]]})


def budgets_display(a: Analysis, arm: str = "dbp") -> pd.DataFrame:
    """Per seed of the ladder: each budget's BP final loss against the arm's loss at the
    same time (rule 9: each arm decayed to its own budget), and the budget-curve crossings."""
    e = A.equal_time(a.budgets, arm)
    b = a.budget_strict.set_index(["arm", "seed"])
    cross = lambda s, x: (f"{_num(b.loc[(x, s), 'seconds'], '.1f')} s ({b.loc[(x, s), 'kind']})"  # noqa: E731
                          if (x, s) in b.index else "–")
    return pd.DataFrame({
        "Seed": e["seed"], "BP steps": e["baseline_steps"],
        "Time (s, steps x step time)": e["seconds"].map(lambda x: _num(x, ".1f")),
        "BP final loss": e["baseline_loss"].map(lambda x: _num(x, ".4f")),
        f"{arm} loss at equal time": e["arm_loss"].map(lambda x: _num(x, ".4f")),
        "Difference": e["diff"].map(lambda x: _num(x, "+.4f")),
        "BP reaches target at": [cross(s, A.BASELINE) for s in e["seed"]],
        f"{arm} reaches target at": [cross(s, arm) for s in e["seed"]],
    })


# ----------------------------------------------------------------------------- writers

_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
_LATEX_SYMBOLS = {"−∞": r"$-\infty$", "∞": r"$\infty$", "–": "--", "−": "-"}


def _latex_cell(x) -> str:
    text = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(x))
    for sym, tex in _LATEX_SYMBOLS.items():
        text = text.replace(sym, tex)
    return text


def to_markdown(df: pd.DataFrame, title: str, caption: str) -> str:
    """A GitHub-flavoured Markdown table under a bold title and caption."""
    cells = [[str(x).replace("|", r"\|") for x in row] for row in df.itertuples(index=False)]
    lines = [f"**{title}.** {caption}", "", "| " + " | ".join(map(str, df.columns)) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|",
             *("| " + " | ".join(r) + " |" for r in cells)]
    return "\n".join(lines) + "\n"


def to_html(df: pd.DataFrame, title: str, caption: str) -> str:
    """A standalone HTML table under its title and caption (for `snakemake --report`)."""
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>table{border-collapse:collapse;font:13px sans-serif}td,th{border:1px solid #ccc;"
            "padding:3px 6px;text-align:left}p{font:13px sans-serif;max-width:70em}</style></head>\n"
            f"<body><p><b>{html.escape(title)}.</b> {html.escape(caption)}</p>\n"
            f"{df.to_html(index=False, border=0)}\n</body></html>\n")


def to_latex(df: pd.DataFrame, title: str, caption: str, label: str) -> str:
    """A booktabs table environment (needs \\usepackage{booktabs})."""
    row = lambda xs: " & ".join(_latex_cell(x) for x in xs) + r" \\"  # noqa: E731
    lines = [r"\begin{table}[ht]", r"\centering", r"\small",
             rf"\caption{{\textbf{{{_latex_cell(title)}.}} {_latex_cell(caption)}}}",
             rf"\label{{{label}}}", rf"\begin{{tabular}}{{{'l' * len(df.columns)}}}", r"\toprule",
             row(df.columns), r"\midrule", *(row(r) for r in df.itertuples(index=False)),
             r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _flags(a: Analysis) -> str:
    """What a reader must know before trusting the headline: contention, the noise
    detector, unfinished runs, pinned tuning, too few seeds."""
    out = []
    off = a.clock[a.clock["flag"]] if len(a.clock) else a.clock
    if len(off):
        out.append(f"CLOCK FLAG: identity's whole-run time ratio to BP strays from its side-by-side "
                   f"step-time ratio ({a.clock['expected'].iloc[0]:.3f}) by more than "
                   f"{a.clock['tolerance'].iloc[0]:.1%} (half the claimed effect) on seeds "
                   f"{off['seed'].tolist()} (measured {', '.join(f'{x:.3f}' for x in off['measured'])}): "
                   "the runs' own clocks cannot confirm the step cost the headline uses.")
    unstable = [f"{arm} ({c['run_id']})" for arm, c in a.choices.items() if not c["stable"]]
    if unstable:
        out.append(f"TUNING FLAG: no stable grid point for {', '.join(unstable)}: the winner is the "
                   "lowest mean of unstable points.")
    close = [arm for arm, c in a.choices.items() if c["within_spread"]]
    if close:
        out.append(f"Tuning margin within the tuning seeds' spread for {', '.join(close)}: another "
                   "set of tuning seeds may pick another value.")
    out.append(_power(a))
    shared = int(a.segments.loc[a.segments["role"] == "scored", "shared"].sum())
    if shared:
        out.append(f"{shared} of {int((a.segments['role'] == 'scored').sum())} scored training "
                   "segments shared their cores with another process.")
    if not len(a.step_cost):
        out.append("No side-by-side step cost: wall-clock uses each arm's own step times, so a "
                   "machine slower while one arm's runs were timed moves the headline.")
    if a.stray:
        out.append(f"Left out {len(a.stray)} run folders that the study's config does not declare "
                   f"(an earlier config's): {', '.join(a.stray[:6])}{' ...' if len(a.stray) > 6 else ''}.")
    if a.missing:
        out.append(f"MISSING RUNS: {len(a.missing)} runs the study declares have no records (not "
                   f"scored, as unfinished runs are not): {', '.join(a.missing[:8])}"
                   f"{' ...' if len(a.missing) > 8 else ''}.")
    open_runs = A.unfinished(a.runs)
    if len(open_runs):
        out.append("Unfinished runs (not scored): " + ", ".join(
            f"{r.run_id}/seed{r.seed} ({r.status})" for r in open_runs.itertuples()) + ".")
    if a.selected is None:
        out.append("Tuning: pinned by the config (tuning.enabled: false), not tuned.")
    else:
        out.append("Tuning winners: " + "; ".join(
            f"{arm} {c['values']}" + (f" (from {c['from']})" if c.get("from") else "")
            for arm, c in a.selected["arms"].items()) + ".")
        edge = _edge_winners(a)
        if edge:
            out.append(f"TUNING FLAG: the winner of {', '.join(edge)} lies at the edge of its grid: "
                       "widen tuning.grid.")
    if a.n_target < 5:
        out.append(f"Only {a.n_target} target-setting runs (the protocol asks for 5).")
    if len(a.seeds) < 6:
        out.append(f"{len(a.seeds)} scored seeds: an exact paired test cannot reach p < 0.05 "
                   "below 6.")
    return " ".join(out)


def _power(a: Analysis, arm: str = "dbp") -> str:
    """The power line: the smallest speed-up this many seeds at this spread resolve, and the
    seeds a +-10 % interval needs (docs/protocol.md rule 8)."""
    r = a.speedup(arm)
    if r is None or not math.isfinite(r["sd"]):
        return "Power: not estimable (fewer than two seeds with exact crossings)."
    return (f"Power: the seeds' log speed-ups spread by sd {r['sd']:.3f} ({r['n_exact']} exact seeds); "
            f"with {r['n_defined']} seeds a paired test at 5 % finds a speed-up of "
            f"{_times(r['min_detectable'])} 80 % of the time, and a +-10 % interval would need about "
            f"{_num(r['seeds_for_10pct'], '.0f')} seeds (the step cost's share, sd "
            f"{r['step_cost_sd']:.3f} in log, shrinks with more step-cost rounds, not seeds).")


def _downstream_note(a: Analysis) -> str:
    """What the two downstream measures are, for the captions (empty without a probe)."""
    if a.probe.empty:
        return ""
    kind = "/".join(sorted(set(a.probe["features"])))
    return (f" Linear probe: a linear head on the frozen encoder's patch features ({kind}), "
            f"{int(a.probe['heads'].iloc[0])} head seeds per encoder, {a.probe['seconds'].mean():.1f} s "
            "per encoder (docs/downstream.md). mIoU: UperNet fine-tuned (the paper's protocol).")


def _time_basis(a: Analysis) -> str:
    """How steps become seconds in this study's headline."""
    if len(a.step_cost):
        r = a.step_cost.iloc[0]
        return (f"BP's median seconds per step in the study x the arm's side-by-side step-time "
                f"ratio ({r['rounds']} interleaved rounds, {r['disturbed']} disturbed and left out)")
    return "the arm's median seconds per step over the unshared segments of its runs"


def _edge_winners(a: Analysis) -> list[str]:
    """Arms whose winning value is the smallest or largest of a grid of 3 or more values."""
    out = []
    for arm, c in (a.selected or {}).get("arms", {}).items():
        for key, value in c["values"].items():
            grid = a.tuning[A.SWEEP + key].dropna().unique() if A.SWEEP + key in a.tuning else []
            if len(grid) >= 3 and value in (min(grid), max(grid)) and not c.get("from"):
                out.append(f"{arm} ({key} = {value})")
    return out


def _captions(a: Analysis) -> dict[str, tuple[str, str]]:
    common = (f"Study '{a.study}', scored seeds {a.seeds}, {a.hardware}. Target = median of the "
              f"best validation losses of {a.n_target} BP target-setting runs (never scored) = "
              f"{a.target:.4f}.")
    return {
        "headline": ("Headline: DBP-MAE against BP-MAE", f"{common} Primary (docs/protocol.md "
                     "version 3): per seed, T_BP / T_DBP where each arm's budget curve (final loss "
                     "of runs fully decayed at 0.5x, 1x, 1.5x the base budget, time = steps x "
                     + _time_basis(a) + ") reaches the target, read on the curve's running minimum "
                     "and interpolated in log-budget; a curve already below at its shortest budget "
                     "or never below is a bound, not a value. Median over seeds with its "
                     "distribution-free order-statistic interval, widened by the step-time ratio's "
                     "own bootstrap interval (the two levels add up to 95 %); exact signed-rank "
                     "test, its p the largest any value the bounds allow and any ratio in the step "
                     "cost's 99 % interval give, + 0.01 (Berger-Boos). Other cost rows: the first "
                     "crossing inside the base run, geometric mean over seeds where both reached, "
                     "t interval (range below 5 pairs), sign-flip test. First crossing: the first "
                     "validation point at or below the target inside the base-budget run. Energy: "
                     f"{a.energy_kind}" + (" (codecarbon's TDP x load estimate: a rescaled "
                     "clock, not comparable with the paper's 21.4 % CO2)" if a.energy_kind ==
                     "modelled" else "") + f".{_downstream_note(a)} {_flags(a)}"),
        "per_seed": ("Every scored seed at the target", f"{common} Speed-up vs BP, budget curve: "
                     "the primary quantity of each seed (>= / <=: a bound, the curve crossed "
                     "before its shortest or after its longest budget). Speed-up vs BP, first "
                     "crossing: inside the base run, at steps x step time. Shared segments = timed "
                     "segments where another process used the cores."),
        "sensitivity": ("How much the headline depends on the reading of the curve", f"{common} "
                        "Each row reads the same runs another way: primary (running minimum, "
                        "log-budget, step cost's uncertainty in), without the step cost's "
                        "uncertainty, the curve as measured, non-monotone points skipped, linear "
                        "interpolation, and protocol version 2's reading. Conclusion: faster or "
                        "slower when the whole interval lies on one side of 1."),
        "stability": ("Unstable runs", f"{common} A spike: a validation loss more than "
                      f"{A.SPIKE_RISE:.0%} above the run's best so far; every scored run of every "
                      "budget. Unstable runs are a result of the method and its tuned rate, "
                      "scored as they ended."),
        "overhead": ("Step-time overhead and contention", f"{common} Headline seconds per step = "
                     f"{_time_basis(a)}. Side by side: the arms' steps interleaved in one process "
                     "(median over rounds of the per-round ratio; quartiles). Study ratio: each "
                     "arm's median over the unshared segments of its own runs, timed minutes "
                     "apart (identity = DBP layers with decor_lr = 0: DBP's overhead without its "
                     "effect); CPU use = process CPU seconds per wall second; mean power = "
                     "energy / training time."),
        "relaxed": ("Relaxed targets", f"{common} DBP's primary speed-up at target x (1 + r)."),
        "downstream": ("Downstream: which encoder is better", f"{common}{_downstream_note(a)} "
                       "Differences are paired per scored seed (the encoders of one seed share "
                       "data subset, initial weights and batches): mean, t interval or range below "
                       "5 seeds, exact sign-flip test. Pre-training (s) = steps x the arm's seconds "
                       "per step (" + _time_basis(a) + "); scratch is a random init. "
                       "Per-class IoU: per_class_iou.csv."),
        "arms": ("Every arm against BP", f"{common} Speed-up T_BP / T_arm read off the budget "
                 "curves (time = steps x " + _time_basis(a) + "), as the headline's primary row; "
                 "steps to target at the first crossing (geometric mean); step time as the "
                 "ratio to BP measured side by side. Controls are not tuned and have no budget "
                 "ladder."),
        "tuning": ("Tuning trials", f"{common} Every arm's grid points on the tuning seeds, each "
                   "trial a fully decayed base-budget schedule, each beside its numerics replicate "
                   "(initial weights nudged by tuning.replicate). A point is stable when no trial "
                   f"diverged or spiked (> {A.SPIKE_RISE:.0%} above its best) and every replicate "
                   f"ended within tuning.tolerance ({_num((a.selected or {}).get('tolerance', A.REPLICATE_TOLERANCE))}, "
                   "relative) of its trial; the lowest mean final loss among the stable points "
                   "wins (a tie inside the tolerance goes to the earlier point) and feeds every "
                   "target-setting and scored run. Margin: the runner-up's mean minus the "
                   "winner's, flagged when inside the winner's seed spread." +
                   ("" if a.selected else " This study pinned its values instead.")),
        "budgets": ("Budget ladder", f"{common} Fully decayed runs at several budgets; DBP's loss "
                    "at BP's time read off DBP's budget curve (linear between budgets; – outside "
                    "them), and where each curve reaches the target (primary reading)."),
        "sweep": ("Sweep (exploration, tuning seeds, never scored)", f"{common}" +
                  ("" if len(a.sweep) else " This study has no sweep.")),
    }


def write_report(results_dir: str | Path, study_name: str, readme: str | Path | None = None,
                 **analyze_kwargs) -> list[Path]:
    """Write the tables (.md, .tex, .html) and tidy CSVs into `results_dir` (= results/<study>);
    with `readme`, also replace its headline block by the README_TABLES.
    Returns the paths."""
    out = Path(results_dir)
    a = analyze(out, study_name, **analyze_kwargs)
    tables = {"headline": headline_table(a), "sensitivity": sensitivity_table(a),
              "stability": stability_table(a), "arms": arms_table(a), "relaxed": relaxed_table(a),
              "per_seed": per_seed_table(a), "downstream": downstream_table(a),
              "overhead": overhead_table(a), "tuning": tuning_display(a, a.tuning),
              "budgets": budgets_display(a), "sweep": tuning_display(a, a.sweep)}
    texts = {}
    texts["reading.md"] = reading(a)
    for name, (title, caption) in _captions(a).items():
        texts[f"{name}.md"] = to_markdown(tables[name], title, caption)
        texts[f"{name}.tex"] = to_latex(tables[name], title, caption, f"tab:{study_name}-{name}")
        texts[f"{name}.html"] = to_html(tables[name], title, caption)
    classes = pd.concat([A.per_class_iou(df).assign(measure=m) for m, df in
                         (("probe", a.probe), ("finetune", a.finetune)) if len(df)] or [pd.DataFrame()])
    for name, df in {"pretrain_runs": a.curves, "finetune_runs": a.finetune, "time_to_target": a.ttt,
                     "comparisons": a.comparisons, "segments": a.segments, "budget_runs": a.budgets,
                     "probe_runs": a.probe, "per_class_iou": classes, "stability": a.stability,
                     "speedups": a.speedups.assign(seeds=a.speedups["seeds"].map(json.dumps))
                     if len(a.speedups) else a.speedups, "clock": a.clock,
                     "downstream": pd.concat([a.probe_diffs.assign(measure="probe"),
                                              a.miou.assign(measure="finetune")])}.items():
        texts[f"{name}.csv"] = df.to_csv(index=False)
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    paths = [out / name for name in texts]
    if readme is not None:
        update_readme(readme, readme_block(texts))
        paths.append(Path(readme))
    return paths


def readme_block(texts: dict[str, str]) -> str:
    """What the README shows of a study: the headline, its reading in words, its sensitivity
    to the reading of the curve, the unstable runs, every arm against BP, and every
    downstream comparison (each encoder against scratch, BP and BP at its wall-clock)."""
    return "\n".join(texts[f"{t}.md"] for t in ("headline", "reading", *README_TABLES[1:]))


def reading(a: Analysis, arm: str = "dbp") -> str:
    """The headline in words, every number taken from the records (the README's prose)."""
    r = a.speedup(arm)
    if r is None:
        return ""
    cost = a.overhead.set_index("arm")["ratio"]
    steps = A.compare(a.strict, arm, "step", level=a.level)
    others = a.speedups[(a.speedups["arm"] == arm) & (a.speedups["relax"] == 0)
                        & (a.speedups["reading"] != "primary")]
    same = int((others["conclusion"] == r["conclusion"]).sum())
    text = [f"**Reading (generated from the records).** {arm.upper()}'s budget curve reaches the target "
            f"{_times(r['median'])} as fast as BP's (median of {r['n_defined']} seeds; "
            f"{_order_interval(r)}; p = {r['p_value']:.3g}): {r['conclusion']}. Each {arm} step costs "
            f"{_num(cost.get(arm, math.nan), '.3f')}x BP's, measured side by side (the identity control, "
            f"the same work without the effect: {_num(cost.get('identity', math.nan), '.3f')}x); at the first "
            f"crossing inside the base run BP needs {_times(steps['geo_mean'])} as many steps "
            f"({steps['n_both']} seeds where both crossed). The other readings of the budget curve give "
            + ", ".join(f"{_times(o['median'])} ({o['reading']})" for o in others.to_dict("records"))
            + f": the same conclusion in {same} of {len(others)}."]
    spiky = [f"{st['arm']} on seeds {', '.join(map(str, st['seeds_spiked']))} (worst +{st['worst']:.0%}, "
             f"{st['worst_run']})" for st in a.stability.to_dict("records") if st["runs_spiked"]]
    text.append("Loss spikes in scored runs: " + ("; ".join(spiky) if spiky else "none") + ".")
    for other in a.arms:
        o = a.speedup(other)
        if other not in (arm, A.BASELINE) and o is not None:
            text.append(f"{other}: {_times(o['median'])} {_order_interval(o)}, p = {o['p_value']:.3g}: "
                        f"{o['conclusion']}.")
    probe = a.probe_diffs[(a.probe_diffs["arm"] == arm) & (a.probe_diffs["vs"] == A.BASELINE)] \
        if len(a.probe_diffs) else a.probe_diffs
    if len(probe):
        p = probe.iloc[0]
        text.append(f"Linear probe, {arm} against BP: {_points(p['mean'])} points {_interval(p, _points)}, "
                    f"p = {p['p_value']:.3g}.")
    return " ".join(text) + "\n"


def update_readme(readme: str | Path, block_md: str, block: str = "headline") -> None:
    """Replace the text between the README's `<!-- {block}:start -->` and `:end -->` markers
    by `block_md`."""
    start, end = readme_markers(block)
    text = Path(readme).read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme}: no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_text(readme, f"{head}{start}\n{block_md}{end}{tail}")
