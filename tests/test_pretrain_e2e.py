"""End to end through the command line: a real SIGKILL and resume, and DDP with torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from dbp.embedded import make_embedded

pytestmark = pytest.mark.slow
TIMES = ["train_seconds", "eval_seconds", "checkpoint_seconds", "energy_kwh", "co2_kg",
         "images_per_second", "cpu_seconds", "cpu_util", "load_avg"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    root = make_embedded(tmp / "emb", seed=0, imagenet_per_class=8, imagenet_val_per_class=1,
                         ade_train=2, ade_val=1, image_size=32)
    cfg = tmp / "tiny.yaml"
    cfg.write_text(f"""
data: {{kind: imagenet, root: {root / 'imagenet'}, num_workers: 1}}
pretrain: {{batch_size: 8, steps: 40, warmup_steps: 2, eval_every: 5, checkpoint_every: 5}}
energy: {{enabled: false}}
""")
    return cfg


def _cmd(config, out, arm="dbp"):
    return [sys.executable, "-m", "dbp", "pretrain", "--config", str(config), "--arm", arm,
            "--seed", "1", "--out", str(out)]


def test_sigkill_then_rerun_resumes_to_identical_metrics(config, tmp_path):
    subprocess.run(_cmd(config, tmp_path / "whole"), check=True, capture_output=True)
    proc = subprocess.Popen(_cmd(config, tmp_path / "killed"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it train past the checkpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "killed" / "final.pt").exists()
    out = subprocess.run(_cmd(config, tmp_path / "killed"), check=True, capture_output=True, text=True)
    assert "resuming dbp/seed1 from step" in out.stdout
    whole = pd.read_csv(tmp_path / "whole" / "metrics.csv").drop(columns=TIMES)
    killed = pd.read_csv(tmp_path / "killed" / "metrics.csv").drop(columns=TIMES)
    pd.testing.assert_frame_equal(whole, killed, check_exact=True)


@pytest.mark.distributed
def test_torchrun_two_processes_keep_r_identical(config, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29531", "-m", "dbp", *_cmd(config, tmp_path / "ddp")[3:]]
    cmd[cmd.index("--seed") + 1] = "0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
    final = torch.load(tmp_path / "ddp" / "final.pt", weights_only=False)
    metrics = pd.read_csv(tmp_path / "ddp" / "metrics.csv")
    assert metrics["images_seen"].iloc[-1] == 40 * 8 * 2  # global batch = 2 ranks x 8
    assert metrics["val_loss"].iloc[-1] < metrics["val_loss"].iloc[0]
    assert any(k.endswith(".R") for k in final["state_dict"])
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2 and run["r_identical_across_ranks"] is True
