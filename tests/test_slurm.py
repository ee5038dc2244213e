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


@pytest.mark.slow
@pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster (CI starts one)")
def test_a_signalled_slurm_job_saves_and_says_interrupted(tmp_path):
    """SLURM's warning signal (what `--signal=TERM@300` sends before the time limit, here sent
    at once with `scancel --signal=TERM` to the job's steps) reaches the training process
    inside the plugin's srun step: it saves its checkpoint and the job fails with 143, to be
    retried and resumed (Snakemake removes the failed job's declared outputs, run.json and
    metrics.csv; the checkpoint holds both and they are rewritten on resume)."""
    import os
    import signal
    import time
    long = tmp_path / "long.yaml"
    long.write_text("tuning: {enabled: false}\nbudgets: {scales: [], seeds: 0}\nprobe: {equal_compute: []}\n"
                    "pretrain: {steps: 100000, eval_every: 50000, checkpoint_every: 50000}\n")
    run = tmp_path / "results" / "smoke" / "pretrain" / "bp" / "seed100"
    cmd = ["timeout", "-k", "30", "600", sys.executable, "-m", "snakemake",
           str(run.relative_to(tmp_path) / "run.json"),
           "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--profile", str(REPO / ".ci" / "slurm-profile"), "--slurm-logdir", str(tmp_path / "slurm_logs"),
           "--configfile", str(REPO / "configs" / "smoke.yaml"), str(long)]
    output = open(tmp_path / "snakemake.log", "w")  # a file, not a pipe nobody reads while it runs
    snakemake = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while not (run / "metrics.csv").exists() and time.time() < deadline and snakemake.poll() is None:
            time.sleep(1)  # until it trains
        time.sleep(3)
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        assert len(jobs) == 1, jobs
        subprocess.run(["scancel", "--signal=TERM", jobs[0]], check=True)
        snakemake.wait(timeout=300)
    finally:
        if snakemake.poll() is None:
            os.killpg(snakemake.pid, signal.SIGKILL)
        output.close()
    out = (tmp_path / "snakemake.log").read_text()
    log = (tmp_path / "results" / "smoke" / "logs" / "pretrain" / "bp" / "seed100.log").read_text()
    assert snakemake.returncode != 0 and f"{run.relative_to(tmp_path)}: stopped by SIGTERM, state saved" in log, out[-3000:]
    import torch
    assert 0 < torch.load(run / "checkpoint.pt", weights_only=True)["step"] < 50000
