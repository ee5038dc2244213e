"""The paper's figures from a study's runs: PNG and PDF under paper_figures/<study>/.

Each `fig_*` takes the study's `Analysis` (the report's tables) and returns (figure, the data it
draws), or None when its data are absent, so tests can hold the drawing against the tables.
Figures use matplotlib's object API (Agg, no pyplot state), 6.4 x 4.8 in at 150 dpi. Every
figure draws seeds, not only means; a run that never reached the target is drawn as a miss
above the axis, never as a finite value; each carries a caption line saying what it shows
and from which runs.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dbp import analysis as A
from dbp.arms import REGISTRY, controls
from dbp.records import atomic_write
from dbp.report import Analysis, analyze, ordered_arms

SIZE, DPI = (6.4, 4.8), 150
# Fixed per arm everywhere, as each arm declares it (dbp/arms/); scratch is fine-tuning's.
COLORS = {**{name: arm.color for name, arm in REGISTRY.items()}, "scratch": "C7"}
# A control lies on the losses of the arm it controls: dashed, so both stay visible.
STYLE = {name: dict(ls="--", dashes=(4, 3)) for name in controls()}
Made = tuple[Figure, pd.DataFrame] | None


def _color(arm: str) -> str:
    return COLORS.get(arm, f"C{3 + sum(map(ord, arm)) % 6}")


def _new(a: Analysis, title: str, caption: str, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=SIZE, dpi=DPI)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    fig.subplots_adjust(left=0.14, right=0.97, top=0.84, bottom=0.24, wspace=0.4)
    fig.suptitle(title, fontsize=11, y=0.98)
    fig.text(0.5, 0.012, textwrap.fill(caption, 130) +
             f"\nStudy '{a.study}' · scored seeds {a.seeds} · {a.hardware}",
             ha="center", va="bottom", fontsize=6.5, color="0.3")
    return fig, axes


def _legend(fig: Figure, ax: Axes, title: str = "") -> None:
    """One legend between the title and the axes (never over the data), duplicates merged."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.935),
               ncol=min(len(unique), 4), fontsize=8, title=title or None, title_fontsize=8,
               frameon=False)


# ----------------------------------------------------------------------------- curves

def scored_curves(a: Analysis, column: str) -> pd.DataFrame:
    """The base-budget scored runs' validation points (every seed), finite values only."""
    c = A.base_runs(a.curves[(a.curves["role"] == "scored") & a.curves["status"].isin(A.FINAL)])
    return c[np.isfinite(c[column])]


def _seed_lines(ax: Axes, data: pd.DataFrame, x: str, y: str, arms: list[str]) -> None:
    for arm in arms:
        for seed, d in data[data["arm"] == arm].groupby("seed"):
            ax.plot(d[x], d[y], color=_color(arm), lw=1.0, alpha=0.75, label=arm, **STYLE.get(arm, {}))
    ax.grid(alpha=0.3)


def fig_loss(a: Analysis, x: str = "train_seconds") -> Made:
    """Validation loss of every scored seed against measured training time or steps: the
    whole run on a log axis, and beside it each run's second half zoomed on the target (linear)."""
    data = scored_curves(a, "val_loss")
    what = "measured training time" if x == "train_seconds" else "steps"
    fig, (ax, zoom) = _new(a, f"Validation loss against {what}",
                           "One line per scored base-budget run; dashed black: the target (median best "
                           "of the BP target-setting runs). Left: the whole run, log scale; right: "
                           "the runs' second halves zoomed on the losses near the target, linear scale.",
                           ncols=2)
    for panel in (ax, zoom):
        _seed_lines(panel, data, x, "val_loss", a.arms)
        panel.axhline(a.target, color="k", ls="--", lw=1, label=f"target {a.target:.4f}")
        panel.set_xlabel("training time (s, validation excluded)" if x == "train_seconds"
                         else "optimizer step", fontsize=9)
    ax.set_yscale("log")  # keeps the untrained model's loss and the end of training readable
    ax.set_ylabel("validation loss (log scale)")
    # Zoom: from just below the lowest loss to 8 % above the target (higher only when no
    # loss comes that close, so the lowest points still show).
    low = float(data["val_loss"].min()) if len(data) else a.target
    top = max(a.target * 1.08, low * 1.02)
    zoom.set_ylim(low - 0.1 * (top - low), top)
    ends = data.groupby(["arm", "seed"])[x].max() if len(data) else pd.Series([1.0])
    zoom.set_xlim(ends.min() / 2, ends.max())  # the second half of every run
    zoom.set_title("second half of each run, near the target", fontsize=9)
    _legend(fig, ax)
    return fig, data


def fig_decorrelation(a: Analysis) -> Made:
    """Mean |correlation| of the probed encoder-layer inputs over training, every seed."""
    data = scored_curves(a, "mean_abs_corr")
    if data.empty:
        return None
    fig, (ax,) = _new(a, "Decorrelation of encoder-layer inputs",
                      "Mean |off-diagonal correlation| of the DBP layers' inputs on the validation "
                      "images; one line per scored run.")
    _seed_lines(ax, data, "step", "mean_abs_corr", a.arms)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean |correlation|")
    _legend(fig, ax)
    return fig, data


def fig_budgets(a: Analysis) -> Made:
    """Final validation loss of fully decayed runs against their training time, per seed."""
    bc = a.budgets[a.budgets["seed"].isin(a.budget_ttt["seed"])]
    if bc.empty:
        return None
    fig, (ax,) = _new(a, "Budget curves: final loss of fully decayed runs",
                      "Each point a scored run decayed to its own budget (time = steps x the arm's "
                      "step time: BP's study median x the side-by-side ratio); one line per arm "
                      "and seed.")
    for (arm, seed), g in bc.sort_values("seconds").groupby(["arm", "seed"]):
        ax.plot(g["seconds"], g["final_val_loss"], "o-", color=_color(arm), lw=1, ms=3, label=arm)
    ax.axhline(a.target, color="k", ls="--", lw=1, label=f"target {a.target:.4f}")
    ax.set_xlabel("training time, steps x step time (s)")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return fig, bc


# ----------------------------------------------------------------------------- costs

def _seed_costs(ax: Axes, a: Analysis, t: pd.DataFrame, metric: str, scale: float,
                ylabel: str) -> pd.DataFrame:
    """Every seed's cost to target per arm (rows of `t`) as a dot, the geometric mean as a
    bar; misses as red crosses in a band above the axis labelled "not reached", never on
    the value scale."""
    arms = [r for r in a.arms if r in set(t["arm"])]
    values = {arm: t.loc[t["arm"] == arm, metric].to_numpy(float) * scale for arm in arms}
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()] or [np.zeros(0)])
    top = 1.15 * (finite.max() if finite.size else 1.0)
    rows = []
    for i, arm in enumerate(arms):
        v = values[arm]
        ok = v[np.isfinite(v)]
        gm = float(np.exp(np.log(ok).mean())) if ok.size and (ok > 0).all() else math.nan
        ax.bar(i, gm if math.isfinite(gm) else 0, color=_color(arm), alpha=0.6, edgecolor="k", lw=0.5)
        ax.plot(np.full(ok.size, i) + np.linspace(-0.15, 0.15, ok.size), ok, "o", color="k", ms=3,
                label="seed")
        misses = int((~np.isfinite(v)).sum())
        if misses:
            ax.plot(i, top * 1.06, "x", color="C3", ms=8, mew=2, label="seed not reached")
            ax.annotate(f"{misses}/{v.size}", (i + 0.12, top * 1.06), va="center", fontsize=7, color="C3")
        rows.append({"arm": arm, "geo_mean": gm, "n": v.size, "misses": misses})
    ax.axhline(top, color="0.5", lw=0.8)
    ax.text(len(arms) - 0.5, top * 1.06, "not reached", ha="right", va="center", fontsize=7, color="C3")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return pd.DataFrame(rows)


def fig_time_to_target(a: Analysis) -> Made:
    if a.budget_strict.empty:
        return None
    fig, (ax,) = _new(a, "Training time to the target (budget curves)",
                      "Where each seed's budget curve (runs fully decayed at several budgets, time = "
                      "steps x the arm's step time) reaches the target; bar: geometric mean "
                      "of the seeds that reached it.")
    data = _seed_costs(ax, a, a.budget_strict, "seconds", 1.0, "time to target (s)")
    _legend(fig, ax)
    return fig, data


def fig_energy(a: Analysis) -> Made:
    """Energy to target (Wh); None when energy was not metered. Labelled modelled/measured."""
    if a.energy_kind == "none":
        return None
    fig, (ax,) = _new(a, f"Energy to the target ({a.energy_kind})",
                      "Energy over the timed training spans to the first crossing" +
                      (": MODELLED (codecarbon's TDP x load estimate, a rescaled clock), not a "
                       "measurement" if a.energy_kind == "modelled" else ": hardware counters") + ".")
    data = _seed_costs(ax, a, A.base_runs(a.strict), "energy_kwh", 1e3,
                       f"energy to first crossing (Wh, {a.energy_kind})")
    _legend(fig, ax)
    return fig, data


def fig_miou(a: Analysis) -> Made:
    """mIoU of every fine-tuned encoder per seed, mean as a bar; None without fine-tunes."""
    if a.finetune.empty:
        return None
    arms = [r for r in [*a.arms, "scratch"] if r in set(a.finetune["run_id"])]
    fig, (ax,) = _new(a, "Segmentation after fine-tuning",
                      "UperNet fine-tuned from each encoder (scratch: random init); dots: seeds, "
                      "bars: mean.")
    rows = []
    for i, arm in enumerate(arms):
        v = 100 * a.finetune.loc[a.finetune["run_id"] == arm, "mIoU"].to_numpy(float)
        ax.bar(i, v.mean(), color=_color(arm), alpha=0.6, edgecolor="k", lw=0.5)
        ax.plot(np.full(v.size, i), v, "o", color="k", ms=3, label="seed")
        rows.append({"arm": arm, "mean": v.mean(), "n": v.size})
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("mIoU (points)")
    ax.grid(axis="y", alpha=0.3)
    _legend(fig, ax)
    return fig, pd.DataFrame(rows)


def fig_downstream(a: Analysis) -> Made:
    """Downstream mIoU of every encoder against what its pre-training cost (steps x step
    time; scratch at 0), per seed, the linear probe and the fine-tune side by side; None
    without either. Colour: the method that trained the encoder; diamonds: BP given another
    arm's wall-clock."""
    panels = [(t, df) for t, df in (("linear probe", a.probe), ("fine-tune (UperNet)", a.finetune))
              if len(df)]
    if not panels:
        return None
    fig, axes = _new(a, "Downstream score against pre-training cost",
                     "Small marks: seeds; large: the mean. Linear probe: a linear head on the frozen "
                     "encoder's standardised patch features; fine-tune: UperNet, the paper's protocol. "
                     "Pre-training time = steps x the arm's seconds per step.", ncols=len(panels))
    cost = a.encoder_seconds[["run_id", "seed", "seconds"]].rename(columns={"seconds": "cost"})
    rows = []
    for ax, (title, df) in zip(axes, panels):
        d = df.merge(cost, on=["run_id", "seed"], how="left").fillna({"cost": 0.0})  # scratch: none
        for run_id in ordered_arms(d["run_id"]):
            g = d[d["run_id"] == run_id]
            arm = g["arm"].iloc[0]
            style = dict(marker="o" if run_id in (arm, "scratch") else "D", color=_color(arm), ls="none")
            ax.plot(g["cost"], 100 * g["mIoU"], ms=3, alpha=0.5, **style)
            ax.plot(g["cost"].mean(), 100 * g["mIoU"].mean(), ms=8, mec="k", label=run_id, **style)
            rows.append({"measure": title, "run_id": run_id, "arm": arm, "seconds": g["cost"].mean(),
                         "mIoU": g["mIoU"].mean(), "n": len(g)})
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("pre-training (s, steps x step time)")
        ax.set_ylabel("mIoU (points)")
        ax.grid(alpha=0.3)
    _legend(fig, axes[0])
    return fig, pd.DataFrame(rows)


# ----------------------------------------------------------------------------- writer

FIGURES: dict[str, Callable[[Analysis], Made]] = {
    "loss_vs_time": lambda a: fig_loss(a, "train_seconds"),
    "loss_vs_steps": lambda a: fig_loss(a, "step"),
    "decorrelation": fig_decorrelation,
    "budget_curves": fig_budgets,
    "time_to_target": fig_time_to_target,
    "energy_to_target": fig_energy,
    "miou": fig_miou,
    "downstream": fig_downstream,
}


def save(fig: Figure, stem: Path) -> list[Path]:
    """`stem`.png and `stem`.pdf, each written to a temp name then renamed (atomic)."""
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        meta = {"CreationDate": None} if ext == "pdf" else {}  # same data, same bytes
        atomic_write(path, "wb",
                     lambda f, ext=ext, meta=meta: fig.savefig(f, format=ext, dpi=DPI, metadata=meta))
        paths.append(path)
    return paths


def write_figures(results_dir: str | Path, figures_dir: str | Path, study_name: str,
                  **analyze_kwargs) -> list[Path]:
    """Every figure whose data exist, from results/<study> (`results_dir`) into `figures_dir`
    (= paper_figures/<study>); returns the paths written (none without pre-training runs)."""
    if A.load_runs(results_dir).empty:
        return []
    a = analyze(results_dir, study_name, **analyze_kwargs)
    paths = []
    for name, make in FIGURES.items():
        made = make(a)
        if made is not None:
            paths += save(made[0], Path(figures_dir) / name)
    return paths
