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
from pathlib import Path

import numpy as np
import pandas as pd

from dbp import analysis as A
from dbp.arms import REGISTRY
from dbp.records import atomic_write_text

PAPER = {"seconds": "21.1 %", "mIoU": "+1.1"}
README_START, README_END = "<!-- headline:start -->", "<!-- headline:end -->"
README_TABLES = ("headline", "arms", "downstream")


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
    noise: pd.DataFrame
    overhead: pd.DataFrame
    budgets: pd.DataFrame
    budget_ttt: pd.DataFrame    # budget-curve crossings at every target (column relax)
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

    @property
    def strict(self) -> pd.DataFrame:
        return self.ttt[self.ttt["relax"] == 0]

    @property
    def budget_strict(self) -> pd.DataFrame:
        return self.budget_ttt[self.budget_ttt["relax"] == 0]

    @property
    def seeds(self) -> list[int]:
        return sorted(self.runs.loc[self.runs["role"] == "scored", "seed"].unique().tolist())

    @property
    def energy_kind(self) -> str:
        kinds = set(self.runs.loc[self.runs["role"] == "scored", "energy_kind"])
        return "measured" if kinds == {"measured"} else "none" if kinds <= {"none"} else "modelled"


def analyze(results_dir: str | Path, study: str, *, level: float = 0.95) -> Analysis:
    """Load results/<study> (`results_dir`) and compute every table of the report."""
    runs = A.load_runs(results_dir)
    if runs.empty:
        raise ValueError(f"{results_dir}: no pre-training runs")
    curves, finetune, probe = A.load_pretrain(results_dir, runs), A.load_finetune(results_dir), \
        A.load_probe(results_dir)
    done = A.final(runs)
    target, n_target = A.target_loss(curves[curves["status"].isin(A.FINAL)])
    seg = A.segments(curves, runs)
    cost = A.round_ratios(A.load_step_cost(results_dir))
    step_sec = A.arm_step_seconds(seg, cost)
    ttt = pd.concat([A.time_to_target(curves, done, t, step_sec).assign(relax=r)
                     for r, t in A.relaxed_targets(target).items()], ignore_index=True)
    arms = ordered_arms(runs.loc[runs["role"] == "scored", "arm"])
    others = [a for a in arms if a != A.BASELINE]
    bc = A.budget_curves(done, curves, step_sec)
    sel_path = Path(results_dir) / "tuning" / "selected.json"
    selected = json.loads(sel_path.read_text()) if sel_path.is_file() else {}
    return Analysis(
        study=study, runs=runs, curves=curves, finetune=finetune, target=target, n_target=n_target,
        segments=seg, step_cost=cost, step_sec=step_sec, ttt=ttt,
        comparisons=A.comparisons(ttt[ttt["relax"] == 0], others, level=level),
        noise=A.noise_check(ttt[ttt["relax"] == 0], step_sec), overhead=A.overhead(seg, runs, curves, cost),
        budgets=bc, budget_ttt=pd.concat([A.budget_time_to_target(bc, t).assign(relax=r)
                                          for r, t in A.relaxed_targets(target).items()], ignore_index=True),
        tuning=A.tuning_table(runs, curves, tolerance=selected.get("tolerance", A.REPLICATE_TOLERANCE)),
        sweep=A.tuning_table(runs, curves, role="sweep"), selected=selected or None,
        miou=_differences(finetune, level), probe=probe, probe_diffs=_differences(probe, level),
        encoder_seconds=A.pretrain_seconds(runs, step_sec), arms=arms, hardware=_hardware(runs),
        level=level)


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
    primary row, beside the paper's wall-clock figure."""
    r = A.budget_speedup(a.budget_ttt[a.budget_ttt["relax"] == relax], arm, level=a.level)
    if r["n"] == 0:
        return {"Quantity": PRIMARY, "Ours [interval]": "n/a (no budget ladder)", "Reduction": "–",
                "Paper": PAPER["seconds"], "Seeds": "0", "Exact paired test": "–"}
    return _speedup_row(PRIMARY, r, PAPER["seconds"])


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
        "Speed-up vs BP": [_times(ratio[r.arm].get(r.seed, math.nan)) for r in t.itertuples()],
        "Budget curve (s)": [f"{_num(curve.loc[(r.arm, r.seed), 'seconds'], '.1f')} ({curve.loc[(r.arm, r.seed), 'kind']})"
                             if (r.arm, r.seed) in curve.index else "–" for r in t.itertuples()],
        "Shared segments": [int(shared.get((r.run_id, r.seed), 0)) for r in t.itertuples()],
    })


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
    winners = {c["run_id"]: c for c in (a.selected or {}).get("arms", {}).values() if not c.get("from")}
    keys = {c: c.removeprefix(A.SWEEP) for c in A.sweep_columns(table) if table[c].notna().any()}
    out = table[["run_id", "arm", *keys]].rename(columns={"run_id": "Run", "arm": "Arm", **keys})

    def selected(run_id: str) -> str:
        c = winners.get(run_id)
        if c is None:
            return ""
        if "margin" not in c:  # a selection of protocol version 2
            return "yes"
        note = "; WITHIN SEED SPREAD" if c["within_spread"] else ""
        return f"yes (margin {_num(c['margin'], '.4f')}{note})" + ("" if c["stable"] else "; NO STABLE POINT")
    return out.astype(str).assign(**{
        "Seeds": table["n_seeds"].astype(str).to_numpy(),
        "Trials": table["n_trials"].astype(str).to_numpy(),
        "Final val loss (mean)": table["final_val_loss"].map(lambda x: _num(x, ".4f")).to_numpy(),
        "Seed spread": table["seed_spread"].map(lambda x: _num(x, ".4f")).to_numpy(),
        "Replicate gap": table["replicate_gap"].map(lambda x: _num(100 * x, ".2g") + " %").to_numpy(),
        "Spikes (worst)": [f"{n} ({_pct(w)})" for n, w in table[["spikes", "worst_spike"]].to_numpy()],
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
    noisy = a.noise[a.noise["flag"]] if len(a.noise) else a.noise
    if len(noisy):
        out.append(f"NOISE FLAG: identity's measured ratio is off its step-time overhead by more than "
                   f"{A.NOISE_TOLERANCE:.0%} on seeds {noisy['seed'].tolist()}: measured wall-clock "
                   "there is not trustworthy (the primary row uses steps x step time).")
    shared = int(a.segments.loc[a.segments["role"] == "scored", "shared"].sum())
    if shared:
        out.append(f"{shared} of {int((a.segments['role'] == 'scored').sum())} scored training "
                   "segments shared their cores with another process.")
    if not len(a.step_cost):
        out.append("No side-by-side step cost: wall-clock uses each arm's own step times, so a "
                   "machine slower while one arm's runs were timed moves the headline.")
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
        "headline": ("Headline: DBP-MAE against BP-MAE", f"{common} Cost rows give the speed-up "
                     "T_BP / T_DBP per seed: geometric mean over seeds where both reached, with a "
                     "t interval on the log ratios (range below 5 pairs); exact two-sided "
                     "sign-flip test over every seed (a miss counts as the most extreme value). "
                     "Primary: where each seed's budget curve (final loss of runs fully decayed at "
                     "0.5x, 1x, 1.5x the base budget, time = steps x " + _time_basis(a) + ") reaches "
                     "the target. First crossing: the first "
                     "validation point at or below the target inside the base-budget run. Energy: "
                     f"{a.energy_kind}" + (" (codecarbon's TDP x load estimate: a rescaled "
                     "clock, not comparable with the paper's 21.4 % CO2)" if a.energy_kind ==
                     "modelled" else "") + f".{_downstream_note(a)} {_flags(a)}"),
        "per_seed": ("Every scored seed at the target", f"{common} Speed-up at the primary "
                     "wall-clock; shared segments = timed segments where another process used "
                     "the cores."),
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
        "tuning": ("Tuning trials", f"{common} Every arm's trials on the tuning seeds, fully "
                   "decayed base-budget schedules; the lowest mean final validation loss wins "
                   "and feeds every target-setting and scored run." +
                   ("" if a.selected else " This study pinned its values instead.")),
        "budgets": ("Budget ladder", f"{common} Fully decayed runs at several budgets; DBP's loss "
                    "at BP's time read off DBP's budget curve (linear between budgets; – outside "
                    "them), and where each curve reaches the target."),
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
    tables = {"headline": headline_table(a), "arms": arms_table(a), "relaxed": relaxed_table(a),
              "per_seed": per_seed_table(a), "downstream": downstream_table(a),
              "overhead": overhead_table(a), "tuning": tuning_display(a, a.tuning),
              "budgets": budgets_display(a), "sweep": tuning_display(a, a.sweep)}
    texts = {}
    for name, (title, caption) in _captions(a).items():
        texts[f"{name}.md"] = to_markdown(tables[name], title, caption)
        texts[f"{name}.tex"] = to_latex(tables[name], title, caption, f"tab:{study_name}-{name}")
        texts[f"{name}.html"] = to_html(tables[name], title, caption)
    classes = pd.concat([A.per_class_iou(df).assign(measure=m) for m, df in
                         (("probe", a.probe), ("finetune", a.finetune)) if len(df)] or [pd.DataFrame()])
    for name, df in {"pretrain_runs": a.curves, "finetune_runs": a.finetune, "time_to_target": a.ttt,
                     "comparisons": a.comparisons, "segments": a.segments, "budget_runs": a.budgets,
                     "probe_runs": a.probe, "per_class_iou": classes,
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
    """What the README shows of a study: the headline, every arm against BP, and every
    downstream comparison (each encoder against scratch, BP and BP at its wall-clock)."""
    return "\n".join(texts[f"{t}.md"] for t in README_TABLES)


def update_readme(readme: str | Path, headline_md: str) -> None:
    """Replace the text between the README's headline markers by `headline_md`."""
    text = Path(readme).read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_START} ... {README_END} block to fill")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    atomic_write_text(readme, f"{head}{README_START}\n{headline_md}{README_END}{tail}")
