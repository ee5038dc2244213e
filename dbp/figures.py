"""The paper's figures from a study's runs: PNG and PDF under paper_figures/<study>/.

Each `fig_*` takes the study's `Analysis` (the report's tables) and returns (figure, the data it
draws), or None when its data are absent, so tests can hold the drawing against the tables.
Figures use matplotlib's object API (Agg, no pyplot state), 6.4 x 4.8 in at 150 dpi, and carry
a caption line with the study, seeds and hardware.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dbp import analysis as A
from dbp.measure import atomic_write
from dbp.report import Analysis, analyze, ordered_arms

SIZE, DPI = (6.4, 4.8), 150
COLORS = {"bp": "C0", "dbp": "C1", "identity": "C2", "scratch": "C7"}
DASHED = {"identity": "--"}  # the identity control often lies exactly on BP: keep both visible
DECOR_LR, KAPPA = A.SWEEP + "dbp.decor_lr", A.SWEEP + "dbp.kappa"
Made = tuple[Figure, pd.DataFrame] | None


def _color(run_id: str, order: list[str]) -> str:
    return COLORS.get(run_id, f"C{3 + order.index(run_id) % 6}" if run_id in order else "C9")


def _new(a: Analysis, title: str, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=SIZE, dpi=DPI)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    fig.subplots_adjust(left=0.12, right=0.97, top=0.84, bottom=0.2, wspace=0.4)
    fig.suptitle(title, fontsize=11, y=0.98)
    fig.text(0.5, 0.012, f"Study '{a.study}' · seeds {a.seeds} · {a.hardware}",
             ha="center", va="bottom", fontsize=7, color="0.3")
    return fig, axes


def _legend(fig: Figure, ax: Axes, title: str) -> None:
    """One legend between the title and the axes (never over the data), duplicates merged."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.935),
               ncol=min(len(unique), 4), fontsize=8, title=title, title_fontsize=8, frameon=False)


# ----------------------------------------------------------------------------- curves

def curve_bands(a: Analysis, column: str) -> pd.DataFrame:
    """Per main arm and validation step: mean training seconds, and mean, min and max of
    `column` over seeds (finite values only: a diverged seed leaves the band there).
    Arms share the step grid, so wall-clock is the seeds' mean time at each step."""
    c = a.curves[a.curves["run_id"].isin(a.main)]
    c = c.assign(y=c[column].where(np.isfinite(c[column])))
    g = c.groupby(["run_id", "step"], sort=True)
    return g.agg(seconds=("train_seconds", "mean"), mean=("y", "mean"), lo=("y", "min"),
                 hi=("y", "max"), n=("y", "count")).reset_index()


def _bands(ax: Axes, data: pd.DataFrame, x: str, order: list[str]) -> None:
    for run_id in order:
        d = data[data["run_id"] == run_id]
        if d.empty:
            continue
        color = _color(run_id, order)
        ax.plot(d[x], d["mean"], color=color, ls=DASHED.get(run_id, "-"), lw=1.6, label=run_id)
        ax.fill_between(d[x], d["lo"], d["hi"], color=color, alpha=0.2, lw=0)
    ax.grid(alpha=0.3)


def fig_loss(a: Analysis, x: str = "seconds") -> Made:
    """Validation loss against training wall-clock (`x`="seconds") or steps (`x`="step")."""
    data = curve_bands(a, "val_loss")
    fig, (ax,) = _new(a, f"Validation loss against {'wall-clock' if x == 'seconds' else 'steps'}")
    _bands(ax, data, x, a.main)
    ax.axhline(a.target, color="k", ls="--", lw=1, label=f"target {a.target:.4f} (median BP best)")
    top = data.loc[data["step"] > data["step"].min(), "hi"].max()  # the untrained model's loss
    ax.set_ylim(0.98 * np.nanmin([data["lo"].min(), a.target]),  # would flatten the rest
                1.05 * top if math.isfinite(top) else None)
    ax.set_xlabel("training time (s, validation excluded)" if x == "seconds" else "optimizer step")
    ax.set_ylabel("validation loss (masked-patch MSE)")
    _legend(fig, ax, "lines: mean over seeds; bands: min-max")
    return fig, data


def fig_decorrelation(a: Analysis) -> Made:
    """Mean |correlation| of the probed encoder-layer inputs over training, per arm."""
    data = curve_bands(a, "mean_abs_corr")
    if data["n"].sum() == 0:
        return None
    fig, (ax,) = _new(a, "Decorrelation of encoder-layer inputs")
    _bands(ax, data, "step", a.main)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean |off-diagonal correlation| (val images)")
    _legend(fig, ax, "lines: mean over seeds; bands: min-max")
    return fig, data


# ----------------------------------------------------------------------------- bars

def _cost_bars(ax: Axes, a: Analysis, metric: str, scale: float, ylabel: str) -> pd.DataFrame:
    """Median cost to target per arm with its interval, seeds as dots; a not-reached median
    is a hatched bar to the top of the axis, not-reached seeds are crosses at the top."""
    s = A.arm_summary(a.strict, metric, a.n_boot, a.level, a.seed)
    s = s.set_index("run_id").loc[[r for r in a.main if r in set(s["run_id"])]].reset_index()
    seeds = a.strict[["run_id", metric]]
    finite = [v for v in (*s["median"], *s["lo"], *s["hi"], *seeds[metric]) if math.isfinite(v)]
    top = 1.15 * max(finite, default=1.0) * scale
    x = np.arange(len(s))
    med = s["median"].to_numpy(float) * scale
    heights = np.where(np.isfinite(med), med, top)
    bars = ax.bar(x, heights, color=[_color(r, a.main) for r in s["run_id"]], alpha=0.8,
                  edgecolor="k", lw=0.5)
    for bar, m in zip(bars, med):
        if not math.isfinite(m):
            bar.set_hatch("//")
    ok = np.isfinite(med)
    lo = np.minimum(s["lo"].to_numpy(float) * scale, top)
    hi = np.minimum(s["hi"].to_numpy(float) * scale, top)
    ax.errorbar(x[ok], med[ok], yerr=[med[ok] - lo[ok], hi[ok] - med[ok]], fmt="none", ecolor="k",
                capsize=4, lw=1, label=f"{a.level:.0%} CI of the median")
    for i, run_id in enumerate(s["run_id"]):
        v = seeds.loc[seeds["run_id"] == run_id, metric].to_numpy(float) * scale
        ax.plot(np.full(np.isfinite(v).sum(), i), v[np.isfinite(v)], "o", color="k", ms=3,
                label="seed" if i == 0 else None)
        n_nr = int((~np.isfinite(v)).sum())
        if n_nr:
            ax.plot(i, top * 0.97, "x", color="C3", ms=8, mew=2, label="seed not reached")
            ax.annotate(f"{n_nr}/{v.size}", (i + 0.1, top * 0.955), ha="left", va="center", fontsize=7,
                        color="C3")
    ax.set_xticks(x, s["run_id"])
    ax.set_ylim(0, top * 1.02)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return s.assign(scale=scale, plotted=heights)


def fig_time_to_target(a: Analysis) -> Made:
    fig, (ax,) = _new(a, "Training time to BP's best validation loss")
    data = _cost_bars(ax, a, "train_seconds", 1.0, "training time to target (s)")
    _legend(fig, ax, "bars: median over seeds; hatched: median not reached")
    return fig, data


def fig_energy(a: Analysis) -> Made:
    """Energy (Wh) and CO2eq (g) to target; None when energy was not metered."""
    if not (a.strict["energy_kwh"].replace(math.inf, np.nan) > 0).any():
        return None
    fig, axes = _new(a, "Energy and emissions to BP's best validation loss", ncols=2)
    data = pd.concat([
        _cost_bars(axes[0], a, "energy_kwh", 1e3, "energy to target (Wh)").assign(metric="energy_kwh"),
        _cost_bars(axes[1], a, "co2_kg", 1e3, "CO2eq to target (g)").assign(metric="co2_kg")])
    _legend(fig, axes[0], "bars: median over seeds; hatched: median not reached")
    return fig, data


def fig_miou(a: Analysis) -> Made:
    """Mean mIoU per arm with its interval and seeds; None without fine-tune runs."""
    if a.finetune.empty:
        return None
    m = a.miou.set_index("run_id").loc[ordered_arms(a.miou["run_id"])].reset_index()
    fig, (ax,) = _new(a, "Segmentation after fine-tuning")
    x = np.arange(len(m))
    pts = 100 * m["mIoU"].to_numpy(float)
    ax.bar(x, pts, color=[_color(r, a.main) for r in m["run_id"]], alpha=0.8, edgecolor="k", lw=0.5)
    ax.errorbar(x, pts, yerr=[pts - 100 * m["mIoU_lo"], 100 * m["mIoU_hi"] - pts], fmt="none",
                ecolor="k", capsize=4, lw=1, label=f"{a.level:.0%} CI of the mean")
    for i, run_id in enumerate(m["run_id"]):
        v = 100 * a.finetune.loc[a.finetune["run_id"] == run_id, "mIoU"].to_numpy(float)
        ax.plot(np.full(v.size, i), v, "o", color="k", ms=3, label="seed" if i == 0 else None)
    ax.set_xticks(x, m["run_id"])
    ax.set_ylabel("mIoU (points)")
    _legend(fig, ax, "bars: mean over seeds")
    ax.grid(axis="y", alpha=0.3)
    return fig, m.assign(plotted=pts)


# ----------------------------------------------------------------------------- sweep

def fig_sweep(a: Analysis) -> Made:
    """Heatmap over decor_lr x kappa: colour = median final validation loss, text = median
    time to target (diverged: final loss inf, grey); other swept keys are reduced to their
    best cell. None without that sweep."""
    s = a.sweep
    if s.empty or not {DECOR_LR, KAPPA} <= set(s.columns) or s[[DECOR_LR, KAPPA]].isna().all().any():
        return None
    loss = s.pivot_table(index=KAPPA, columns=DECOR_LR, values="final_val_loss", aggfunc="min")
    time = s.pivot_table(index=KAPPA, columns=DECOR_LR, values="time_to_target", aggfunc="min")
    time = time.reindex(index=loss.index, columns=loss.columns)
    fig, (ax,) = _new(a, "Sweep: decor_lr x kappa")
    shown = loss.to_numpy(float)
    cmap = colormaps["viridis_r"].with_extremes(bad="0.85")  # diverged or absent: grey
    im = ax.imshow(np.where(np.isfinite(shown), shown, np.nan), cmap=cmap, origin="lower", aspect="auto")
    fig.colorbar(im, ax=ax, label="final val loss (median over seeds)")
    for (i, j), v in np.ndenumerate(shown):
        t = time.iat[i, j]
        text = ("–" if math.isnan(v) else "diverged" if math.isinf(v) else
                f"{v:.3f}\n" + (f"{t:.0f} s" if math.isfinite(t) else "not reached"))
        dark = math.isfinite(v) and im.norm(v) > 0.5
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if dark else "k")
    ax.set_xticks(range(len(loss.columns)), [f"{v:g}" for v in loss.columns])
    ax.set_yticks(range(len(loss.index)), [f"{v:g}" for v in loss.index])
    ax.set_xlabel("decor_lr (eta)")
    ax.set_ylabel("kappa")
    others = [c.removeprefix(A.SWEEP) for c in A.sweep_columns(s) if c not in (DECOR_LR, KAPPA)]
    if others:
        ax.set_title(f"best over {', '.join(others)}", fontsize=8)
    return fig, loss


# ----------------------------------------------------------------------------- writer

FIGURES: dict[str, Callable[[Analysis], Made]] = {
    "loss_vs_time": lambda a: fig_loss(a, "seconds"),
    "loss_vs_steps": lambda a: fig_loss(a, "step"),
    "decorrelation": fig_decorrelation,
    "time_to_target": fig_time_to_target,
    "energy_to_target": fig_energy,
    "miou": fig_miou,
    "sweep_heatmap": fig_sweep,
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
    if not A.load_runs(results_dir):
        return []
    a = analyze(results_dir, study_name, **analyze_kwargs)
    paths = []
    for name, make in FIGURES.items():
        made = make(a)
        if made is not None:
            paths += save(made[0], Path(figures_dir) / name)
    return paths
