"""The smoke study through snakemake-executor-plugin-slurm on a real SLURM cluster.

Runs where `sinfo` answers (CI, `.ci/run`, starts a single-node cluster before the tests);
skipped elsewhere."""
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
def test_smoke_study_runs_through_slurm(tmp_path):
    cmd = ["timeout", "-k", "30", "900", sys.executable, "-m", "snakemake",
           "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--profile", str(REPO / ".ci" / "slurm-profile"),
           "--slurm-logdir", str(tmp_path / "slurm_logs"),
           "--configfile", str(REPO / "configs" / "smoke.yaml")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    for arm in ("bp", "dbp"):
        assert (tmp_path / "results" / "smoke" / "pretrain" / arm / "seed0" / "final.pt").exists()
    # every pre-training job ran as a SLURM job: the plugin keeps one log per job id
    logs = sorted((tmp_path / "slurm_logs").rglob("*.log"))
    pretrain_logs = [p for p in logs if "rule_pretrain" in p.parts]
    assert len(pretrain_logs) == 9, logs  # smoke: 2 target/scored BP, DBP, 2 budgets, 4 trials
    assert all(p.stem.isdigit() for p in pretrain_logs)  # named by SLURM job id
