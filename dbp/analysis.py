"""A study's runs turned into the protocol's numbers: targets, time-to-target, paired statistics.

Pure functions on tidy pandas tables; the loaders are the only I/O. Conventions:
- `curves`: one row per validation point (`load_pretrain`); a run is (run_id, seed), where
  run_id is the arm or `<arm>__<sweep point>`. Comparisons pair runs of the same seed.
- A run that never reaches a target (or diverges first) scores inf: counted, never dropped.
- Aggregates over seeds are medians (robust to inf) for costs and means for mIoU, with
  percentile-bootstrap intervals over seeds; paired tests are chosen by `paired_test`.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from dbp.pretrain import COLUMNS as METRIC_COLUMNS

BASELINE = "bp"
RELAXED = (0.0, 0.01, 0.02, 0.05)
SWEEP = "sweep."  # prefix of the flattened sweep keys, e.g. "sweep.dbp.kappa"
AT_TARGET = ("step", "images_seen", "train_seconds", "energy_kwh", "co2_kg")
RUN_KEYS = ["run_id", "arm", "seed", "status"]
RUN_INFO = ["effective_batch", "cpu_model", "gpu_names"]
PRETRAIN_COLUMNS = [*RUN_KEYS, *RUN_INFO, *METRIC_COLUMNS]
FINETUNE_METRICS = ["mIoU", "mAcc", "aAcc", "iterations", "train_seconds", "energy_kwh", "co2_kg"]
FINETUNE_COLUMNS = ["run_id", "arm", "seed", *FINETUNE_METRICS]
IOU = "iou."  # prefix of the per-class IoU columns of the fine-tune table


# ----------------------------------------------------------------------------- loading

def _seed_dirs(root: Path) -> list[tuple[str, int, Path]]:
    """(run_id, seed, folder) of every <run_id>/seed<s> folder under `root`, sorted."""
    found = [(d.parent.name, int(m.group(1)), d) for d in root.glob("*/seed*")
             if d.is_dir() and (m := re.fullmatch(r"seed(\d+)", d.name))]
    return sorted(found, key=lambda t: t[:2])


def _read_json(path: Path, keys: Iterable[str], seed: int) -> dict:
    """The JSON object at `path`, checked for `keys` and for the seed of its folder."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if obj.get("seed", seed) != seed:
        raise ValueError(f"{path}: seed {obj['seed']} but folder seed{seed}")
    return obj


def _read_metrics_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from e
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if missing or df.empty:
        raise ValueError(f"{path}: {'missing columns ' + str(missing) if missing else 'no rows'}")
    bad = [c for c in METRIC_COLUMNS if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise ValueError(f"{path}: non-numeric columns {bad}")
    if not df["step"].is_monotonic_increasing:
        raise ValueError(f"{path}: steps not increasing")
    return df[METRIC_COLUMNS]


def load_runs(results_dir: str | Path) -> dict[tuple[str, int], dict]:
    """run.json of every pre-training run under `results_dir`/pretrain, by (run_id, seed)."""
    runs = {}
    for run_id, seed, d in _seed_dirs(Path(results_dir) / "pretrain"):
        runs[run_id, seed] = _read_json(d / "run.json", ["arm", "seed", "status"], seed)
    return runs


def load_pretrain(results_dir: str | Path) -> pd.DataFrame:
    """All validation points of a study's pre-training runs, one row each (`results_dir` is
    results/<study>). Adds run keys, provenance and the run's sweep keys as `sweep.<key>`."""
    frames = []
    for (run_id, seed), info in load_runs(results_dir).items():
        df = _read_metrics_csv(Path(results_dir) / "pretrain" / run_id / f"seed{seed}" / "metrics.csv")
        prov = info.get("provenance", {})
        meta = {"run_id": run_id, "arm": info["arm"], "seed": seed, "status": info["status"],
                "effective_batch": info.get("effective_batch"), "cpu_model": prov.get("cpu_model", ""),
                "gpu_names": "; ".join(prov.get("gpu_names", [])),
                **{SWEEP + k: _number(v) for k, v in (info.get("sweep") or {}).items()}}
        frames.append(df.assign(**meta))
    if not frames:
        return pd.DataFrame(columns=PRETRAIN_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    return df[PRETRAIN_COLUMNS + sorted(sweep_columns(df))]


def load_finetune(results_dir: str | Path) -> pd.DataFrame:
    """One row per fine-tune run (metrics.json), per-class IoU as `iou.<class>` columns."""
    rows = []
    for run_id, seed, d in _seed_dirs(Path(results_dir) / "finetune"):
        m = _read_json(d / "metrics.json", [*FINETUNE_METRICS, "per_class_iou"], seed)
        rows.append({"run_id": run_id, "arm": m.get("arm", run_id.split("__")[0]), "seed": seed,
                     **{k: m[k] for k in FINETUNE_METRICS},
                     **{IOU + k: v for k, v in m["per_class_iou"].items()}})
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=FINETUNE_COLUMNS)


def _number(value):
    """A sweep value as a number where it is one (the CLI records `--set` values as text)."""
    if not isinstance(value, str):
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def sweep_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(SWEEP)]


def is_sweep(df: pd.DataFrame) -> pd.Series:
    """Rows of sweep points (any sweep key set), as opposed to the study's main arms."""
    cols = sweep_columns(df)
    return df[cols].notna().any(axis=1) if cols else pd.Series(False, index=df.index)


# ----------------------------------------------------------------------------- per run

def run_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per run: best and final validation loss, total training seconds and steps.

    The final loss of a diverged run is its non-finite last point, so it is never mistaken
    for a converged one.
    """
    c = curves.sort_values(["run_id", "seed", "step"])
    g = c.groupby(["run_id", "seed"], sort=True)
    last = g.tail(1).reset_index(drop=True)  # group order, as `c` is sorted by the keys
    out = last[RUN_KEYS + sweep_columns(c)].copy()
    out["best_val_loss"] = g["val_loss"].min().to_numpy()  # skips NaN (a diverged point)
    out["final_val_loss"] = last["val_loss"].to_numpy()
    out["total_train_seconds"] = last["train_seconds"].to_numpy()
    out["steps"] = last["step"].to_numpy()
    return out


# ----------------------------------------------------------------------------- targets

def target_loss(curves: pd.DataFrame, baseline: str = BASELINE) -> float:
    """Median over the baseline's seeds of each seed's best validation loss (protocol rule 1)."""
    bests = run_summary(curves).query("run_id == @baseline")["best_val_loss"].dropna()
    if bests.empty:
        raise ValueError(f"no {baseline!r} runs with a validation loss: the target is undefined")
    return float(bests.median())


def relaxed_targets(target: float, relax: Sequence[float] = RELAXED) -> dict[float, float]:
    """{relaxation r: target x (1 + r)}; r = 0 is the strict target."""
    return {r: target * (1.0 + r) for r in relax}


def _at_target(run: pd.DataFrame, target: float, interpolate: bool) -> dict[str, float]:
    loss = run["val_loss"].to_numpy(float)
    hits = np.flatnonzero(loss <= target)  # NaN (diverged) never counts as reaching
    if hits.size == 0:
        return {"reached": False, **{c: math.inf for c in AT_TARGET}}
    i = hits[0]
    at = run[list(AT_TARGET)].iloc[i].to_numpy(float)
    if interpolate and i > 0:  # loss[i - 1] > target >= loss[i], so 0 < w <= 1
        before = run[list(AT_TARGET)].iloc[i - 1].to_numpy(float)
        at = before + (loss[i - 1] - target) / (loss[i - 1] - loss[i]) * (at - before)
    return {"reached": True, **dict(zip(AT_TARGET, at.tolist()))}


def time_to_target(curves: pd.DataFrame, target: float, interpolate: bool = False) -> pd.DataFrame:
    """Per run: step, images, training seconds, energy and CO2 at the first validation point
    with val_loss <= target (a tie with the target counts as reached, at its first point).

    No interpolation by default: the clock and meters are only read at validation points, so
    the first point at or below the target is what was measured (protocol rule 1); runs are
    scored on a grid of eval_every steps and the result is an upper bound. `interpolate=True`
    instead interpolates every quantity linearly in val_loss between that point and the one
    before. Not reached, or diverged before reaching: inf in every quantity, reached False.
    """
    rows = [{**dict(zip(RUN_KEYS, run[RUN_KEYS].iloc[0])), "target": target,
             **_at_target(run, target, interpolate)}
            for _, run in curves.sort_values("step").groupby(["run_id", "seed"], sort=True)]
    return pd.DataFrame(rows, columns=[*RUN_KEYS, "target", "reached", *AT_TARGET])


def times_to_targets(curves: pd.DataFrame, baseline: str = BASELINE,
                     relax: Sequence[float] = RELAXED, interpolate: bool = False) -> pd.DataFrame:
    """`time_to_target` for the strict and each relaxed target, stacked with a `relax` column."""
    targets = relaxed_targets(target_loss(curves, baseline), relax)
    return pd.concat([time_to_target(curves, t, interpolate).assign(relax=r)
                      for r, t in targets.items()], ignore_index=True)


# ----------------------------------------------------------------------------- FLOPs

def dbp_extra_macs_parts(layer_shapes: Iterable[tuple[int, int]], tokens: int,
                         sample_frac: float, every: int, fused: bool) -> dict[str, float]:
    """DBP's extra multiply-accumulates per training step, split as the benchmark times
    them (fwd, bwd, stats, update), for layers of (out, d) = (output width, input width)
    that each see `tokens` rows per step.

    Fused: A = W R in the forward and the gradient dL/dA R^T in the backward (out d^2
    each). Unfused: R x for every token and its backward (tokens d^2 each). Statistics on
    the n_sub = max(1, round(f tokens)) sampled rows every `every` steps: z = x R^T (fused
    only; unfused reuses z) and Z^T Z (n_sub d^2 each). Update C R (d^3) every `every`
    steps. Mirrors dbp.layers, which samples the same n_sub.
    """
    n_sub = max(1, round(sample_frac * tokens))
    parts = {"fwd": 0.0, "bwd": 0.0, "stats": 0.0, "update": 0.0}
    for out, d in layer_shapes:
        rows = out if fused else tokens
        parts["fwd"] += rows * d**2
        parts["bwd"] += rows * d**2
        parts["stats"] += (2 if fused else 1) * n_sub * d**2 / every
        parts["update"] += d**3 / every
    return parts


def dbp_extra_macs(layer_shapes: Iterable[tuple[int, int]], tokens: int, sample_frac: float,
                   every: int, fused: bool) -> float:
    """Total of `dbp_extra_macs_parts`."""
    return sum(dbp_extra_macs_parts(layer_shapes, tokens, sample_frac, every, fused).values())


def add_flops(ttt: pd.DataFrame, bp_macs_per_step: float | Mapping[str, float],
              extra_macs_per_step: Mapping[str, float]) -> pd.DataFrame:
    """`ttt` with `flops` to target = 2 x (BP MACs + the run's extra MACs) per step x steps.

    Both MAC counts may be keyed by run_id, else by arm (BP MACs may also be one number, when
    every run trains the same model on the same batch). BP-arm runs may be absent from the
    extra MACs (no extra work); any other missing run is an error, not a silent undercount.
    """
    def per_step(run_id: str, arm: str) -> float:
        extra = _lookup(extra_macs_per_step, run_id, arm, 0.0 if arm == BASELINE else None)
        return _lookup(bp_macs_per_step, run_id, arm) + extra
    macs = [per_step(r, a) for r, a in zip(ttt["run_id"], ttt["arm"])]
    return ttt.assign(flops=2.0 * np.asarray(macs, float) * ttt["step"].to_numpy(float))


def _lookup(values: float | Mapping[str, float], run_id: str, arm: str,
            default: float | None = None) -> float:
    if not isinstance(values, Mapping):
        return float(values)
    for key in (run_id, arm):
        if key in values:
            return float(values[key])
    if default is None:
        raise KeyError(f"no MACs per step given for run {run_id!r} (arm {arm!r})")
    return default


# ----------------------------------------------------------------------------- statistics

def _one_target(ttt: pd.DataFrame) -> pd.DataFrame:
    """Guard: per-run tables must hold one target (filter `times_to_targets` on `relax`)."""
    if ttt.duplicated(["run_id", "seed"]).any():
        raise ValueError("time-to-target table holds several targets per run: filter on 'relax'")
    return ttt


def bootstrap_ci(values: Sequence[float], stat: Callable = np.median, n_boot: int = 10_000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over seeds (resampled with replacement).

    Bounds are order statistics of the resampled statistics (no interpolation), so inf
    values (not reached) stay meaningful. One value gives the degenerate interval (x, x);
    none gives (nan, nan).
    """
    x = np.asarray(values, float)
    if x.size < 2:
        return (float(x[0]), float(x[0])) if x.size else (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, x.size, (n_boot, x.size))
    boot = stat(x[idx], axis=1)
    alpha = (1.0 - level) / 2
    return (float(np.quantile(boot, alpha, method="lower")),
            float(np.quantile(boot, 1.0 - alpha, method="higher")))


def paired_test(diffs: Sequence[float]) -> tuple[str, float]:
    """Two-sided paired test that per-seed differences centre on zero: (test name, p).

    Zero and NaN differences (ties, or both runs not reached) are dropped. With n >= 5
    remaining pairs: Wilcoxon signed-rank (scipy; exact for small n without ties). It uses
    only ranks of |d| and signs, so +-inf (one side not reached) is replaced by a finite value
    beyond every finite |d| without changing the test. With n < 5, an exact sign test
    (binomial, p = 1/2): no signed-rank or permutation test can reach p < 0.05 there
    anyway, and it needs no magnitudes. No pairs left: ("none", 1.0).
    """
    d = np.asarray(diffs, float)
    d = d[~np.isnan(d) & (d != 0)]
    if d.size == 0:
        return "none", 1.0
    if d.size < 5:
        return "sign", float(stats.binomtest(int((d > 0).sum()), d.size).pvalue)
    finite = np.abs(d[np.isfinite(d)])
    big = 2.0 * (finite.max() if finite.size else 1.0) + 1.0
    return "wilcoxon", float(stats.wilcoxon(np.where(np.isinf(d), np.sign(d) * big, d)).pvalue)


def paired(ttt: pd.DataFrame, run_id: str, metric: str = "train_seconds",
           baseline: str = BASELINE) -> pd.DataFrame:
    """Per seed run by both: the baseline's and the run's cost to target, speed-up
    base / run and reduction 1 - run / base (inf-aware: run not reached -> speed-up 0,
    reduction -inf; baseline not reached -> inf and 1; neither -> NaN, undefined)."""
    _one_target(ttt)

    def costs(rid: str) -> pd.Series:
        return ttt[ttt["run_id"] == rid].set_index("seed")[metric].astype(float)
    df = pd.concat({"base": costs(baseline), "value": costs(run_id)}, axis=1, join="inner")
    with np.errstate(divide="ignore", invalid="ignore"):
        df["speedup"] = df["base"] / df["value"]
        df["reduction"] = 1.0 - df["value"] / df["base"]
    return df.rename_axis("seed").reset_index()


def summarize_paired(pairs: pd.DataFrame, n_boot: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """Aggregate of `paired`: speed-up = median over seeds of per-seed speed-ups with a
    bootstrap interval; reduction = 1 - 1/speed-up (bounds mapped the same way, so both
    tell one story); mean and spread of the per-seed values; the paired test on
    log(base / run). Undefined pairs (neither reached) are counted in n_undefined."""
    ok = pairs.dropna(subset=["speedup"])
    s = ok["speedup"].to_numpy(float)
    lo, hi = bootstrap_ci(s, np.median, n_boot, level, seed)
    med = float(np.median(s)) if s.size else math.nan
    with np.errstate(divide="ignore"):
        test, p = paired_test(np.log(s))
    return {"n_seeds": len(pairs), "n_undefined": len(pairs) - len(ok),
            "n_not_reached": int(np.isinf(pairs["value"]).sum()),
            "n_base_not_reached": int(np.isinf(pairs["base"]).sum()),
            "speedup": med, "speedup_lo": lo, "speedup_hi": hi,
            "speedup_mean": float(s.mean()) if s.size else math.nan,
            "speedup_min": float(s.min()) if s.size else math.nan,
            "speedup_max": float(s.max()) if s.size else math.nan,
            "reduction": _reduction(med), "reduction_lo": _reduction(lo),
            "reduction_hi": _reduction(hi),
            "reduction_mean": float(ok["reduction"].mean()) if s.size else math.nan,
            "ci_degenerate": s.size < 2, "test": test, "p_value": p}


def _reduction(speedup: float) -> float:
    """1 - 1/speed-up, with 0 (never reached) -> -inf."""
    return -math.inf if speedup == 0 else 1.0 - 1.0 / speedup


def comparisons(ttt: pd.DataFrame, run_ids: Iterable[str],
                metrics: Sequence[str] = ("train_seconds", "energy_kwh", "co2_kg", "step"),
                baseline: str = BASELINE, n_boot: int = 10_000, level: float = 0.95,
                seed: int = 0) -> pd.DataFrame:
    """`summarize_paired` for every run_id x metric against the baseline, one row each."""
    rows = [{"run_id": r, "metric": m,
             **summarize_paired(paired(ttt, r, m, baseline), n_boot, level, seed)}
            for r in run_ids for m in metrics]
    return pd.DataFrame(rows)


def arm_summary(ttt: pd.DataFrame, metric: str = "train_seconds", n_boot: int = 10_000,
                level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per run_id: seeds, seeds reached, median cost to target over seeds and its interval."""
    rows = []
    for run_id, g in _one_target(ttt).groupby("run_id", sort=False):
        x = g[metric].to_numpy(float)
        lo, hi = bootstrap_ci(x, np.median, n_boot, level, seed)
        rows.append({"run_id": run_id, "arm": g["arm"].iloc[0], "n_seeds": x.size,
                     "n_reached": int(g["reached"].sum()), "median": float(np.median(x)),
                     "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["run_id", "arm", "n_seeds", "n_reached", "median", "lo", "hi"])


# ----------------------------------------------------------------------------- overhead

def step_seconds(curves: pd.DataFrame) -> pd.DataFrame:
    """Per run: median over validation segments of training seconds per step, and median
    images/s (medians resist the odd slow segment; a run with only step 0 gives NaN)."""
    def per_run(run: pd.DataFrame) -> pd.Series:
        ds, dt = run["step"].diff(), run["train_seconds"].diff()
        seg = ds > 0
        return pd.Series({"sec_per_step": (dt[seg] / ds[seg]).median(),
                          "images_per_second": run.loc[run["step"] > 0, "images_per_second"].median()})
    c = curves.sort_values("step")
    out = c.groupby(["run_id", "seed"], sort=True)[["step", "train_seconds", "images_per_second"]]
    return out.apply(per_run).reset_index()


def overhead(curves: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per run_id: median s/step and images/s over seeds, and the step-time ratio to the
    baseline paired by seed (median, min, max over seeds)."""
    per = step_seconds(curves)
    base = per[per["run_id"] == baseline].set_index("seed")["sec_per_step"]
    rows = []
    for run_id, g in per.groupby("run_id", sort=False):
        ratio = (g.set_index("seed")["sec_per_step"] / base).dropna()
        rows.append({"run_id": run_id, "n_seeds": len(g), "sec_per_step": g["sec_per_step"].median(),
                     "ratio": ratio.median(), "ratio_min": ratio.min(), "ratio_max": ratio.max(),
                     "images_per_second": g["images_per_second"].median()})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- fine-tuning

def miou(finetune: pd.DataFrame, baseline: str = BASELINE, n_boot: int = 10_000,
         level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per run_id: mean mIoU over seeds with its bootstrap interval and spread, and the mean
    paired difference to the baseline with its interval and paired test (fractions)."""
    base = finetune[finetune["run_id"] == baseline].set_index("seed")["mIoU"]
    rows = []
    for run_id, g in finetune.groupby("run_id", sort=False):
        diff = (g.set_index("seed")["mIoU"] - base).dropna().to_numpy(float)
        values = g["mIoU"].to_numpy(float)
        test, p = paired_test(diff)
        rows.append({"run_id": run_id, "arm": g["arm"].iloc[0], "n_seeds": len(g),
                     "mIoU": values.mean(), **_interval("mIoU", values, n_boot, level, seed),
                     "mIoU_std": g["mIoU"].std(ddof=1), "mIoU_min": values.min(),
                     "mIoU_max": values.max(),
                     "diff": diff.mean() if diff.size else math.nan,
                     **_interval("diff", diff, n_boot, level, seed),
                     "n_pairs": diff.size, "test": test, "p_value": p})
    return pd.DataFrame(rows)


def _interval(name: str, values: np.ndarray, n_boot: int, level: float, seed: int) -> dict:
    lo, hi = bootstrap_ci(values, np.mean, n_boot, level, seed)
    return {f"{name}_lo": lo, f"{name}_hi": hi}


# ----------------------------------------------------------------------------- equal budget

def equal_budget(curves: pd.DataFrame, finetune: pd.DataFrame | None = None,
                 budget: float | None = None) -> pd.DataFrame:
    """Per run: the last validation point with train_seconds <= `budget`, and its mIoU.

    `budget` defaults to the shortest total training time among finished runs (all runs if
    none finished), so every finished run is scored at an instant it actually reached.
    This reads the same runs at equal wall-clock; it does not re-decay LR schedules to the
    budget (that needs runs planned for it, protocol rule 8). A run diverged within the
    budget keeps its non-finite loss. mIoU is of the full run's fine-tune (NaN if absent).
    """
    summary = run_summary(curves)
    if budget is None:
        done = summary[summary["status"] == "finished"]
        budget = float((done if len(done) else summary)["total_train_seconds"].min())
    within = curves[curves["train_seconds"] <= budget].sort_values("step")
    last = within.groupby(["run_id", "seed"], sort=True).tail(1)
    out = last[[*RUN_KEYS, "step", "train_seconds", "val_loss"]].assign(budget=budget)
    out = with_miou(out, finetune)
    return out.sort_values(["run_id", "seed"]).reset_index(drop=True)


def with_miou(runs: pd.DataFrame, finetune: pd.DataFrame | None) -> pd.DataFrame:
    """`runs` (with run_id, seed) and the mIoU of each run's fine-tune (NaN where none)."""
    ft = finetune if finetune is not None else pd.DataFrame(columns=FINETUNE_COLUMNS)
    ft = ft[["run_id", "seed", "mIoU"]].astype({"seed": "int64", "mIoU": "float64"})
    return runs.merge(ft, on=["run_id", "seed"], how="left")


# ----------------------------------------------------------------------------- sweeps

def sweep_table(curves: pd.DataFrame, ttt: pd.DataFrame) -> pd.DataFrame:
    """One row per sweep point (`ttt` at one target): swept values, seeds, reached and
    diverged counts, median time to target and median final validation loss (a diverged
    run's final loss counts as inf, the worst, rather than being skipped)."""
    summary = run_summary(curves)
    summary = summary[is_sweep(summary)]
    cols = sweep_columns(summary)
    merged = summary.merge(_one_target(ttt)[["run_id", "seed", "reached", "train_seconds"]],
                           on=["run_id", "seed"])
    final = merged["final_val_loss"].where(np.isfinite(merged["final_val_loss"]), math.inf)
    merged = merged.assign(final=final)
    rows = [{"run_id": run_id, "arm": g["arm"].iloc[0], **g[cols].iloc[0].to_dict(),
             "n_seeds": len(g), "n_reached": int(g["reached"].sum()),
             "n_diverged": int((g["status"] == "diverged").sum()),
             "time_to_target": float(g["train_seconds"].median()),
             "final_val_loss": float(g["final"].median())}
            for run_id, g in merged.groupby("run_id", sort=True)]
    return pd.DataFrame(rows, columns=["run_id", "arm", *cols, "n_seeds", "n_reached", "n_diverged",
                                       "time_to_target", "final_val_loss"])
