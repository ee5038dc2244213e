"""The paper's tables from a study's runs: Markdown and LaTeX beside tidy CSVs in results/<study>/.

`analyze` computes every tidy table once (the figures use it too); the `*_table` functions
turn it into display tables with our numbers beside the paper's; `write_report` writes them
all atomically, so a killed job never leaves a table that looks complete.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dbp import analysis as A
from dbp.config import PATCH_EMBED
from dbp.measure import atomic_write_text
from dbp.model import build_mae, matmul_macs

PAPER = {"train_seconds": "21.1 %", "co2_kg": "21.4 %", "speedup": "1.27x (implied)",
         "mIoU": "+1.1"}
COST_METRICS = ("train_seconds", "energy_kwh", "co2_kg", "step", "flops")


# ----------------------------------------------------------------------------- FLOPs model

def run_config(info: dict) -> dict:
    """A run's config as it trained: run.json's resolved config (sweep point included) with
    its arm's pretrain overrides merged in."""
    cfg = copy.deepcopy(info["config"])
    cfg["pretrain"].update(cfg.get("arm_overrides", {}).get(info["arm"], {}))
    return cfg


def macs_per_step(info: dict) -> tuple[float, float]:
    """(MACs of one BP training step, DBP's extra MACs per step) of a run, from its run.json.

    A step is 3 x the forward matmuls (the backward forms two products per forward one) on
    the effective batch; DBP's extra work follows `analysis.dbp_extra_macs` over the layers
    its patterns match, each with the tokens it sees. The model is built on the meta device:
    shapes only, no memory.
    """
    cfg, batch = run_config(info), int(info["effective_batch"])
    pre = cfg["pretrain"]
    with torch.device("meta"):
        model = build_mae(pre["model"], mask_ratio=pre["mask_ratio"], norm_pix_loss=pre["norm_pix_loss"])
    bp = 3.0 * sum(matmul_macs(model, batch).values())
    if info["arm"] == A.BASELINE:
        return bp, 0.0
    d = cfg["dbp"]
    patterns = [*d["include"], *([PATCH_EMBED] if d.get("patch_embed") else [])]
    extra = sum(A.dbp_extra_macs([(m.weight.shape[0], m.weight[0].numel())],
                                 batch * _tokens_seen(name, model), d["sample_frac"], d["every"],
                                 d["fused"])
                for name, m in model.named_modules() if any(re.fullmatch(p, name) for p in patterns))
    return bp, extra


def _tokens_seen(name: str, model) -> int:
    """Token rows per image through a layer (as `matmul_macs` counts them): every patch for
    the patch embedding, cls + every patch in the decoder, cls + visible in the encoder."""
    if name.startswith("patch_embed"):
        return model.num_patches
    return 1 + (model.num_patches if name.startswith("decoder") else model.num_visible)


# ----------------------------------------------------------------------------- analysis

@dataclass(frozen=True)
class Analysis:
    """Every tidy table of one study, computed once; `ttt` holds each run at each target."""
    study: str
    curves: pd.DataFrame
    finetune: pd.DataFrame
    target: float
    ttt: pd.DataFrame
    comparisons: pd.DataFrame
    overhead: pd.DataFrame
    miou: pd.DataFrame
    equal_budget: pd.DataFrame
    sweep: pd.DataFrame
    main: list[str]
    hardware: str
    n_boot: int
    level: float
    seed: int

    @property
    def strict(self) -> pd.DataFrame:
        """Time to the strict target of the main arms (sweep points left out)."""
        return self.ttt[(self.ttt["relax"] == 0) & self.ttt["run_id"].isin(self.main)]

    @property
    def seeds(self) -> list[int]:
        return sorted(self.curves["seed"].unique().tolist())


def analyze(results_dir: str | Path, study: str, *, interpolate: bool = False,
            n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Analysis:
    """Load results/<study> (`results_dir`) and compute every table of the report."""
    runs = A.load_runs(results_dir)
    curves, finetune = A.load_pretrain(results_dir), A.load_finetune(results_dir)
    if curves.empty:
        raise ValueError(f"{results_dir}: no pre-training runs")
    macs = {}
    for (run_id, _), info in runs.items():
        macs.setdefault(run_id, macs_per_step(info))
    ttt = A.add_flops(A.times_to_targets(curves, interpolate=interpolate),
                      {r: m[0] for r, m in macs.items()}, {r: m[1] for r, m in macs.items()})
    main = ordered_arms(curves.loc[~A.is_sweep(curves), "run_id"].unique())
    strict = ttt[ttt["relax"] == 0]
    stats = dict(n_boot=n_boot, level=level, seed=seed)
    return Analysis(
        study=study, curves=curves, finetune=finetune, target=float(strict["target"].iloc[0]), ttt=ttt,
        comparisons=A.comparisons(strict, [r for r in main if r != A.BASELINE], COST_METRICS, **stats),
        overhead=A.overhead(curves), miou=A.miou(finetune, **stats) if len(finetune) else pd.DataFrame(),
        equal_budget=A.equal_budget(curves, finetune), sweep=A.sweep_table(curves, strict),
        main=main, hardware=_hardware(curves), **stats)


def ordered_arms(run_ids: Iterable[str]) -> list[str]:
    """Distinct run_ids, known arms first in their usual order, then the rest alphabetically."""
    known = ["bp", "dbp", "identity", "scratch"]
    return sorted(set(run_ids), key=lambda r: (known.index(r) if r in known else len(known), r))


def _in_main_order(df: pd.DataFrame, main: list[str]) -> pd.DataFrame:
    """The rows of the main arms, in arm order (then seed, where there is one)."""
    order = {r: i for i, r in enumerate(main)}
    keys = ["_order", *(["seed"] if "seed" in df.columns else [])]
    df = df[df["run_id"].isin(order)]
    return df.assign(_order=df["run_id"].map(order)).sort_values(keys).drop(columns="_order")


def _hardware(curves: pd.DataFrame) -> str:
    cpus = " / ".join(sorted(set(curves["cpu_model"].dropna()) - {""})) or "unknown CPU"
    gpus = " / ".join(sorted(set(curves["gpu_names"].dropna()) - {""})) or "no GPU"
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


def _ci(lo: float, hi: float, fmt, degenerate: bool) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]" + (" (1 seed: degenerate)" if degenerate else "")


def _times(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else _num(x)


def _p(row) -> str:
    return f"p = {row['p_value']:.3g} ({row['test']})"


# ----------------------------------------------------------------------------- tables

def headline_table(a: Analysis, arm: str = "dbp") -> pd.DataFrame:
    """The paper's headline claims, ours beside theirs: cost reductions to the target
    (median over seeds), the speed-up, and the mIoU change (mean over seeds, points)."""
    ci = f"Ours [{a.level:.0%} CI]"
    cmp = (a.comparisons[a.comparisons["run_id"] == arm].set_index("metric")
           if len(a.comparisons) else None)
    rows = []
    for label, metric in [("Wall-clock to target: reduction", "train_seconds"),
                          ("CO2eq to target: reduction", "co2_kg"),
                          ("Energy to target: reduction", "energy_kwh"),
                          ("Steps to target: reduction", "step"),
                          ("FLOPs to target: reduction", "flops")]:
        rows.append(_cost_row(label, cmp, metric, "reduction", _pct, ci))
    rows.insert(1, _cost_row("Speed-up T_BP / T_DBP", cmp, "train_seconds", "speedup", _times, ci))
    rows.append(_miou_row(a, arm, ci))
    return pd.DataFrame(rows)


def _cost_row(label: str, cmp: pd.DataFrame | None, metric: str, key: str, fmt, ci: str) -> dict:
    paper = PAPER.get(key if key == "speedup" else metric, "–")
    if cmp is None or metric not in cmp.index:
        return {"Quantity": label, ci: "n/a", "Paper": paper, "Seeds": "0", "Paired test": "–"}
    r = cmp.loc[metric]
    if r["n_seeds"] == r["n_undefined"]:
        return {"Quantity": label, ci: "n/a (no seed with a defined ratio)", "Paper": paper,
                "Seeds": str(r["n_seeds"]), "Paired test": "–"}
    return {"Quantity": label,
            ci: f"{fmt(r[key])} {_ci(r[key + '_lo'], r[key + '_hi'], fmt, r['ci_degenerate'])}",
            "Paper": paper,
            "Seeds": f"{r['n_seeds']} (not reached: BP {r['n_base_not_reached']}, "
                     f"DBP {r['n_not_reached']})",
            "Paired test": _p(r)}


def _miou_row(a: Analysis, arm: str, ci: str) -> dict:
    label = "mIoU change (points, mean)"
    row = a.miou[a.miou["run_id"] == arm] if len(a.miou) else a.miou
    if row.empty or row["n_pairs"].iloc[0] == 0:
        return {"Quantity": label, ci: "n/a (no paired fine-tunes)", "Paper": PAPER["mIoU"],
                "Seeds": "0", "Paired test": "–"}
    r = row.iloc[0]
    pts = lambda x: _num(100 * x, "+.2f")  # noqa: E731
    interval = _ci(r["diff_lo"], r["diff_hi"], pts, r["n_pairs"] < 2)
    return {"Quantity": label, ci: f"{pts(r['diff'])} {interval}",
            "Paper": PAPER["mIoU"], "Seeds": str(r["n_pairs"]), "Paired test": _p(r)}


def relaxed_table(a: Analysis, arm: str = "dbp") -> pd.DataFrame:
    """Wall-clock reduction at the strict and the relaxed targets (+1 %, +2 %, +5 %): is the
    gain an artefact of where exactly the target falls?"""
    ci, rows = f"Reduction [{a.level:.0%} CI]", []
    for relax, t in a.ttt[a.ttt["run_id"].isin(a.main)].groupby("relax"):
        cmp = A.comparisons(t, [arm], ["train_seconds"], n_boot=a.n_boot, level=a.level, seed=a.seed)
        row = _cost_row("", cmp.set_index("metric"), "train_seconds", "reduction", _pct, ci)
        rows.append({"Target": f"+{relax:.0%} ({t['target'].iloc[0]:.4f})", ci: row[ci],
                     "Seeds": row["Seeds"], "Paired test": row["Paired test"]})
    return pd.DataFrame(rows)


def per_seed_table(a: Analysis) -> pd.DataFrame:
    """Every main run at the strict target: costs, speed-up and reduction vs BP of its seed,
    best validation loss and mIoU (rule 7: report every seed)."""
    best = A.run_summary(a.curves)[["run_id", "seed", "best_val_loss"]]
    t = a.strict.merge(best, on=["run_id", "seed"])
    pairs = pd.concat([A.paired(a.strict, r).assign(run_id=r) for r in a.main if r != A.BASELINE]
                      or [pd.DataFrame(columns=["run_id", "seed", "speedup", "reduction"])])
    t = t.merge(pairs[["run_id", "seed", "speedup", "reduction"]], on=["run_id", "seed"], how="left")
    t = _in_main_order(A.with_miou(t, a.finetune), a.main)
    return pd.DataFrame({
        "Arm": t["run_id"], "Seed": t["seed"], "Status": t["status"],
        "Best val loss": t["best_val_loss"].map(lambda x: _num(x, ".4f")),
        "Time to target (s)": t["train_seconds"].map(lambda x: _num(x, ".1f")),
        "Steps": t["step"].map(lambda x: _num(x, ".0f")),
        "FLOPs": t["flops"].map(lambda x: _num(x, ".3g")),
        "Energy (kWh)": t["energy_kwh"].map(_num),
        "CO2eq (g)": (1000 * t["co2_kg"]).map(_num),
        "Speed-up vs BP": t["speedup"].map(_times),
        "Reduction vs BP": t["reduction"].map(_pct),
        "mIoU (points)": (100 * t["mIoU"]).map(lambda x: _num(x, ".2f")),
    })


def overhead_table(a: Analysis) -> pd.DataFrame:
    """Step time of each arm and its ratio to BP paired by seed (rule 6), and throughput."""
    o = _in_main_order(a.overhead, a.main)
    return pd.DataFrame({
        "Arm": o["run_id"], "Seeds": o["n_seeds"],
        "Seconds per step (median)": o["sec_per_step"].map(lambda x: _num(x, ".4f")),
        "Step-time ratio vs BP [min, max]": [
            f"{_num(r, '.3f')} [{_num(lo, '.3f')}, {_num(hi, '.3f')}]"
            for r, lo, hi in o[["ratio", "ratio_min", "ratio_max"]].to_numpy()],
        "Images/s (median)": o["images_per_second"].map(lambda x: _num(x, ".1f")),
    })


def sweep_display(a: Analysis) -> pd.DataFrame:
    """One row per sweep point (empty when the study has no sweep)."""
    s = a.sweep
    keys = {c: c.removeprefix(A.SWEEP) for c in A.sweep_columns(s)}
    out = s[["run_id", *keys]].rename(columns={"run_id": "Sweep point", **keys}).astype(str)
    return out.assign(**{"Seeds": s["n_seeds"].astype(str), "Reached": s["n_reached"].astype(str),
                         "Diverged": s["n_diverged"].astype(str),
                         "Time to target, median (s)": s["time_to_target"].map(lambda x: _num(x, ".1f")),
                         "Final val loss, median": s["final_val_loss"].map(lambda x: _num(x, ".4f"))})


def equal_budget_display(a: Analysis) -> pd.DataFrame:
    """Validation loss (and mIoU) of every main run at the same training-time budget."""
    e = _in_main_order(a.equal_budget, a.main)
    return pd.DataFrame({
        "Arm": e["run_id"], "Seed": e["seed"], "Status": e["status"],
        "Budget (s)": e["budget"].map(lambda x: _num(x, ".1f")), "Step": e["step"],
        "Train time (s)": e["train_seconds"].map(lambda x: _num(x, ".1f")),
        "Val loss": e["val_loss"].map(lambda x: _num(x, ".4f")),
        "mIoU (points)": (100 * e["mIoU"]).map(lambda x: _num(x, ".2f")),
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


def to_latex(df: pd.DataFrame, title: str, caption: str, label: str) -> str:
    """A booktabs table environment (needs \\usepackage{booktabs})."""
    row = lambda xs: " & ".join(_latex_cell(x) for x in xs) + r" \\"  # noqa: E731
    lines = [r"\begin{table}[ht]", r"\centering", r"\small",
             rf"\caption{{\textbf{{{_latex_cell(title)}.}} {_latex_cell(caption)}}}",
             rf"\label{{{label}}}", rf"\begin{{tabular}}{{{'l' * len(df.columns)}}}", r"\toprule",
             row(df.columns), r"\midrule", *(row(r) for r in df.itertuples(index=False)),
             r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _captions(a: Analysis) -> dict[str, tuple[str, str]]:
    common = (f"Study '{a.study}', seeds {a.seeds}, {a.hardware}. Target = median over BP seeds of "
              f"each seed's best validation loss = {a.target:.4f}.")
    return {
        "headline": ("Headline: DBP-MAE vs BP-MAE", f"{common} Costs to the first validation point at "
                     f"or below the target; not reached = infinite, counted. {a.level:.0%} percentile "
                     f"bootstrap intervals over seeds ({a.n_boot} resamples); paired test on "
                     "log(T_BP/T_DBP): Wilcoxon signed-rank for >= 5 pairs, else exact sign test."),
        "per_seed": ("Every seed at the target",
                     f"{common} Speed-up and reduction against BP of the same seed."),
        "overhead": ("Step-time overhead", f"{common} Median over validation segments of training "
                     "seconds per step; ratio to BP paired by seed (identity = DBP layers with "
                     "decor_lr = 0)."),
        "relaxed": ("Relaxed targets", f"{common} DBP's wall-clock reduction against BP at "
                    "target x (1 + r)."),
        "sweep": ("Sweep", f"{common} One row per sweep point; a diverged run's final loss counts "
                  "as infinite." + ("" if len(a.sweep) else " This study has no sweep points.")),
        "equal_budget": ("Equal training-time budget", f"{common} Last validation point within "
                         "the budget (the shortest finished run); schedules not re-decayed to it."),
    }


def write_report(results_dir: str | Path, study_name: str, **analyze_kwargs) -> list[Path]:
    """Write the tables (.md and .tex) and tidy CSVs into `results_dir` (= results/<study>).

    Returns the paths written. `analyze_kwargs` go to `analyze` (interpolate, n_boot, ...).
    """
    out = Path(results_dir)
    a = analyze(out, study_name, **analyze_kwargs)
    tables = {"headline": headline_table(a), "relaxed": relaxed_table(a), "per_seed": per_seed_table(a),
              "overhead": overhead_table(a), "sweep": sweep_display(a),
              "equal_budget": equal_budget_display(a)}
    texts = {}
    for name, (title, caption) in _captions(a).items():
        texts[f"{name}.md"] = to_markdown(tables[name], title, caption)
        texts[f"{name}.tex"] = to_latex(tables[name], title, caption, f"tab:{study_name}-{name}")
    for name, df in {"pretrain_runs": a.curves, "finetune_runs": a.finetune, "time_to_target": a.ttt,
                     "comparisons": a.comparisons}.items():
        texts[f"{name}.csv"] = df.to_csv(index=False)
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    return [out / name for name in texts]
