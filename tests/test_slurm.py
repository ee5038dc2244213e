"""The smoke study's pre-training through snakemake-executor-plugin-slurm on a real SLURM cluster.

Runs where `sinfo` answers (CI, `.ci/run`, starts a single-node cluster before the tests);
skipped elsewhere."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cluster_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster (CI starts one)")
def test_pretraining_runs_through_slurm(tmp_path):
    """The smoke study's pre-training with pinned values, no ladder and no equal-compute BP
    run (3 runs: BP target, BP and DBP scored): every one a SLURM job. The whole DAG runs
    locally in test_workflow."""
    lean = tmp_path / "lean.yaml"
    lean.write_text("tuning: {enabled: false}\nbudgets: {scales: [], seeds: 0}\nprobe: {equal_compute: []}\n")
    cmd = ["timeout", "-k", "30", "600", sys.executable, "-m", "snakemake", "pretrain_all",
           "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--profile", str(REPO / ".ci" / "slurm-profile"),
           "--slurm-logdir", str(tmp_path / "slurm_logs"),
           "--configfile", str(REPO / "configs" / "smoke.yaml"), str(lean)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    runs = {p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())
            for p in (tmp_path / "results" / "smoke" / "pretrain").glob("*/seed*/run.json")}
    assert {r: i["role"] for r, i in runs.items()} == {
        "bp/seed100": "target", "bp/seed0": "scored", "dbp/seed0": "scored"}
    assert all(i["status"] == "finished" and i["steps_done"] == 20 for i in runs.values())
    # every pre-training job ran as a SLURM job: the plugin keeps one log per job id
    logs = sorted((tmp_path / "slurm_logs").rglob("*.log"))
    pretrain_logs = [p for p in logs if "rule_pretrain" in p.parts]
    assert len(pretrain_logs) == 3, logs
    assert all(p.stem.isdigit() for p in pretrain_logs)  # named by SLURM job id
