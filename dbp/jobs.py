"""How the workflow packs the study's pre-training runs into jobs (`jobs.group_runs`).

A job runs its runs one after another in one process (`dbp pretrain-runs`), so the start-up
(imports, codecarbon's hardware probe: about 6 s on 2 cores) is paid once a job instead of
once a run. Runs share a job only when they read the same inputs (the tuning winners, the
equal-compute step count), so grouping never changes the DAG's order or what a run computes:
- "scored": every arm's base run and budget ladder on one scored seed, budget by budget,
  the arms side by side (a job per seed: a seed's arms are timed minutes apart);
- "trials": every arm's tuning trials on one tuning seed (a job per seed);
- "target": BP's target-setting runs, every target seed (one job);
- "downstream": the equal-compute BP runs, every probed seed (one job).
Torch-free: the workflow reads it when it parses the DAG.
"""
from __future__ import annotations

from dataclasses import dataclass

from dbp.config import Run, StudyConfig
from dbp.downstream import ROLE as DOWNSTREAM, downstream_runs, probe_seeds


@dataclass(frozen=True)
class Job:
    """Runs `ids` on `seeds`: one job per seed (`per_seed`), or one job for all of them."""
    kind: str
    ids: tuple[str, ...]
    seeds: tuple[int, ...]
    per_seed: bool


def study_runs(cfg: StudyConfig) -> dict[str, Run]:
    """Every pre-training run family of the study, the downstream stage's among them."""
    return {**cfg.runs(), **downstream_runs(cfg)}


def run_role(cfg: StudyConfig, run: Run, seed: int) -> str:
    """A run's role: "downstream" for the equal-compute runs, else by its seed set."""
    return DOWNSTREAM if run.kind == DOWNSTREAM else cfg.role(run, seed)


def grouped_jobs(cfg: StudyConfig) -> list[Job]:
    """The jobs of several runs (empty when `jobs.group_runs` is false); every other run is a
    job of its own. A group of fewer than two runs is left out."""
    if not cfg.jobs.group_runs:
        return []
    runs = study_runs(cfg).values()

    def ids(*kinds: str) -> tuple[str, ...]:
        return tuple(r.run_id for r in runs if r.kind in kinds)
    s = cfg.seeds
    jobs = [Job("scored", ids("base", "budget"), s.scored[:cfg.budgets.seeds], True),
            Job("trials", ids("trial"), s.tuning, True),
            Job("target", tuple(r.run_id for r in runs if set(r.seeds) & set(s.target)), s.target, False),
            Job("downstream", ids(DOWNSTREAM), probe_seeds(cfg), False)]
    return [j for j in jobs if j.seeds and j.ids and len(j.ids) * (1 if j.per_seed else len(j.seeds)) > 1]
