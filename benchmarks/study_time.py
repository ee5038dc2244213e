"""Where a study's wall-clock went, from Snakemake's benchmark records (one TSV per timed job):
jobs and minutes per part, and the wall-clock of the whole run when its Snakemake log is given.

    python benchmarks/study_time.py results/default
    python benchmarks/study_time.py results/default --log .snakemake/log/<run>.snakemake.log

Jobs without a benchmark record (manifests, select, equal-compute, summarize, figures) are the
difference between the wall-clock and the parts. Reads files only: no torch.
"""
from __future__ import annotations

import argparse
import re
from datetime import datetime
from pathlib import Path

import pandas as pd

PARTS = {  # benchmark folder (rule) -> part, in the order a study runs them
    "pretrain_trials": "pre-training: tuning trials (a job per tuning seed)",
    "pretrain_target": "pre-training: BP target-setting runs (one job)",
    "pretrain": "pre-training: runs with a job of their own",
    "pretrain_scored": "pre-training: scored seeds, every arm and budget (a job per seed)",
    "stepcost": "step cost, every arm side by side",
    "pretrain_downstream": "downstream: BP at DBP's wall-clock (one job)",
    "probe": "downstream: exports and linear probes (a job per seed)",
    "finetune": "downstream: exports and UperNet fine-tunes",
}


def job_seconds(results: Path) -> pd.DataFrame:
    """One row per benchmark record: its part and its seconds."""
    rows = []
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = tsv.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
        rows.append({"part": PARTS.get(rule, rule), "job": str(tsv.relative_to(results)),
                     "seconds": float(pd.read_csv(tsv, sep="\t")["s"].iloc[-1])})
    if not rows:
        raise SystemExit(f"study_time: no benchmark records under {results / 'benchmarks'}")
    return pd.DataFrame(rows)


def log_wall_seconds(log: Path) -> float:
    """First to last timestamp of a Snakemake log ([Wed Dec  2 03:01:02 2026] lines)."""
    stamps = [datetime.strptime(" ".join(m.split()), "%a %b %d %H:%M:%S %Y")
              for m in re.findall(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]$", log.read_text(), re.M)]
    if len(stamps) < 2:
        raise SystemExit(f"study_time: {log}: no Snakemake timestamps")
    return (stamps[-1] - stamps[0]).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="results/<study>")
    ap.add_argument("--log", type=Path, help="the run's Snakemake log, for the wall-clock")
    args = ap.parse_args()
    jobs = job_seconds(args.results)
    order = {p: i for i, p in enumerate(PARTS.values())}
    parts = (jobs.groupby("part")["seconds"].agg(["count", "sum"])
             .sort_index(key=lambda idx: idx.map(lambda p: order.get(p, len(order)))))
    print("| part | jobs | minutes |\n|---|---|---|")
    for part, r in parts.iterrows():
        print(f"| {part} | {int(r['count'])} | {r['sum'] / 60:.1f} |")
    total = jobs["seconds"].sum()
    print(f"| timed jobs | {len(jobs)} | {total / 60:.1f} |")
    if args.log:
        wall = log_wall_seconds(args.log)
        print(f"| the rest (untimed jobs, Snakemake) | | {(wall - total) / 60:.1f} |")
        print(f"| study wall-clock | | {wall / 60:.1f} |")


if __name__ == "__main__":
    main()
