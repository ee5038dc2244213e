"""A study's runs turned into the protocol's numbers (docs/protocol.md): roles, the target,
tuning winners, time-to-target, paired statistics, budget curves, overhead and contention.

Pure functions on tidy pandas tables; the loaders are the only I/O, and nothing here
imports torch: the training side writes what this side needs (role, MACs per step, CPU
time, load) into each run's records. Conventions:
- `runs`: one row per pre-training run (run.json); `curves`: one row per validation point.
- A run is (run_id, seed); its role comes from run.json. Only runs with a final status
  (finished, or diverged = a miss) are used; the others are listed by `unfinished`.
- A cost of inf means the run never reached the target: counted, never dropped.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dbp import stats as S

BASELINE = "bp"
RELAXED = (0.0, 0.01, 0.02, 0.05)
FINAL = ("finished", "diverged")
SHARED_UTIL = 0.75  # a segment using less than this share of its threads' CPU was shared
STEPCOST = Path("stepcost") / "rounds.csv"  # the side-by-side step times (dbp.stepcost)
DISTURBED = 1.5  # a step-cost turn this much slower than its arm's median disturbed its round
SWEEP = "sweep."  # prefix of the flattened override columns, e.g. "sweep.pretrain.blr"
PERTURB = SWEEP + "pretrain.perturb"  # a tuning trial's numerics replicate (docs/protocol.md rule 5)
REPLICATE_SEP = "__perturb="  # the replicate's run id: its grid point's, then this
REPLICATE_TOLERANCE = 2e-3  # tuning.tolerance's default
# a validation loss this much (relative) above the run's best so far is a spike: the stable BP
# trials of the default study rise by up to ~5 % early on, an unstable one by 12 %, DBP seed 5 by 50 %
SPIKE_RISE = 0.10
METRICS = ["step", "train_seconds", "val_loss", "energy_kwh", "co2_kg", "images_per_second"]
OPTIONAL = ["cpu_seconds", "cpu_util", "load_avg", "measured_kwh", "mean_abs_corr", "decor_loss",
            "eval_seconds"]
RUN_KEYS = ["run_id", "arm", "seed", "role", "status"]
COSTS = {"seconds": "wall-clock (steps x step time)", "train_seconds": "wall-clock (measured)",
         "cpu_seconds": "CPU time", "step": "steps", "flops": "FLOPs", "energy_kwh": "energy",
         "sustained_seconds": "wall-clock, sustained crossing (steps x step time)"}
FINETUNE_METRICS = ["mIoU", "mAcc", "aAcc", "iterations", "train_seconds", "energy_kwh", "co2_kg"]
PROBE_METRICS = ["mIoU", "aAcc", "heads", "features", "seconds"]
IOU = "iou."


# ----------------------------------------------------------------------------- loading

def _seed_dirs(root: Path) -> list[tuple[str, int, Path]]:
    """(run_id, seed, folder) of every <run_id>/seed<s> folder under `root`, sorted."""
    found = [(d.parent.name, int(m.group(1)), d) for d in root.glob("*/seed*")
             if d.is_dir() and (m := re.fullmatch(r"seed(\d+)", d.name))]
    return sorted(found, key=lambda t: t[:2])


def read_json(path: Path, keys: Iterable[str], seed: int | None = None) -> dict:
    """The JSON object at `path`, checked for `keys` and (given) for the seed of its folder."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if seed is not None and obj.get("seed", seed) != seed:
        raise ValueError(f"{path}: seed {obj['seed']} but folder seed{seed}")
    return obj


def read_whole_csv(path: Path) -> pd.DataFrame:
    """A CSV record, checked whole before it is read: it ends with a newline and every line has
    the header's number of fields, so a file cut inside a row (a killed writer, a full disk, a
    partial copy) is named in one line instead of read as a shorter valid record."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from e
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or not text.endswith("\n"):
        raise ValueError(f"{path}: truncated (no header, or the last row is cut off)")
    short = [i + 1 for i, row in enumerate(rows) if len(row) != len(rows[0])]
    if short:
        raise ValueError(f"{path}: truncated or malformed: row {short[0]} has "
                         f"{len(rows[short[0] - 1])} fields, the header {len(rows[0])}")
    try:
        return pd.read_csv(io.StringIO(text))
    except ValueError as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from e


def _read_metrics_csv(path: Path) -> pd.DataFrame:
    df = read_whole_csv(path)
    missing = [c for c in METRICS if c not in df.columns]
    if missing or df.empty:
        raise ValueError(f"{path}: {'missing columns ' + str(missing) if missing else 'no rows'}")
    cols = METRICS + [c for c in OPTIONAL if c in df.columns]
    bad = [c for c in cols if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise ValueError(f"{path}: non-numeric columns {bad}")
    if not df["step"].is_monotonic_increasing:
        raise ValueError(f"{path}: steps not increasing")
    return df.reindex(columns=METRICS + OPTIONAL)


def _energy_kind(energy: dict) -> str:
    """"measured" only when the energy came from a hardware counter (docs/protocol.md rule
    10: the GPUs' NVML counters, column measured_kwh, or codecarbon reading RAPL for
    everything); codecarbon's TDP x load estimate, RAM model or a fallback are "modelled"."""
    if energy.get("measured_method"):
        return "measured"
    method = energy.get("method", "")
    if method in ("", "disabled"):
        return "none"
    return "modelled" if any(w in method for w in ("estimated", "fallback", "none detected")) \
        else "measured"


def load_runs(results_dir: str | Path) -> pd.DataFrame:
    """One row per pre-training run under `results_dir`/pretrain (from run.json)."""
    rows = []
    for run_id, seed, d in _seed_dirs(Path(results_dir) / "pretrain"):
        info = read_json(d / "run.json", ["arm", "seed", "status"], seed)
        prov, cfg = info.get("provenance", {}), info.get("config") or {}
        rows.append({
            "run_id": run_id, "arm": info["arm"], "seed": seed, "role": info.get("role", "adhoc"),
            "status": info["status"], "planned_steps": (cfg.get("pretrain") or {}).get("steps"),
            "threads": prov.get("torch_threads", 1), "cpu_model": prov.get("cpu_model", ""),
            "gpu_names": "; ".join(prov.get("gpu_names", [])),
            "macs_per_step": info.get("macs_per_step", math.nan),
            "extra_macs_per_step": info.get("extra_macs_per_step", math.nan),
            "energy_kind": _energy_kind(info.get("energy") or {}),
            "tuned": json.dumps(info.get("tuned") or {}, sort_keys=True),
            **{SWEEP + k: _number(v) for k, v in (info.get("sweep") or {}).items()}})
    base = [*RUN_KEYS, "planned_steps", "threads", "cpu_model", "gpu_names", "macs_per_step",
            "extra_macs_per_step", "energy_kind", "tuned"]
    df = pd.DataFrame(rows, columns=base + sorted({k for r in rows for k in r} - set(base)))
    return df


def load_pretrain(results_dir: str | Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """All validation points of a study's pre-training runs, one row each, with run keys."""
    runs = load_runs(results_dir) if runs is None else runs
    frames = [_read_metrics_csv(Path(results_dir) / "pretrain" / r.run_id / f"seed{r.seed}" /
                                "metrics.csv").assign(**{k: getattr(r, k) for k in RUN_KEYS})
              for r in runs.itertuples()]
    if not frames:
        return pd.DataFrame(columns=RUN_KEYS + METRICS + OPTIONAL)
    return pd.concat(frames, ignore_index=True)[RUN_KEYS + METRICS + OPTIONAL]


def _load_downstream(results_dir: str | Path, stage: str, metrics: list[str]) -> pd.DataFrame:
    """One row per run of a downstream stage (its metrics.json under <stage>/<encoder>/seed<s>),
    per-class IoU as `iou.<class>` columns; `run_id` names the encoder (arm, equal-compute run
    or scratch), `arm` the method that trained it."""
    rows = []
    for run_id, seed, d in _seed_dirs(Path(results_dir) / stage):
        m = read_json(d / "metrics.json", [*metrics, "per_class_iou"], seed)
        rows.append({"run_id": run_id, "arm": m.get("arm", run_id.split("__")[0]), "seed": seed,
                     **{k: m[k] for k in metrics},
                     **{IOU + k: v for k, v in m["per_class_iou"].items()}})
    cols = ["run_id", "arm", "seed", *metrics]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=cols)


def load_finetune(results_dir: str | Path) -> pd.DataFrame:
    """One row per fine-tune run (UperNet, dbp.segment)."""
    return _load_downstream(results_dir, "finetune", FINETUNE_METRICS)


def load_probe(results_dir: str | Path) -> pd.DataFrame:
    """One row per linear-probe run (frozen encoder, dbp.seg_probe)."""
    return _load_downstream(results_dir, "probe", PROBE_METRICS)


def _number(value):
    """An override value as a number where it is one (the CLI records `--set` values as text)."""
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


def unfinished(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs without a final status: never scored, listed in the report."""
    return runs[~runs["status"].isin(FINAL)][RUN_KEYS]


def final(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"].isin(FINAL)]


# ----------------------------------------------------------------------------- per run

def run_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per run: best and final validation loss, training seconds and steps. The
    final loss of a diverged run is its non-finite last point (never mistaken for a good one)."""
    c = curves.sort_values(["run_id", "seed", "step"])
    g = c.groupby(["run_id", "seed"], sort=True)
    last = g.tail(1).reset_index(drop=True)
    out = last[RUN_KEYS].copy()
    out["best_val_loss"] = g["val_loss"].min().to_numpy()
    out["final_val_loss"] = last["val_loss"].to_numpy()
    out["total_train_seconds"] = last["train_seconds"].to_numpy()
    out["total_cpu_seconds"] = last["cpu_seconds"].to_numpy()
    out["steps"] = last["step"].to_numpy()
    out["energy_kwh"] = last["energy_kwh"].to_numpy()
    out["measured_kwh"] = last["measured_kwh"].to_numpy()
    return out


# ----------------------------------------------------------------------------- target

def target_loss(curves: pd.DataFrame, baseline: str = BASELINE) -> tuple[float, int]:
    """(target, n runs): the median over the baseline's finished target-setting runs of each
    run's best validation loss (rule 1). Scored runs never enter it."""
    s = run_summary(curves)
    bests = s[(s["role"] == "target") & (s["arm"] == baseline) & s["status"].isin(FINAL)]
    bests = bests["best_val_loss"].dropna()
    if bests.empty:
        raise ValueError(f"no finished {baseline!r} target-setting runs (role 'target'): "
                         "the target is undefined")
    return float(bests.median()), int(bests.size)


def relaxed_targets(target: float, relax: Sequence[float] = RELAXED) -> dict[float, float]:
    """{relaxation r: target x (1 + r)}; r = 0 is the strict target."""
    return {r: target * (1.0 + r) for r in relax}


# ----------------------------------------------------------------------------- tuning

def trials(runs: pd.DataFrame, curves: pd.DataFrame, role: str = "tuning") -> pd.DataFrame:
    """One row per trial run (arm x grid point x seed, and its numerics replicate): the grid
    point it belongs to (`point`: the run id without the replicate's nudge), `replicate`,
    final validation loss (a diverged or unfinished trial: inf, it can never win) and its
    spikes (stats.spikes at SPIKE_RISE)."""
    t = runs[runs["role"] == role]
    cols = ["run_id", "point", "arm", "seed", "replicate", "final_val_loss", "spikes", "worst_spike"]
    if t.empty:
        return pd.DataFrame(columns=cols + sweep_columns(t))
    c = curves[curves["role"] == role].sort_values("step")
    by = {k: g["val_loss"].to_numpy(float) for k, g in c.groupby(["run_id", "seed"])}
    replicate = t[PERTURB].notna() if PERTURB in t else pd.Series(False, index=t.index)
    rows = []
    for r, rep in zip(t.itertuples(), replicate):
        loss = by.get((r.run_id, r.seed), np.array([math.nan]))
        n, worst = S.spikes(loss, SPIKE_RISE)
        rows.append({"run_id": r.run_id, "point": r.run_id.split(REPLICATE_SEP)[0], "arm": r.arm,
                     "seed": r.seed, "replicate": bool(rep),
                     "final_val_loss": loss[-1] if r.status == "finished" and np.isfinite(loss[-1]) else math.inf,
                     "spikes": n, "worst_spike": worst})
    keys = [k for k in sweep_columns(t) if k != PERTURB]
    return pd.DataFrame(rows, columns=cols).merge(t[["run_id", "seed", *keys]], on=["run_id", "seed"])


def tuning_table(runs: pd.DataFrame, curves: pd.DataFrame, role: str = "tuning",
                 tolerance: float = REPLICATE_TOLERANCE) -> pd.DataFrame:
    """One row per arm and grid point (rule 5): seeds, trials, mean final validation loss over
    every trial, the spread of the per-seed losses, the largest relative gap between a trial
    and its numerics replicate, spikes, and `stable`: no trial diverged or spiked and every
    replicate gap is within `tolerance`."""
    t = trials(runs, curves, role)
    keys = sweep_columns(t)
    if t.empty:
        return pd.DataFrame(columns=["run_id", "arm", *keys, "n_seeds", "n_trials", "final_val_loss",
                                     "seed_spread", "replicate_gap", "spikes", "worst_spike", "stable"])
    rows = []
    for (point, arm), g in t.groupby(["point", "arm"], sort=True):
        per_seed = g.groupby("seed")["final_val_loss"]
        with np.errstate(invalid="ignore"):
            gap = (per_seed.max() - per_seed.min()) / per_seed.min()
        gap = float(gap[g.groupby("seed").size() > 1].max()) if g["replicate"].any() else math.nan
        means = per_seed.mean()
        finite = bool(np.isfinite(g["final_val_loss"]).all())
        rows.append({"run_id": point, "arm": arm, **{k: g[k].iloc[0] for k in keys},
                     "n_seeds": int(g["seed"].nunique()), "n_trials": len(g),
                     "final_val_loss": float(g["final_val_loss"].mean()),
                     "seed_spread": float(means.max() - means.min()) if finite else math.inf,
                     "replicate_gap": gap if finite else math.inf, "spikes": int(g["spikes"].sum()),
                     "worst_spike": float(g["worst_spike"].max()),
                     "stable": finite and not g["spikes"].any() and not gap > tolerance})
    return pd.DataFrame(rows)


def choose(points: pd.DataFrame, tolerance: float = REPLICATE_TOLERANCE) -> dict:
    """An arm's winner among its grid points (one `tuning_table` row each, in grid order):
    the lowest mean final loss among the stable points (none stable: among all, flagged);
    a point within `tolerance` (relative) of it that comes earlier in the grid wins instead,
    so a tie inside floating-point noise cannot flip with the machine. Beside it: the margin
    to the runner-up among the same points, whether that margin lies within the winner's
    seed spread, and the lowest mean of an unstable point when it undercuts the winner."""
    pool = points[points["stable"]] if points["stable"].any() else points
    best = float(pool["final_val_loss"].min())
    win = pool[pool["final_val_loss"] <= best * (1 + tolerance)].iloc[0]
    rest = pool.loc[pool.index != win.name, "final_val_loss"]
    margin = float(rest.min() - win["final_val_loss"]) if len(rest) else math.inf
    unstable = points.loc[~points["stable"], "final_val_loss"]
    lower = unstable[unstable < win["final_val_loss"]]
    return {"run_id": win["run_id"], "final_val_loss": float(win["final_val_loss"]),
            "stable": bool(win["stable"]), "margin": margin, "seed_spread": float(win["seed_spread"]),
            "within_spread": bool(margin < win["seed_spread"]),
            "replicate_gap": float(win["replicate_gap"]),
            "unstable_lower": float(lower.min()) if len(lower) and points["stable"].any() else None}


def grid_order(table: pd.DataFrame, arm: str, keys: Sequence[str]) -> pd.DataFrame:
    """An arm's rows of `tuning_table`, in grid order (the order `choose` breaks ties by)."""
    return table[table["arm"] == arm].sort_values([SWEEP + k for k in keys])


def select_tuned(results_dir: str | Path, arms: Sequence[str], keys: Sequence[str],
                 seeds: Sequence[int], controls: dict[str, str],
                 tolerance: float = REPLICATE_TOLERANCE, trials: Sequence[str] | None = None) -> dict:
    """Each arm's winning grid point (`choose`: rule 5) among the study's `trials` (run ids;
    None: every tuning run found, e.g. a grid point left from an earlier grid). Controls copy
    the winner of the arm they control. Every trial of every arm must be present and final."""
    runs = load_runs(results_dir)
    runs = runs[(runs["role"] == "tuning") & (runs["run_id"].isin(trials) if trials is not None else True)]
    table = tuning_table(runs, load_pretrain(results_dir, runs), tolerance=tolerance)
    chosen: dict[str, dict] = {}
    for arm in arms:
        mine = runs[runs["arm"] == arm]
        missing = sorted(set(seeds) - set(mine["seed"]))
        if mine.empty or missing:
            raise ValueError(f"{results_dir}: tuning trials of arm {arm!r} missing for seeds "
                             f"{missing or list(seeds)}")
        open_runs = unfinished(mine)
        if len(open_runs):
            raise ValueError(f"{results_dir}: unfinished tuning trials {open_runs['run_id'].tolist()}")
        c = choose(grid_order(table, arm, keys), tolerance)
        row = table[table["run_id"] == c["run_id"]].iloc[0]
        chosen[arm] = {"values": {k: _plain(row[SWEEP + k]) for k in keys}, **c}
    for control, of in controls.items():
        if of in chosen:
            chosen[control] = {**chosen[of], "from": of}
    return {"arms": chosen, "seeds": list(seeds), "keys": list(keys), "tolerance": tolerance,
            "table": json.loads(table.to_json(orient="records"))}


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


# ----------------------------------------------------------------------------- contention

def segments(curves: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per timed training segment (between validation points): steps, wall and CPU
    seconds, seconds per step, CPU utilisation, load, and `shared` when the process got
    less than SHARED_UTIL of its threads' CPU time (another process used the cores)."""
    c = curves.sort_values(["run_id", "seed", "step"])
    g = c.groupby(["run_id", "seed"], sort=False)
    seg = c.assign(dsteps=g["step"].diff(), dwall=g["train_seconds"].diff(),
                   dcpu=g["cpu_seconds"].diff())
    seg = seg[seg["dsteps"] > 0].merge(runs[["run_id", "seed", "threads"]], on=["run_id", "seed"])
    util = seg["cpu_util"].where(seg["cpu_util"].notna(), seg["dcpu"] / seg["dwall"])
    return seg.assign(sec_per_step=seg["dwall"] / seg["dsteps"], util=util,
                      shared=util < SHARED_UTIL * seg["threads"])[
        [*RUN_KEYS, "step", "dsteps", "dwall", "dcpu", "sec_per_step", "util", "load_avg", "shared"]]


def study_step_seconds(seg: pd.DataFrame) -> pd.Series:
    """Per arm: the median seconds per step over the unshared segments of its scored runs
    (all segments where every one was shared)."""
    s = seg[seg["role"] == "scored"]
    out = {}
    for arm, g in s.groupby("arm"):
        quiet = g[~g["shared"]]
        out[arm] = float((quiet if len(quiet) else g)["sec_per_step"].median())
    return pd.Series(out, dtype=float)


def arm_step_seconds(seg: pd.DataFrame, cost: pd.DataFrame | None = None,
                     baseline: str = BASELINE) -> pd.Series:
    """Per arm: the seconds per step that turn steps into wall-clock. With the side-by-side
    step cost (`round_ratios`): the baseline's study median x the arm's measured ratio, so
    a machine that was slower while one arm's runs were timed cannot fake a speed-up.
    Without it (or for arms it lacks): each arm's own study median."""
    own = study_step_seconds(seg)
    if cost is None or cost.empty or baseline not in own:
        return own
    ratio = cost.set_index("arm")["ratio"].reindex(own.index)
    return (own[baseline] * ratio).fillna(own)


def load_step_cost(results_dir: str | Path) -> pd.DataFrame:
    """The interleaved step-cost records (one row per turn); empty if the study has none."""
    path = Path(results_dir) / STEPCOST
    return read_whole_csv(path) if path.is_file() else pd.DataFrame()


def _kept_turns(rounds: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """The turns of the rounds the ratios use, with seconds and CPU seconds per step, and
    per round whether it was disturbed: one of its turns shared its cores (CPU use below
    SHARED_UTIL x threads) or took DISTURBED x its arm's median. Every round is used when
    fewer than half are undisturbed."""
    r = rounds.assign(sec=rounds["wall_seconds"] / rounds["steps"],
                      cpu=rounds["cpu_seconds"] / rounds["steps"])
    slow = r["sec"] > DISTURBED * r.groupby("arm")["sec"].transform("median")
    shared = r["cpu_seconds"] < SHARED_UTIL * r["threads"] * r["wall_seconds"]
    disturbed = (slow | shared).groupby(r["round"]).any()
    keep = disturbed.index[~disturbed] if (~disturbed).sum() * 2 >= len(disturbed) else disturbed.index
    return r[r["round"].isin(keep)], disturbed


def kept_rounds(rounds: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Seconds per step, one row per round the step-time ratios use (`round_ratios`), one
    column per arm; empty without records."""
    if rounds.empty or baseline not in set(rounds["arm"]):
        return pd.DataFrame()
    return _kept_turns(rounds)[0].pivot(index="round", columns="arm", values="sec")


def round_ratios(rounds: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per arm, from the interleaved records: median seconds per step, and the median over
    rounds of the round's step-time ratio to the baseline (quartiles beside it), wall and
    CPU time. A round is disturbed when one of its turns shared its cores (CPU use below
    SHARED_UTIL x threads) or took DISTURBED x its arm's median; the medians use the
    undisturbed rounds (every round when fewer than half are undisturbed)."""
    if rounds.empty or baseline not in set(rounds["arm"]):
        return pd.DataFrame(columns=["arm", "sec_per_step", "ratio", "ratio_q25", "ratio_q75",
                                     "cpu_ratio", "rounds", "disturbed"])
    r, disturbed = _kept_turns(rounds)
    wide = r.pivot(index="round", columns="arm", values=["sec", "cpu"])
    rows = []
    for arm in r["arm"].unique():
        ratio = wide["sec"][arm] / wide["sec"][baseline]
        rows.append({"arm": arm, "sec_per_step": float(wide["sec"][arm].median()),
                     "ratio": float(ratio.median()), "ratio_q25": float(ratio.quantile(0.25)),
                     "ratio_q75": float(ratio.quantile(0.75)),
                     "cpu_ratio": float((wide["cpu"][arm] / wide["cpu"][baseline]).median()),
                     "rounds": len(disturbed), "disturbed": int(disturbed.sum())})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- time to target

def time_to_target(curves: pd.DataFrame, runs: pd.DataFrame, target: float,
                   step_sec: pd.Series) -> pd.DataFrame:
    """Per final scored run: first and sustained crossing of `target` (rule 7), each as
    steps, measured wall-clock, CPU time, wall-clock at the arm's step time (`arm_step_seconds`)
    (`seconds`), FLOPs and energy. Never reached: inf."""
    meta = runs.set_index(["run_id", "seed"])
    rows = []
    for (run_id, seed), run in curves[curves["role"] == "scored"].sort_values("step").groupby(
            ["run_id", "seed"], sort=True):
        if (run_id, seed) not in meta.index or meta.loc[(run_id, seed), "status"] not in FINAL:
            continue  # unfinished: listed by `unfinished`, never scored
        r = meta.loc[(run_id, seed)]
        energy = "measured_kwh" if r["energy_kind"] == "measured" else "energy_kwh"
        first, sustained = S.crossings(run["val_loss"].to_numpy(float), target)
        row = {**dict(zip(RUN_KEYS, run[RUN_KEYS].iloc[0])), "target": target,
               "planned_steps": r["planned_steps"]}
        for name, i in (("", first), ("sustained_", sustained)):
            row[name + "reached"] = i is not None
            at = run.iloc[i] if i is not None else pd.Series(math.inf, index=run.columns)
            step = float(at["step"])
            row |= {name + "step": step, name + "train_seconds": float(at["train_seconds"]),
                    name + "cpu_seconds": float(at["cpu_seconds"]),
                    name + "energy_kwh": float(at[energy]),
                    name + "seconds": step * step_sec.get(r["arm"], math.nan),
                    name + "flops": 2.0 * (r["macs_per_step"] + r["extra_macs_per_step"]) * step}
        rows.append(row)
    return pd.DataFrame(rows)


def base_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The scored runs of the base budget (run_id = arm), not the budget ladder."""
    return df[df["run_id"] == df["arm"]]


def compare(ttt: pd.DataFrame, arm: str, metric: str, baseline: str = BASELINE,
            level: float = 0.95) -> dict:
    """The paired summary (stats.ratio_summary) of T_baseline / T_arm over seeds."""
    both = _pairs(ttt, arm, metric, baseline, join="inner")
    return {"arm": arm, "metric": metric, **S.ratio_summary(both["base"], both["value"], level)}


def comparisons(ttt: pd.DataFrame, arms: Sequence[str], metrics: Sequence[str] = tuple(COSTS),
                level: float = 0.95) -> pd.DataFrame:
    return pd.DataFrame([compare(ttt, a, m, level=level) for a in arms for m in metrics])


def paired_ratios(ttt: pd.DataFrame, arm: str, metric: str, baseline: str = BASELINE) -> pd.Series:
    """Per seed: T_baseline / T_arm (inf-aware; both missed: NaN)."""
    p = _pairs(ttt, arm, metric, baseline, join="outer")
    with np.errstate(divide="ignore", invalid="ignore"):
        return (p["base"] / p["value"]).rename(arm)


def _pairs(ttt: pd.DataFrame, arm: str, metric: str, baseline: str, join: str) -> pd.DataFrame:
    """The baseline's and the arm's base-budget cost per seed, as columns base and value."""
    b = base_runs(ttt)
    cost = lambda a: b[b["arm"] == a].set_index("seed")[metric]  # noqa: E731
    return pd.concat({"base": cost(baseline), "value": cost(arm)}, axis=1, join=join)


# ----------------------------------------------------------------------------- budgets

def budget_curves(runs: pd.DataFrame, curves: pd.DataFrame, step_sec: pd.Series) -> pd.DataFrame:
    """Per final scored run of every budget: its planned steps, final validation loss (a
    fully decayed schedule) and training time, measured and at the arm's step time."""
    s = run_summary(curves[curves["role"] == "scored"])
    s = s[s["status"].isin(FINAL)].merge(runs[["run_id", "seed", "planned_steps"]], on=["run_id", "seed"])
    return s.assign(seconds=s["planned_steps"] * s["arm"].map(step_sec),
                    final_val_loss=s["final_val_loss"].where(s["status"] == "finished", math.inf))[
        ["run_id", "arm", "seed", "planned_steps", "seconds", "total_train_seconds", "final_val_loss"]]


def equal_time(bc: pd.DataFrame, arm: str, baseline: str = BASELINE) -> pd.DataFrame:
    """At each baseline budget (its time at its step time): the baseline's final loss,
    and the arm's final loss at the same time read off the arm's budget curve (each arm's
    schedule decayed to its own budget; NaN outside the arm's budgets)."""
    rows = []
    for seed, g in bc.groupby("seed", sort=True):
        mine = g[g["arm"] == arm].sort_values("seconds")
        if len(mine) < 2:
            continue
        for r in g[g["arm"] == baseline].sort_values("seconds").itertuples():
            loss = S.value_at(mine["seconds"], mine["final_val_loss"], r.seconds)
            rows.append({"seed": seed, "baseline_steps": r.planned_steps, "seconds": r.seconds,
                         "baseline_loss": r.final_val_loss, "arm_loss": loss,
                         "diff": loss - r.final_val_loss})
    return pd.DataFrame(rows, columns=["seed", "baseline_steps", "seconds", "baseline_loss",
                                       "arm_loss", "diff"])


# ----------------------------------------------------------------------------- overhead

def overhead(seg: pd.DataFrame, runs: pd.DataFrame, curves: pd.DataFrame,
             cost: pd.DataFrame | None = None, baseline: str = BASELINE) -> pd.DataFrame:
    """Per arm (scored runs): the seconds per step the headline uses and its ratio to the
    baseline's (side by side where measured, `cost` = round_ratios), the ratio of the study's
    own medians with per-seed paired ratios (min, max), images/s, CPU utilisation, shared
    segments, and mean power = energy / training time (measured or modelled)."""
    step_sec, own = arm_step_seconds(seg, cost, baseline), study_step_seconds(seg)
    side = (cost if cost is not None and len(cost) else round_ratios(pd.DataFrame())).set_index("arm")
    s = seg[seg["role"] == "scored"]
    per_seed = s[~s["shared"]].groupby(["arm", "seed"])["sec_per_step"].median().unstack(0)
    summary = run_summary(curves[curves["role"] == "scored"])
    kinds = runs[runs["role"] == "scored"].groupby("arm")["energy_kind"].agg(lambda k: "/".join(sorted(set(k))))
    rows = []
    for arm, g in s.groupby("arm", sort=False):
        ratio = (per_seed[arm] / per_seed[baseline]).dropna() if baseline in per_seed else pd.Series()
        e = summary[summary["arm"] == arm]
        energy = "measured_kwh" if kinds.get(arm) == "measured" else "energy_kwh"
        rows.append({"arm": arm, "n_runs": g[["run_id", "seed"]].drop_duplicates().shape[0],
                     "sec_per_step": step_sec[arm], "ratio": step_sec[arm] / step_sec.get(baseline, math.nan),
                     "study_ratio": own[arm] / own.get(baseline, math.nan),
                     "ratio_min": ratio.min(), "ratio_max": ratio.max(),
                     "side_q25": side["ratio_q25"].get(arm, math.nan),
                     "side_q75": side["ratio_q75"].get(arm, math.nan),
                     "cpu_ratio": side["cpu_ratio"].get(arm, math.nan),
                     "images_per_second": float(curves.loc[(curves["arm"] == arm) & (curves["role"] == "scored"),
                                                           "images_per_second"].median()),
                     "cpu_util": float(g["util"].median()), "n_shared": int(g["shared"].sum()),
                     "n_segments": len(g), "watts": 3.6e6 * e[energy].sum() / e["total_train_seconds"].sum(),
                     "energy_kind": kinds.get(arm, "none")})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- fine-tuning

def miou(downstream: pd.DataFrame, arms: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """mIoU per encoder (fine-tunes or probes), and paired differences (points as fractions)
    of each arm against BP, against BP given the arm's wall-clock (its equal-compute run, where
    there is one) and against scratch, over the seeds both have (stats.diff_summary)."""
    from dbp.downstream import equal_compute_id
    by = {a: g.set_index("seed")["mIoU"] for a, g in downstream.groupby("run_id")}
    rows = []
    for arm in arms:
        for ref in (BASELINE, equal_compute_id(arm), "scratch"):
            if arm == ref or arm not in by or ref not in by:
                continue
            d = (by[arm] - by[ref]).dropna()
            rows.append({"arm": arm, "vs": ref, "arm_mean": float(by[arm].mean()),
                         "vs_mean": float(by[ref].mean()), **S.diff_summary(d.to_numpy(float), level)})
    return pd.DataFrame(rows)


def pretrain_seconds(runs: pd.DataFrame, step_sec: pd.Series) -> pd.DataFrame:
    """Per pre-training run of any role: its planned steps x its arm's seconds per step (the
    headline's time basis), what the run's encoder cost to make."""
    return runs.assign(seconds=runs["planned_steps"] * runs["arm"].map(step_sec))[
        ["run_id", "arm", "seed", "role", "planned_steps", "seconds"]]


def per_class_iou(downstream: pd.DataFrame) -> pd.DataFrame:
    """Per encoder and class: the mean IoU over seeds and the number of seeds it is defined on
    (a class absent from labels and predictions is not)."""
    cols = [c for c in downstream.columns if c.startswith(IOU)]
    long = downstream.melt(id_vars=["run_id"], value_vars=cols, var_name="class", value_name="iou")
    long["class"] = long["class"].str.removeprefix(IOU)
    long["iou"] = pd.to_numeric(long["iou"])
    return (long.groupby(["run_id", "class"], sort=False)["iou"].agg(["mean", "count"])
            .rename(columns={"mean": "iou", "count": "n"}).reset_index())
