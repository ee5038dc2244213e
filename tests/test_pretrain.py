"""The pre-training engine on tiny data: outputs, pairing, resume, divergence, bad files."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dbp.config import load_config
from dbp.embedded import make_embedded
from dbp.interrupt import Interrupted
from dbp.learner import Learner
from dbp.pretrain import COLUMNS, RunSpec, learning_rate, pretrain

TIME_COLUMNS = {"train_seconds", "eval_seconds", "checkpoint_seconds", "energy_kwh", "co2_kg",
                "images_per_second", "cpu_seconds", "cpu_util", "load_avg"}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = make_embedded(tmp_path_factory.mktemp("data") / "emb", seed=0, imagenet_per_class=4,
                         imagenet_val_per_class=1, ade_train=2, ade_val=1, image_size=32)
    return root / "imagenet"


def _cfg(imagenet, **over):
    sets = ["data.kind=imagenet", f"data.root={imagenet}", "data.num_workers=0",
            "pretrain.batch_size=8", "pretrain.steps=6", "pretrain.warmup_steps=1",
            "pretrain.eval_every=2", "pretrain.checkpoint_every=2", "energy.enabled=false",
            *[f"{k}={v}" for k, v in over.items()]]
    return load_config(None, sets)


def _run(cfg, arm, out, seed=0, **kw):
    return pretrain(RunSpec.from_study(cfg, arm, seed, out, **kw))


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no evaluation, checkpoint or outputs)."""


def _killed_after(monkeypatch, steps):
    """Make the next run die while taking step `steps` + 1."""
    real, done = Learner.step, []

    def step(self, micro):
        if len(done) == steps:
            raise Killed
        done.append(1)
        return real(self, micro)
    monkeypatch.setattr(Learner, "step", step)


def _rows(out):
    with open(out / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _same_non_time(a, b):
    """Equal rows apart from the timing columns (repr, so that NaN == NaN)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: repr(v) for k, v in x.items() if k not in TIME_COLUMNS} == \
               {k: repr(v) for k, v in y.items() if k not in TIME_COLUMNS}


def test_run_writes_metrics_run_json_and_checkpoints(imagenet, tmp_path):
    info = _run(_cfg(imagenet), "dbp", tmp_path)
    rows = _rows(tmp_path)
    assert list(rows[0]) == COLUMNS
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert rows[0]["train_seconds"] == 0 and rows[-1]["train_seconds"] > rows[1]["train_seconds"] > 0
    assert rows[-1]["images_seen"] == 6 * 8
    assert rows[0]["cpu_seconds"] == 0 and rows[-1]["cpu_seconds"] > rows[1]["cpu_seconds"] > 0
    assert math.isnan(rows[0]["cpu_util"]) and all(r["cpu_util"] > 0 for r in rows[1:])
    assert all(r["load_avg"] >= 0 for r in rows)
    assert all(0.0 < r["val_loss"] < 3.0 for r in rows)
    assert all(0.0 <= r["mean_abs_corr"] <= 1.0 for r in rows)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # it learns
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "finished" and info["status"] == "finished"
    assert run["arm"] == "dbp" and run["seed"] == 0 and len(run["manifest_hash"]) == 64
    assert run["train_images"] == 19 * 4 and run["config"]["pretrain"]["steps"] == 6
    assert {"git_commit", "torch"} <= set(run["provenance"])
    final = torch.load(tmp_path / "final.pt", weights_only=True)  # plain types: loads safely
    assert any(k.endswith(".R") for k in final["state_dict"])
    assert final["arm"] == "dbp" and final["step"] == 6 and final["run_digest"] == run["run_digest"]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["run_digest"] == run["run_digest"]
    assert [r["step"] for r in ckpt["rows"]] == [0, 2, 4, 6]
    assert len((tmp_path / "train_manifest.txt").read_text().split()) == 76


def test_arms_are_paired_identity_equals_bp_exactly(imagenet, tmp_path):
    cfg = _cfg(imagenet)
    for arm, folder in (("bp", "bp"), ("identity", "id"), ("dbp", "dbp")):
        _run(cfg, arm, tmp_path / folder,
             run_info={"run_id": arm, "role": "scored", "tuned": arm != "identity"})
    bp, ident, dbp = (_rows(tmp_path / a) for a in ("bp", "id", "dbp"))
    # eta = 0: W R = W exactly, and DBP's subsampling has its own RNG, so nothing shifts
    assert [r["val_loss"] for r in bp] == [r["val_loss"] for r in ident]
    assert [r["train_loss"] for r in bp][1:] == [r["train_loss"] for r in ident][1:]
    assert bp[0]["val_loss"] == dbp[0]["val_loss"]  # same init, same fixed val masks
    assert bp[-1]["val_loss"] != dbp[-1]["val_loss"]
    # run.json carries what the results side needs, so it never builds a model
    runs = {a: json.loads((tmp_path / a / "run.json").read_text()) for a in ("bp", "id", "dbp")}
    assert runs["bp"]["role"] == "scored" and runs["id"]["tuned"] is False
    assert len({r["run_digest"] for r in runs.values()}) == 3
    assert all(len(r["run_digest"]) == 64 for r in runs.values())
    assert runs["bp"]["macs_per_step"] == runs["dbp"]["macs_per_step"] > 0
    assert runs["bp"]["extra_macs_per_step"] == 0
    assert runs["dbp"]["extra_macs_per_step"] == runs["id"]["extra_macs_per_step"] > 0  # eta = 0 pays too


@pytest.mark.parametrize("arm", ["dbp", "muon"])  # muon: two optimizers, both checkpointed
def test_kill_and_resume_ends_with_the_same_metrics(imagenet, tmp_path, monkeypatch, arm):
    cfg = _cfg(imagenet)
    _run(cfg, arm, tmp_path / "whole")
    with monkeypatch.context() as m, pytest.raises(Killed):
        _killed_after(m, 3)  # dies in step 4, after the step-2 checkpoint
        _run(cfg, arm, tmp_path / "broken")
    assert not (tmp_path / "broken" / "final.pt").exists()
    info = _run(cfg, arm, tmp_path / "broken")
    assert info["resumed_from"] == [2]
    _same_non_time(_rows(tmp_path / "whole"), _rows(tmp_path / "broken"))


def test_resume_refuses_a_malicious_checkpoint_runs_nothing_and_keeps_it(imagenet, tmp_path):
    """Issue 11, fault 8: out/checkpoint.pt is unpickled on resume; one that would run code
    stops the run with an error naming it (it is kept, for inspection), and nothing runs."""
    from test_export import write_malicious

    from dbp._compat import UnsafeCheckpointError
    marker = tmp_path / "pwned"
    evil = write_malicious(tmp_path / "run" / "checkpoint.pt", marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        _run(_cfg(imagenet), "bp", tmp_path / "run")
    assert str(e.value).startswith(f"{evil}: refusing to load this pre-training checkpoint")
    assert not marker.exists() and evil.exists()
    assert not (tmp_path / "run" / "final.pt").exists()


def test_changed_config_starts_over_instead_of_resuming(imagenet, tmp_path, capsys):
    out = tmp_path / "run"
    _run(_cfg(imagenet, **{"pretrain.steps": 4}), "dbp", out)
    cfg = _cfg(imagenet)  # steps 4 -> 6: another schedule, so not a continuation
    info = _run(cfg, "dbp", out)
    printed = capsys.readouterr().out
    assert "was made with a different config (digest" in printed and "starting over" in printed
    assert "resumed_from" not in info
    _run(cfg, "dbp", tmp_path / "fresh")
    _same_non_time(_rows(tmp_path / "fresh"), _rows(out))
    # another arm into the same folder restarts too, rather than failing on the state dicts
    info = _run(_cfg(imagenet, **{"pretrain.steps": 2}), "bp", out)
    assert info["status"] == "finished" and "resumed_from" not in info
    assert not any(k.endswith(".R") for k in torch.load(out / "final.pt", weights_only=False)["state_dict"])
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert _run(_cfg(imagenet, **{"pretrain.steps": 2}), "bp", out)["status"] == "finished"
    assert "checkpoint.pt is unreadable, not a checkpoint or cut short (UnpicklingError): starting over" in capsys.readouterr().out


def test_rerun_at_the_last_step_restores_every_output(imagenet, tmp_path):
    cfg = _cfg(imagenet, **{"pretrain.steps": 4})
    _run(cfg, "dbp", tmp_path)
    metrics = (tmp_path / "metrics.csv").read_text()
    run = json.loads((tmp_path / "run.json").read_text())
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    for name in ("metrics.csv", "run.json", "final.pt"):  # killed after the last checkpoint
        (tmp_path / name).unlink()
    info = _run(cfg, "dbp", tmp_path)
    assert info["resumed_from"] == [4]
    assert (tmp_path / "metrics.csv").read_text() == metrics  # the rows come from the checkpoint
    again = json.loads((tmp_path / "run.json").read_text())
    for key in ("status", "steps_done", "run_digest", "macs_per_step", "extra_macs_per_step",
                "manifest_hash"):
        assert again[key] == run[key]
    restored = torch.load(tmp_path / "final.pt", weights_only=False)
    assert restored["run_digest"] == run["run_digest"]
    assert all(torch.equal(v, restored["state_dict"][k]) for k, v in final["state_dict"].items())


def test_divergence_stops_with_evidence(imagenet, tmp_path):
    info = _run(_cfg(imagenet, **{"pretrain.blr": 1e4}), "bp", tmp_path)
    run = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == run["status"] == "diverged"
    assert run["diverged_at_step"] in (2, 4, 6)
    assert len(_rows(tmp_path)) >= 2 and not (tmp_path / "final.pt").exists()


def test_corrupt_image_fails_early_or_is_skipped(imagenet, tmp_path):
    bad_root = tmp_path / "imagenet"
    import shutil
    shutil.copytree(imagenet, bad_root)
    victim = sorted((bad_root / "train").rglob("*.JPEG"))[3]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=victim.name):
        _run(_cfg(bad_root), "bp", tmp_path / "raise")
    assert not (tmp_path / "raise" / "metrics.csv").exists()
    info = _run(_cfg(bad_root, **{"data.on_error": "skip", "pretrain.steps": 10}), "bp",
                tmp_path / "skip")  # 10 steps x 8 > 76 images: every file is read
    assert info["status"] == "finished" and info["skipped_images"] == 1


def test_learning_rate_schedule():
    assert learning_rate(0, 1.0, 10, 100, 0.0) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, 10, 100, 0.0) == pytest.approx(1.0)
    assert learning_rate(55, 1.0, 10, 100, 0.0) == pytest.approx(0.5)
    assert learning_rate(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


def test_pretraining_imports_no_segmentation_stack():
    """A pre-training job loads neither mmcv, mmengine nor mmseg (0.4 s of imports a job); the
    segmentation side brings them, with their shims (dbp._compat.mm_shims)."""
    code = ("import sys\n"
            "import dbp.pretrain, dbp.cli, dbp.stepcost\n"
            "assert not {'mmcv', 'mmengine', 'mmseg'} & set(sys.modules), sorted(sys.modules)\n"
            "import dbp.segment\n"
            "assert 'mmcv._ext' in sys.modules and 'mmseg' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _study_sets(imagenet):
    """A one-seed study (tuning pinned) with a ladder at 0.5x: runs dbp and dbp__steps=3."""
    return [f"--set={s}" for s in ("data.kind=imagenet", f"data.root={imagenet}", "pretrain.batch_size=8",
                                   "pretrain.steps=6", "pretrain.warmup_steps=2", "pretrain.eval_every=2",
                                   "pretrain.checkpoint_every=2", "energy.enabled=false", "tuning.enabled=false",
                                   "seeds.scored=[0]", "budgets.scales=[0.5]", "budgets.seeds=1",
                                   "finetune.seeds=1", "probe.seeds=1", "arms=[bp,dbp]")]


def test_pretrain_runs_runs_a_ladder_in_one_process_as_separate_runs_would(imagenet, tmp_path, capsys):
    from dbp.cli import main
    main(["pretrain-runs", *_study_sets(imagenet), "--seed", "0", "--results", str(tmp_path), "dbp", "dbp__steps=3"])
    out = capsys.readouterr().out
    assert "run 1 of 2: dbp/seed0 (scored)" in out and "run 2 of 2: dbp__steps=3/seed0 (scored)" in out
    short = tmp_path / "pretrain" / "dbp__steps=3" / "seed0"
    info = json.loads((short / "run.json").read_text())
    assert info["run_id"] == "dbp__steps=3" and info["role"] == "scored" and info["steps_done"] == 3
    assert info["sweep"] == {"pretrain.steps": 3, "pretrain.warmup_steps": 1}
    # the same run alone, in a fresh call: the same numbers (nothing leaks between the runs)
    alone = _cfg(imagenet, **{"pretrain.steps": 3, "pretrain.warmup_steps": 1, "tuning.enabled": "false"})
    _run(alone, "dbp", tmp_path / "alone")
    _same_non_time(_rows(short), _rows(tmp_path / "alone"))
    assert json.loads((tmp_path / "pretrain" / "dbp" / "seed0" / "run.json").read_text())["steps_done"] == 6


@pytest.mark.parametrize("args,message", [
    (["dpb"], "run 'dpb' is not a run of study 'default' (its runs: bp, bp__equal_compute_dbp, bp__steps=3, dbp, dbp__steps=3)"),
    (["dbp__steps=3", "--seed", "7"], "run 'dbp__steps=3' has no seed 7 (its seeds: [0])"),
    (["dbp", "--set", "tuning.enabled=true"], "run 'dbp' reads the tuning winners: give --tuned (selected.json)"),
])
def test_pretrain_runs_names_a_bad_run_in_one_line(imagenet, tmp_path, args, message):
    from dbp.cli import main
    argv = ["pretrain-runs", *_study_sets(imagenet), "--results", str(tmp_path), *args]
    if "--seed" not in args:
        argv += ["--seed", "0"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert str(e.value.code) == f"dbp pretrain-runs: config error: {message}"
    assert not (tmp_path / "pretrain").exists()  # checked before any run started


def _signalled_in_step(monkeypatch, step, signum=signal.SIGTERM):
    """Send this process `signum` while it takes step `step` (1-based), as SLURM would."""
    real, done = Learner.step, []

    def stepped(self, micro):
        done.append(1)
        if len(done) == step:
            os.kill(os.getpid(), signum)
        return real(self, micro)
    monkeypatch.setattr(Learner, "step", stepped)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_after_the_step_and_resumes_exactly(imagenet, tmp_path, monkeypatch, signum):
    """Issue 24: SIGTERM ended a run at once, without a checkpoint, run.json left "running".
    Now the step in progress finishes (mid-segment: eval every 2 steps, the signal in step 3),
    the run saves, marks itself interrupted and exits 128 + N; re-run, it ends as an unbroken run."""
    cfg = _cfg(imagenet)
    _run(cfg, "dbp", tmp_path / "whole")
    with monkeypatch.context() as m, pytest.raises(Interrupted) as stop:
        _signalled_in_step(m, 3, signum)
        _run(cfg, "dbp", tmp_path / "cut")
    assert stop.value.code == 128 + signum
    info = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert info["status"] == "interrupted" and info["interrupted_at_step"] == info["steps_done"] == 3
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["partial"]["loss_sum"] > 0
    assert [r["step"] for r in _rows(tmp_path / "cut")] == [0, 2]
    assert signal.getsignal(signum) is not None and not (tmp_path / "cut" / "final.pt").exists()
    info = _run(cfg, "dbp", tmp_path / "cut")
    assert info["status"] == "finished" and info["resumed_from"] == [3]
    _same_non_time(_rows(tmp_path / "whole"), _rows(tmp_path / "cut"))


def test_sigterm_to_the_gpus_wrapper_reaches_the_run_and_a_second_process_is_refused(imagenet, tmp_path):
    """Issue 24: SIGTERM to `dbp gpus` left the training process running on, orphaned; two
    processes on one run folder both wrote. Now the wrapper passes the signal on and waits,
    the run saves and exits 143, and a second process stops at once naming the first's PID.
    The signal goes to every process of the job, loader workers too, as SLURM sends it."""
    out = tmp_path / "run"
    sets = [a for kv in ["data.kind=imagenet", f"data.root={imagenet}", "data.num_workers=1",
                         "pretrain.batch_size=8", "pretrain.steps=2000", "pretrain.eval_every=1000",
                         "energy.enabled=false"] for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "dbp", "gpus", "0", "--", "dbp", "pretrain", *sets, "--arm", "bp",
           "--seed", "0", "--out", str(out)]
    wrapper = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.csv").exists() and time.time() < deadline:  # step 0 evaluated
            time.sleep(0.2)
        time.sleep(1.0)  # a few steps in
        child = int((out / ".lock").read_text())
        second = subprocess.run([sys.executable, "-m", *cmd[6:]], capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and second.stderr.strip().splitlines() == [
            f"dbp pretrain: {out}: another process (PID {child}) is running in this folder; wait for it or stop it"]
        os.killpg(wrapper.pid, signal.SIGTERM)  # the wrapper, the run and its loader worker
        _, err = wrapper.communicate(timeout=120)
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
    assert wrapper.returncode == 143 and "Traceback" not in err, err
    assert f"dbp pretrain: {out}: stopped by SIGTERM, state saved" in err
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # no orphan
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and 0 < info["steps_done"] < 1000
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == info["steps_done"]
