"""The Snakemake study: dry runs list exactly the expected jobs, bad configs stop at start-up,
lint is clean, the schema matches the typed config, and the smoke study runs end to end."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dbp.config import json_schema

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _snakemake(workdir, *args, check=True):
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{out.stdout}\n{out.stderr}")
    return out


def _dry_run_jobs(workdir, *args) -> dict[str, int]:
    """Rule -> job count from a dry run's job-stats table."""
    text = _snakemake(workdir, "-n", *args).stdout
    table = text[text.index("Job stats:"):].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def _config(name):
    return str(REPO / "configs" / name)


def test_default_dry_run(tmp_path):
    jobs = _dry_run_jobs(tmp_path)
    assert jobs == {"all": 1, "study_config": 1, "embedded_data": 1, "subset_manifest": 3,
                    "pretrain": 9, "export": 6, "finetune": 9, "summarize": 1, "figures": 1}


def test_sweep_dry_runs_expand_every_point(tmp_path):
    dbp = _dry_run_jobs(tmp_path, "--configfile", _config("default.yaml"), _config("sweep_dbp.yaml"))
    assert dbp["pretrain"] == 9 + 3 * 2 * 2 * 3  # base arms + decor_lr x kappa x frac, 3 seeds
    lr = _dry_run_jobs(tmp_path, "--configfile", _config("default.yaml"), _config("sweep_lr.yaml"))
    assert lr["pretrain"] == 9 + 4 * 2 * 3       # 4 trials for each of bp and dbp: fair tuning


def test_paper_dry_run_with_fake_imagenet_and_ade20k(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
    (tmp_path / "ade").mkdir()
    (tmp_path / "ade" / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    paths = tmp_path / "paths.yaml"
    paths.write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "imagenet")},
                                     "finetune": {"root": str(tmp_path / "ade")}}))
    jobs = _dry_run_jobs(tmp_path, "--configfile", _config("paper.yaml"), str(paths))
    assert jobs == {"all": 1, "study_config": 1, "subset_manifest": 3, "pretrain": 9,
                    "export": 6, "finetune": 9, "summarize": 1, "figures": 1}


@pytest.mark.parametrize("override,message", [
    ({"pretrain": {"bach_size": 3}}, "'bach_size' was unexpected"),
    ({"data": {"fraction": 1.5}}, "data.fraction: must be in (0, 1]"),
    ({"pretrain": {"batch_size": "many"}}, "'many' is not of type 'integer'"),
    ({"sweeps": {"x": {"grid": {"dbp.kapa": [1.0]}}}}, "dbp.kapa: unknown key"),
])
def test_bad_config_stops_before_any_job(tmp_path, override, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(override))
    out = _snakemake(tmp_path, "-n", "--configfile", _config("default.yaml"), str(bad), check=False)
    assert out.returncode != 0
    assert message in out.stdout + out.stderr
    assert not (tmp_path / "results").exists()


def test_missing_data_folder_is_named(tmp_path):
    out = _snakemake(tmp_path, "-n", "--configfile", _config("paper.yaml"), check=False)
    assert out.returncode != 0 and "/path/to/imagenet/train does not exist" in out.stdout + out.stderr


def test_lint_is_clean(tmp_path):
    out = _snakemake(tmp_path, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_schema_file_matches_the_typed_config():
    on_disk = yaml.safe_load((REPO / "workflow" / "schemas" / "study.schema.yaml").read_text())
    assert {k: v for k, v in on_disk.items() if not k.startswith("$") and k != "description"} \
        == json_schema(), "regenerate with: dbp config --schema > workflow/schemas/study.schema.yaml"


@pytest.mark.slow
def test_smoke_study_runs_end_to_end_and_is_then_up_to_date(tmp_path):
    _snakemake(tmp_path, "--configfile", _config("smoke.yaml"))
    runs = sorted((tmp_path / "results" / "smoke" / "pretrain").glob("*/seed0/run.json"))
    assert [p.parts[-3] for p in runs] == ["bp", "dbp"]
    for p in runs:
        info = json.loads(p.read_text())
        assert info["status"] == "finished" and info["steps_done"] == 20
    ft = sorted((tmp_path / "results" / "smoke" / "finetune").glob("*/seed0/metrics.json"))
    assert [p.parts[-3] for p in ft] == ["bp", "dbp", "scratch"]
    assert all(0.0 <= json.loads(p.read_text())["mIoU"] <= 1.0 for p in ft)
    headline = (tmp_path / "results" / "smoke" / "headline.md").read_text()
    assert "21.1" in headline and "Wall-clock" in headline
    pngs = sorted(p.name for p in (tmp_path / "paper_figures" / "smoke").glob("*.png"))
    assert {"loss_vs_time.png", "loss_vs_steps.png", "decorrelation.png"} <= set(pngs)
    again = _snakemake(tmp_path, "--configfile", _config("smoke.yaml"))
    assert "Nothing to be done" in again.stdout + again.stderr
    report = _snakemake(tmp_path, "report", "--configfile", _config("smoke.yaml"))
    assert "report" in report.stdout + report.stderr  # re-made from existing results only
