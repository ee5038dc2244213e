"""The Snakemake study: dry runs list exactly the expected jobs, bad configs stop at start-up,
lint is clean, the schema matches the typed config, and the smoke study runs end to end."""
import json
import re
import shlex
import subprocess
import sys
import zipfile
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
    # runs: BP on 6 scored + 5 target seeds, dbp, identity and cadamw on 6, budget ladder 2
    # scales x 3 arms x 6 seeds, tuning 4 LRs x 3 arms x 2 seeds x 2 (the numerics replicate),
    # BP at DBP's wall-clock on 6. Jobs: a scored seed's 10 runs are one job (6), a tuning seed's
    # 24 trials one (2), the 5 target runs one, the 6 equal-compute runs one; manifests for all
    # 13 seeds; the probe
    # exports and probes bp, dbp, cadamw and equal-compute of 6 seeds (one job a seed);
    # UperNet fine-tunes bp, dbp, cadamw and scratch of seed 0 (each exporting its own encoder)
    assert jobs == {"all": 1, "study_config": 1, "embedded_data": 1, "subset_manifest": 13,
                    "pretrain_scored": 6, "pretrain_trials": 2, "pretrain_target": 1,
                    "pretrain_downstream": 1, "select": 1, "stepcost": 1, "equal_compute": 1,
                    "probe": 6, "finetune": 4, "summarize": 1, "figures": 1}


def _pretrain_jobs(text):
    """(rule, seeds, run ids, command) of every pre-training job of a dry run's -p output."""
    jobs = []
    for block in (b for b in text.split("\nrule ") if b.startswith("pretrain")):
        cmd = next(line for line in block.splitlines() if "pretrain-runs" in line)
        words = cmd.split(" > ")[0].split("--results results/default")[1].split()
        ids = [w for i, w in enumerate(words) if not w.startswith("--") and not words[i - 1].startswith("--")]
        seeds = [int(s) for s in re.search(r"--seed ([\d ]+) --", cmd)[1].split()]
        jobs.append((block.split(":")[0], seeds, ids, cmd))
    return jobs


def test_every_run_once_and_only_trials_skip_the_tuning_selection(tmp_path):
    jobs = _pretrain_jobs(_snakemake(tmp_path, "-n", "-p").stdout)
    runs = [(rid, seed) for _, seeds, ids, _ in jobs for rid in ids for seed in seeds]
    assert len(jobs) == 6 + 2 + 1 + 1 and len(runs) == len(set(runs)) == 71 + 48
    ladder = [f"{a}{s}" for s in ("", "__steps=40", "__steps=120") for a in ("bp", "dbp", "identity", "cadamw")
              if not (s and a == "identity")]  # budget by budget, the arms side by side
    for rule, seeds, ids, cmd in jobs:
        equal = ids == ["bp__equal_compute_dbp"]
        if rule == "pretrain_scored":
            assert ids == ladder and len(seeds) == 1 and seeds[0] in range(6)
        elif rule == "pretrain_trials":
            assert ids == [f"{a}__blr={v}{rep}" for v in ("0.002", "0.004", "0.008", "0.016")
                           for rep in ("", "__perturb=1e-06") for a in ("bp", "dbp", "cadamw")]
            assert seeds in ([200], [201])
        elif rule == "pretrain_target":
            assert ids == ["bp"] and seeds == [100, 101, 102, 103, 104]
        else:
            assert rule == "pretrain_downstream" and equal and seeds == list(range(6)), cmd
        assert ("--tuned results/default/tuning/selected.json" in cmd) == (rule != "pretrain_trials"), cmd
        # only the equal-compute runs take their steps from the records
        assert ("--steps-from results/default/equal_compute/dbp.json" in cmd) == equal


def test_ungrouped_runs_get_a_job_each(tmp_path):
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump({"jobs": {"group_runs": False}}))
    jobs = _dry_run_jobs(tmp_path, "--configfile", _config("default.yaml"), str(single))
    assert jobs["pretrain"] == 71 + 48 and not any(j.startswith("pretrain_") for j in jobs)


def test_pinned_values_skip_tuning(tmp_path):
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(yaml.safe_dump({"tuning": {"enabled": False}}))
    jobs = _dry_run_jobs(tmp_path, "--configfile", _config("default.yaml"), str(pinned))
    assert "select" not in jobs and "pretrain_trials" not in jobs and jobs["pretrain_scored"] == 6
    assert "--tuned" not in _snakemake(tmp_path, "-n", "-p", "--configfile", _config("default.yaml"),
                                       str(pinned)).stdout


def test_probe_off_drops_its_jobs_and_the_equal_compute_runs(tmp_path):
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump({"probe": {"enabled": False}}))
    jobs = _dry_run_jobs(tmp_path, "--configfile", _config("default.yaml"), str(off))
    assert "probe" not in jobs and "equal_compute" not in jobs
    assert "pretrain_downstream" not in jobs and jobs["pretrain_scored"] == 6 and jobs["finetune"] == 4


def test_sweep_runs_on_the_tuning_seeds(tmp_path):
    dbp = _dry_run_jobs(tmp_path, "--configfile", _config("default.yaml"), _config("sweep_dbp.yaml"))
    assert dbp["pretrain"] == 3 * 2 * 2 * 2  # decor_lr x kappa x frac, on both tuning seeds, a job each


def _fake_paper_data(tmp_path) -> Path:
    """Empty ImageNet and ADE20K folders of the right shape, and a config naming them."""
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
    (tmp_path / "ade").mkdir()
    (tmp_path / "ade" / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    paths = tmp_path / "paths.yaml"
    paths.write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "imagenet")},
                                     "finetune": {"root": str(tmp_path / "ade")}}))
    return paths


def test_paper_dry_run_with_fake_imagenet_and_ade20k(tmp_path):
    paths = _fake_paper_data(tmp_path)
    jobs = _dry_run_jobs(tmp_path, "--configfile", _config("paper.yaml"), str(paths))
    # every registered arm: BP on 6 scored + 5 target seeds, 6 more arms on 6; the 6 tuned arms
    # (all but identity) get the ladder (2 scales x 6 seeds), 3 LRs x 2 tuning seeds x 2 (the numerics
    # replicate) and 3 fine-tuned seeds; BP
    # at DBP's wall-clock on 6, a job per run; the probe reads the tuned arms and that run on 6 seeds
    assert jobs == {"all": 1, "study_config": 1, "subset_manifest": 13,
                    "pretrain": 11 + 6 * 6 + 6 * 12 + 6 * 3 * 2 * 2 + 6, "select": 1, "stepcost": 1,
                    "equal_compute": 1, "probe": 6, "finetune": 7 * 3, "summarize": 1, "figures": 1}


def _job_resources(text: str) -> dict[str, set[tuple]]:
    """Rule -> the distinct (gpu, runtime, mem_mb, cpus_per_task) of its jobs in a dry run."""
    found: dict[str, set[tuple]] = {}
    for block in text.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0].strip()
        res = dict(re.findall(r"(\w+)=([^,\s]+)", next(line for line in block.splitlines() if "resources:" in line)))
        found.setdefault(rule, set()).add(tuple(res.get(k) for k in ("gpu", "runtime", "mem_mb", "cpus_per_task")))
    return found


@pytest.mark.parametrize("group", [False, True])
def test_slurm_profile_resources_reach_every_training_job(tmp_path, group):
    """Issue 25: under --profile profiles/slurm every pre-training and fine-tuning job went out
    with gpu=0, 60 minutes and 4 GB: the automatically applied workflow profile's
    set-resources replaced the SLURM profile's. Now each rule gets exactly what the SLURM
    profile gives it, grouped or not."""
    paths = _fake_paper_data(tmp_path)
    grouping = tmp_path / "group.yaml"
    grouping.write_text(yaml.safe_dump({"jobs": {"group_runs": group}}))
    text = _snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles" / "slurm"),
                      "--configfile", _config("paper.yaml"), str(paths), str(grouping)).stdout
    prof = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())["set-resources"]
    jobs = _job_resources(text)
    training = ["pretrain_scored", "pretrain_trials", "pretrain_target", "pretrain_downstream"] if group else ["pretrain"]
    for rule in [*training, "finetune", "probe", "stepcost"]:
        want = prof[rule]
        assert jobs[rule] == {(str(want["gpu"]), str(want["runtime"]), str(want["mem_mb"]),
                               str(want["cpus_per_task"]))}, rule
        assert want["gpu"] >= 1
    assert "pretrain" not in jobs if group else not any(r.startswith("pretrain_") for r in jobs)


@pytest.mark.parametrize("name", ["x$(touch pwned)", "two words", "../..", "/abs/path", "a;b", ""])
def test_a_study_name_is_data_never_code(tmp_path, name):
    """Issue 24: the name became results/<name> and went unquoted into every job's shell
    command; now one line names the rule and nothing runs or is written."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": name}))
    out = _snakemake(tmp_path, "-n", "--configfile", _config("default.yaml"), str(bad), check=False)
    assert out.returncode != 0 and "config error: name: letters, digits, _ and - only" in out.stdout + out.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "results").exists()


def test_a_data_root_is_one_word_in_every_shell_command(tmp_path):
    """Issue 24: paths went unquoted into the jobs' shell lines, so a data root with a space
    broke every job and one with $(...) ran it. Now every path is one quoted word: the dry
    run's commands split back into the same path, and the data job really writes there."""
    root = tmp_path / "my data $(touch pwned);x"
    paths = tmp_path / "paths.yaml"
    paths.write_text(yaml.safe_dump({"data": {"root": str(root)}, "finetune": {"root": str(root)}}))
    conf = ["--configfile", _config("default.yaml"), str(paths)]
    text = _snakemake(tmp_path, "-n", "-p", *conf).stdout
    commands = [line.split("Shell command:")[-1].strip() for line in text.splitlines()
                if '"$DBP_PYTHON" -m dbp' in line]
    assert len(commands) == 39  # every job of the study but its config (a run: block)
    for cmd in commands:
        words = shlex.split(cmd)
        assert ";x" not in " ".join(w for w in words if str(root) not in w), cmd
    make = next(shlex.split(c) for c in commands if " data make " in c)
    assert make[make.index("--root") + 1] == str(root)
    manifest = Path("results", "default", "manifests", "pretrain_seed0.txt")
    _snakemake(tmp_path, *conf, "--", str(manifest))
    assert (root / "imagenet" / "train").is_dir() and (tmp_path / manifest).read_text().count("\n") > 10
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.parametrize("override,message", [
    ({"pretrain": {"bach_size": 3}}, "pretrain.bach_size: unknown key (known: accum_steps, amp,"),
    ({"data": {"fraction": 1.5}}, "data.fraction: must be in (0, 1]"),
    ({"pretrain": {"batch_size": "many"}}, "pretrain.batch_size: must be an integer, got 'many'"),
    ({"sweeps": {"x": {"grid": {"dbp.kapa": [1.0]}}}}, "dbp.kapa: unknown key"),
    ({"seeds": {"scored": [0, 100]}}, "seeds.scored: shares seeds [100] with seeds.target"),
    ({"seeds": {"scored": [-1]}}, "seeds.scored[0]: must be >= 0, got -1"),
    ({"dbp": {"kappa": "2e-3"}, "tuning": {"grid": {"pretrain.bl": [1.0]}}}, "pretrain.bl: unknown key"),
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


def test_gpus_per_job_come_from_resources_not_a_parse_time_probe(tmp_path, monkeypatch):
    """Issue 11, fault 6: the DAG was given GPUs by nvidia-smi on the parsing host (a login
    node has none, so SLURM fine-tunes ran on CPU). Now only the `gpu` resource counts."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n3\\n'\n")
    (fake / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{__import__('os').environ['PATH']}")
    out = _snakemake(tmp_path, "-n", "-p", "--set-resources", "finetune:gpu=2").stdout
    pretrain = re.findall(r"-m dbp gpus (\d+) -- dbp pretrain-runs ", out)
    finetune = re.findall(r"-m dbp gpus (\d+) -- dbp finetune ", out)
    assert len(pretrain) == 6 + 4 and set(pretrain) == {"0"}  # the default: no probe
    assert len(finetune) == 4 and set(finetune) == {"2"}   # what the resource says


def test_slurm_profile_gives_pretrain_and_finetune_gpus():
    prof = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert all(prof["set-resources"][r]["gpu"] >= 1 for r in ("pretrain", "pretrain_scored", "pretrain_trials", "pretrain_target",
                                                              "pretrain_downstream"))
    assert prof["set-resources"]["finetune"]["gpu"] >= 1
    # a training job is told 5 minutes before its time limit, to save (dbp.interrupt)
    assert prof["default-resources"]["slurm_extra"] == "'--signal=TERM@300'"


def test_dbp_gpus_chooses_the_launcher_when_the_job_runs(tmp_path):
    from dbp.gpus import dbp_launcher, run_on_gpus
    assert dbp_launcher(0, "py") == dbp_launcher(1, "py") == ["py", "-m", "dbp"]
    assert dbp_launcher(4, "py") == ["py", "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node", "4", "-m", "dbp"]
    assert run_on_gpus(0, ["dbp", "data", "subset", "--seed", "0", "--out", str(tmp_path / "m.txt"),
                           "--set", f"data.root={REPO / 'data' / 'embedded'}"]) == 0
    assert (tmp_path / "m.txt").read_text().count("\n") > 0


def test_schema_file_matches_the_typed_config():
    on_disk = yaml.safe_load((REPO / "workflow" / "schemas" / "study.schema.yaml").read_text())
    assert {k: v for k, v in on_disk.items() if not k.startswith("$") and k != "description"} \
        == json_schema(), "regenerate with: dbp config --schema > workflow/schemas/study.schema.yaml"


@pytest.mark.slow
def test_a_job_killed_after_its_last_checkpoint_completes_on_rerun(tmp_path):
    """Killed after the last checkpoint, before its outputs: Snakemake re-runs the job, which
    resumes at the last step and writes every declared output (no MissingOutputException)."""
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(yaml.safe_dump({"tuning": {"enabled": False}}))
    rel = Path("results", "smoke", "pretrain", "bp", "seed100")
    run = tmp_path / rel
    target = ["--configfile", _config("smoke.yaml"), str(pinned), "--", str(rel / "run.json")]
    _snakemake(tmp_path, *target)
    metrics = (run / "metrics.csv").read_text()
    for name in ("run.json", "metrics.csv", "final.pt"):  # what a kill at that moment leaves out
        (run / name).unlink()
    again = _snakemake(tmp_path, *target)
    assert "1 of 1 steps (100%) done" in again.stderr
    assert (run / "metrics.csv").read_text() == metrics
    assert json.loads((run / "run.json").read_text())["resumed_from"] == [20]
    assert (run / "final.pt").is_file()


@pytest.mark.slow
def test_smoke_study_runs_end_to_end_and_is_then_up_to_date(tmp_path):
    _snakemake(tmp_path, "--configfile", _config("smoke.yaml"))
    results = tmp_path / "results" / "smoke"
    runs = {(p.parts[-3], p.parts[-2]): json.loads(p.read_text())
            for p in (results / "pretrain").glob("*/seed*/run.json")}
    assert {r: i["role"] for r, i in runs.items()} == {
        ("bp", "seed0"): "scored", ("bp", "seed100"): "target", ("dbp", "seed0"): "scored",
        ("bp__steps=10", "seed0"): "scored", ("dbp__steps=10", "seed0"): "scored",
        ("bp__equal_compute_dbp", "seed0"): "downstream",
        **{(f"{a}__blr={lr}{rep}", "seed200"): "tuning" for a in ("bp", "dbp") for lr in ("0.016", "0.032")
           for rep in ("", "__perturb=1e-06")}}  # each trial and its numerics replicate
    selected = json.loads((results / "tuning" / "selected.json").read_text())["arms"]
    for (run_id, seed), info in runs.items():
        assert info["status"] == "finished"
        if info["role"] != "tuning":  # the winners flowed into every other run, and trained
            assert info["tuned"] == selected[info["arm"]]["values"]
            blr = selected[info["arm"]]["values"]["pretrain.blr"]
            assert info["peak_lr"] == pytest.approx(blr * 16 / 256)
    assert runs["bp__steps=10", "seed0"]["steps_done"] == 10 and runs["bp", "seed0"]["steps_done"] == 20
    assert runs["bp__blr=0.016__perturb=1e-06", "seed200"]["config"]["pretrain"]["perturb"] == 1e-6
    assert runs["bp", "seed0"]["provenance"]["numerics"]["cpu_capability"] in ("AVX512", "AVX2", "DEFAULT")
    for table in ("sensitivity", "stability", "reading"):  # protocol v3's tables, from the smoke run
        assert (results / f"{table}.md").stat().st_size > 0
    ft = sorted((results / "finetune").glob("*/seed0/metrics.json"))
    assert [p.parts[-3] for p in ft] == ["bp", "dbp", "scratch"]
    assert all(0.0 <= json.loads(p.read_text())["mIoU"] <= 1.0 for p in ft)
    equal = json.loads((results / "equal_compute" / "dbp.json").read_text())  # from the records
    assert equal["steps"] == round(20 * equal["ratio"]) == runs["bp__equal_compute_dbp", "seed0"]["steps_done"]
    probes = {p.parts[-3]: json.loads(p.read_text()) for p in (results / "probe").glob("*/seed0/metrics.json")}
    assert sorted(probes) == ["bp", "bp__equal_compute_dbp", "dbp", "scratch"]
    assert all(0.0 <= m["mIoU"] <= 1.0 and len(m["mIoU_heads"]) == 2 for m in probes.values())
    downstream = (results / "downstream.md").read_text()
    assert "| Linear probe (frozen encoder) | dbp | bp__equal_compute_dbp |" in downstream
    headline = (results / "headline.md").read_text()
    assert f"bp {{'pretrain.blr': {selected['bp']['values']['pretrain.blr']}}}" in headline
    assert "| Wall-clock to target, budget curve (primary) |" in headline
    assert "Only 1 target-setting runs (the protocol asks for 5)" in headline
    rounds = (results / "stepcost" / "rounds.csv").read_text().splitlines()
    assert len(rounds) == 1 + 2 * 10  # header + bp and dbp in each of smoke.yaml's 10 rounds
    assert "side-by-side step-time ratio (10 interleaved rounds" in headline
    pngs = sorted(p.name for p in (tmp_path / "paper_figures" / "smoke").glob("*.png"))
    assert {"loss_vs_time.png", "loss_vs_steps.png", "budget_curves.png", "time_to_target.png",
            "downstream.png"} <= set(pngs)
    again = _snakemake(tmp_path, "--configfile", _config("smoke.yaml"))
    assert "Nothing to be done" in again.stdout + again.stderr
    # issue 24: the same environment through another interpreter path re-runs nothing (the
    # path used to be a rule parameter, and a changed parameter re-ran the whole study)
    other = Path(sys.executable).with_name("python3" if Path(sys.executable).name != "python3" else "python")
    again = subprocess.run([str(other), "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                            "--directory", str(tmp_path), "--cores", "2", "--configfile", _config("smoke.yaml")],
                           capture_output=True, text=True)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
    before = (results / "headline.md").stat().st_mtime_ns
    _snakemake(tmp_path, "tables", "--configfile", _config("smoke.yaml"))
    assert (results / "headline.md").stat().st_mtime_ns > before  # re-made from the results only
    _snakemake(tmp_path, "--report", str(tmp_path / "report.zip"), "--configfile", _config("smoke.yaml"))
    with zipfile.ZipFile(tmp_path / "report.zip") as z:
        files = {n: z.read(n) for n in z.namelist()}
    tables = [n for n, b in files.items() if n.endswith("headline.html")]
    assert len(tables) == 1 and b"Wall-clock to target, budget curve (primary)" in files[tables[0]]
    assert {"budget_curves.png", "time_to_target.png"} <= {Path(n).name for n in files}
    assert any(b"the side-by-side step-cost" in b for n, b in files.items() if n.endswith((".html", ".js")))


@pytest.mark.parametrize("study", ["default", "smoke", "paper"])
def test_dbp_config_prints_the_config_the_jobs_read(tmp_path, study):
    """Issue 25: the Snakefile merged every study over configs/default.yaml (the paper study
    took the CPU study's decoded-image cache, probe steps and step-cost rounds), so `dbp
    config` showed another config than the jobs read. Now a study is complete or names its
    base, and both resolve it the same way: the study's written config equals `dbp config`."""
    files, sets = ([], []) if study == "default" else ([_config(f"{study}.yaml")], [])
    if study == "paper":
        files.append(str(_fake_paper_data(tmp_path)))
        sets = ["--set", f"data.root={tmp_path / 'imagenet'}", "--set", f"finetune.root={tmp_path / 'ade'}"]
    _snakemake(tmp_path, *(["--configfile", *files] if files else []), "--", f"results/{study}/config.yaml")
    printed = subprocess.run([sys.executable, "-m", "dbp", "config", "--config", _config(f"{study}.yaml"), *sets],
                             capture_output=True, text=True, check=True).stdout
    assert (tmp_path / "results" / study / "config.yaml").read_text() == printed
    if study == "paper":  # what it used to inherit from the CPU study
        cfg = yaml.safe_load(printed)
        assert cfg["data"]["cache_images"] is False and cfg["probe"]["steps"] == 1000


def test_a_base_names_what_a_study_inherits(tmp_path):
    from dbp.config import ConfigError, load_config
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "smoke", "name": "child", "pretrain": {"steps": 30}}))
    cfg = load_config(child)
    assert cfg.pretrain.steps == 30 and cfg.pretrain.batch_size == 16 and cfg.arms == ("bp", "dbp")  # smoke's
    assert cfg.seeds.target == (100,) and cfg.tuning.tolerance == load_config(_config("default.yaml")).tuning.tolerance
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"base": str(loop)}))
    with pytest.raises(ConfigError, match="is its own base"):
        load_config(loop)
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(None, ["base=nope"])
