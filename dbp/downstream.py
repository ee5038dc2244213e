"""The downstream stage's encoders: which ones the probe measures, and the equal-compute BP run.

A DBP encoder that beats the BP encoder of the same steps may only have had more compute:
DBP's steps cost more. The equal-compute BP run of an arm (`equal_compute_id`, e.g.
"bp__equal_compute_dbp") trains BP for the wall-clock that the arm's base run used, on the
same seeds (same subset, initial weights, batches), its schedule decayed to that length. Its
step count comes from the records, never from the config: the arm's recorded steps x its
side-by-side step-time ratio to BP (`dbp stepcost`, the headline's time basis). It is a run of
its own rather than a point of the budget ladder: the ladder's budgets are fixed by the config
(0.5x, 1x, 1.5x the base steps), none of them is BP at DBP's wall-clock, and a downstream score
interpolated between two encoders is no encoder's.

Its role is "downstream": paired with the scored seeds but never in the headline, the budget
curves or the step-time medians, which read the "scored" role only. Torch-free; dbp.analysis
(pandas, scipy) is imported only where records are read, so the CLI and the workflow start fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dbp.config import CONTROLS, ConfigError, Run, StudyConfig

BASELINE = "bp"  # the equal-compute runs are BP runs
ROLE = "downstream"
SCRATCH = "scratch"


def probe_seeds(cfg: StudyConfig) -> tuple[int, ...]:
    """The scored seeds whose encoders are probed."""
    return cfg.seeds.scored[:cfg.probe.seeds] if cfg.probe.enabled else ()


def equal_compute_id(arm: str) -> str:
    """The run id of BP trained for `arm`'s wall-clock."""
    return f"{BASELINE}__equal_compute_{arm}"


def downstream_runs(cfg: StudyConfig) -> dict[str, Run]:
    """The pre-training runs only the downstream stage needs (an equal-compute BP run per arm
    of probe.equal_compute, on the probed seeds), by run id."""
    if not cfg.probe.enabled:
        return {}
    runs = (Run(equal_compute_id(a), BASELINE, (), probe_seeds(cfg), kind=ROLE) for a in cfg.probe.equal_compute)
    return {r.run_id: r for r in runs}


def probe_arms(cfg: StudyConfig) -> list[str]:
    """Encoders the probe measures: every pre-trained arm but the controls (identity's encoder
    is BP's, bit for bit), the equal-compute BP runs, and scratch (random init: does
    pre-training help at all?)."""
    if not cfg.probe.enabled:
        return []
    return [a for a in cfg.arms if a not in CONTROLS] + list(downstream_runs(cfg)) + [SCRATCH]


def equal_compute_steps(results_dir: str | Path, cfg: StudyConfig, arm: str) -> dict[str, Any]:
    """BP's steps for `arm`'s wall-clock, from the records under `results_dir`: the steps the
    arm's scored base runs of the probed seeds recorded (run.json) x its side-by-side
    step-time ratio to BP (stepcost/rounds.csv); the warm-up scaled alike, as the budget
    ladder scales it. Reads only those files (other jobs may be writing theirs). Raises
    ValueError naming what is missing."""
    from dbp.analysis import STEPCOST, load_step_cost, round_ratios
    steps = {_recorded_steps(Path(results_dir) / "pretrain" / arm / f"seed{s}" / "run.json")
             for s in probe_seeds(cfg)}
    if len(steps) != 1:
        raise ValueError(f"{results_dir}: the scored {arm} runs trained different steps {sorted(steps)}")
    of_steps = steps.pop()
    cost = round_ratios(load_step_cost(results_dir)).set_index("arm")
    if arm not in cost.index:
        raise ValueError(f"{results_dir}: no side-by-side step cost of {arm} ({STEPCOST})")
    r = cost.loc[arm]
    n = max(1, round(of_steps * r["ratio"]))
    warmup = min(n - 1, round(cfg.pretrain_for(BASELINE).warmup_steps * n / of_steps))
    return {"run_id": equal_compute_id(arm), "arm": BASELINE, "of": arm, "steps": n,
            "warmup_steps": warmup, "of_steps": of_steps, "ratio": float(r["ratio"]),
            "ratio_q25": float(r["ratio_q25"]), "ratio_q75": float(r["ratio_q75"]),
            "rounds": int(r["rounds"]), "disturbed": int(r["disturbed"]), "seeds": list(probe_seeds(cfg))}


def _recorded_steps(run_json: Path) -> int:
    """The steps a finished scored run recorded."""
    try:
        info = json.loads(run_json.read_text())
        ok = info["status"] == "finished" and info["role"] == "scored"
        steps = int(info["steps_done"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{run_json}: not a readable pre-training record ({e!r})") from None
    if not ok:
        raise ValueError(f"{run_json}: not a finished scored run (status {info['status']}, "
                         f"role {info['role']})")
    return steps


def steps_overrides(path: str | Path) -> list[str]:
    """The `--set` overrides (steps, warm-up) of an `equal_compute_steps` file."""
    try:
        found = json.loads(Path(path).read_text())
        return [f"pretrain.steps={int(found['steps'])}",
                f"pretrain.warmup_steps={int(found['warmup_steps'])}"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a step-count file from `dbp equal-compute` ({e!r})") from None
