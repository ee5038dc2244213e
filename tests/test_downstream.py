"""The downstream stage's encoders: which are probed, and the equal-compute BP run whose steps
come from the recorded runs (DBP's run.json and the side-by-side step cost), never the config."""
import json

import pandas as pd
import pytest

from dbp.cli import main
from dbp.config import ConfigError, load_config
from dbp.downstream import (ROLE, downstream_runs, equal_compute_id, equal_compute_steps, probe_arms,
                            probe_seeds, steps_overrides)


def _write_run(root, run_id, seed, steps_done, status="finished", role="scored"):
    d = root / "pretrain" / run_id / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"arm": run_id, "seed": seed, "status": status, "role": role,
                                            "steps_done": steps_done}))


def _write_rounds(root, dbp_seconds):
    """Side-by-side records: BP 0.1 s per step, DBP `dbp_seconds[i]` in round i."""
    rows = [{"round": i, "position": p, "arm": arm, "steps": 1, "wall_seconds": sec,
             "cpu_seconds": 2 * sec, "threads": 2}
            for i, d in enumerate(dbp_seconds) for p, (arm, sec) in enumerate((("bp", 0.1), ("dbp", d)))]
    (root / "stepcost").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "stepcost" / "rounds.csv", index=False)


@pytest.fixture
def cfg():
    return load_config(None, ["seeds.scored=[0,1,2]", "budgets.seeds=3", "finetune.seeds=3", "probe.seeds=2",
                              "pretrain.steps=100",
                              "pretrain.warmup_steps=10"])


def test_equal_compute_steps_come_from_the_recorded_runs(tmp_path, cfg):
    for seed in (0, 1):
        _write_run(tmp_path, "dbp", seed, steps_done=80)  # what the runs recorded, not the config's 100
    _write_rounds(tmp_path, [0.12, 0.125, 0.13, 0.125, 0.125])  # median ratio 1.25
    found = equal_compute_steps(tmp_path, cfg, "dbp")
    assert found["steps"] == 100 and found["of_steps"] == 80 and found["ratio"] == pytest.approx(1.25)
    assert found["warmup_steps"] == 12 and found["run_id"] == "bp__equal_compute_dbp" == equal_compute_id("dbp")
    assert found["seeds"] == [0, 1] and found["arm"] == "bp"


@pytest.mark.parametrize("breakage,match", [
    ("missing", r"seed1/run.json: not a readable pre-training record"),
    ("running", r"seed1/run.json: not a finished scored run \(status running"),
    ("steps", r"trained different steps \[80, 90\]"),
    ("no cost", r"no side-by-side step cost of dbp"),
])
def test_equal_compute_names_what_is_missing(tmp_path, cfg, breakage, match):
    _write_run(tmp_path, "dbp", 0, 80)
    if breakage != "missing":
        _write_run(tmp_path, "dbp", 1, 90 if breakage == "steps" else 80,
                   status="running" if breakage == "running" else "finished")
    if breakage != "no cost":
        _write_rounds(tmp_path, [0.125] * 3)
    with pytest.raises(ValueError, match=match):
        equal_compute_steps(tmp_path, cfg, "dbp")


def test_cli_writes_the_step_count_that_pretrain_reads(tmp_path, cfg, capsys):
    for seed in (0, 1, 2, 3, 4, 5):
        _write_run(tmp_path, "dbp", seed, 120)
    _write_rounds(tmp_path, [0.125] * 3)
    main(["equal-compute", "--set", "pretrain.warmup_steps=12", "--results", str(tmp_path),
          "--arm", "dbp", "--out", str(tmp_path / "ec.json")])
    assert "150 steps (warm-up 15) = dbp's 120 x its step-time ratio 1.250" in capsys.readouterr().out
    assert steps_overrides(tmp_path / "ec.json") == ["pretrain.steps=150", "pretrain.warmup_steps=15"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="bad.json: not a step-count file"):
        steps_overrides(tmp_path / "bad.json")
    with pytest.raises(SystemExit, match="no side-by-side|not a readable"):
        main(["equal-compute", "--results", str(tmp_path / "none"), "--arm", "dbp", "--out", str(tmp_path / "x")])


def test_probed_encoders_and_the_downstream_runs(cfg):
    assert probe_seeds(cfg) == (0, 1)
    assert probe_arms(cfg) == ["bp", "dbp", "bp__equal_compute_dbp", "scratch"]  # not identity (BP's)
    runs = downstream_runs(cfg)
    assert list(runs) == ["bp__equal_compute_dbp"] and runs["bp__equal_compute_dbp"].arm == "bp"
    assert runs["bp__equal_compute_dbp"].seeds == (0, 1) and ROLE not in ("scored", "target", "tuning")
    off = load_config(None, ["probe.enabled=false"])
    assert probe_arms(off) == [] and downstream_runs(off) == {} and probe_seeds(off) == ()
    assert downstream_runs(load_config(None, ["probe.equal_compute=[]"])) == {}
    with pytest.raises(ConfigError, match="probe.equal_compute: BP gets the wall-clock of tuned arms"):
        load_config(None, ["probe.equal_compute=[identity]"])
    with pytest.raises(ConfigError, match=r"probe.blocks: must be distinct blocks of the 4-block encoder, got \[0, 7\]"):
        load_config(None, ["probe.blocks=[0,7]"])
    with pytest.raises(ConfigError, match="probe.seeds: must be <= the 3 scored seeds"):
        load_config(None, ["seeds.scored=[0,1,2]", "budgets.seeds=3", "finetune.seeds=3", "probe.seeds=4"])
