"""The study config: run roles on disjoint seeds, the run families, tuned values, bad input."""
import pytest
import yaml

from dbp.config import ConfigError, config_from_dict, load_config, with_tuned


def test_default_study_runs_and_roles():
    cfg = config_from_dict({})
    runs = cfg.runs()
    assert runs["bp"].seeds == tuple(range(6)) + (100, 101, 102, 103, 104)
    assert [cfg.role(runs["bp"], s) for s in (0, 100)] == ["scored", "target"]
    assert runs["identity"].seeds == tuple(range(6))  # controls are neither tuned nor laddered
    trials = [r for r in runs.values() if not r.tuned]
    assert sorted(r.run_id for r in trials) == sorted(f"{a}__blr={lr}{rep}" for a in ("bp", "dbp")
                                                      for lr in ("0.004", "0.008", "0.016")
                                                      for rep in ("", "__perturb=1e-06"))
    replicate = runs["dbp__blr=0.008__perturb=1e-06"]  # the trial again, initial weights nudged
    assert replicate.overrides == (("pretrain.blr", 0.008), ("pretrain.perturb", 1e-6))
    assert all(r.seeds == (200,) and cfg.role(r, 200) == "tuning" for r in trials)
    ladder = runs["dbp__steps=450"]  # 1.5 x the 300 default steps, warm-up 1.5 x 30
    assert ladder.seeds == tuple(range(6)) and dict(ladder.overrides) == {"pretrain.steps": 450,
                                                                          "pretrain.warmup_steps": 45}
    assert cfg.finetune_seeds() == (0, 1, 2) and cfg.finetune_arms() == ["bp", "dbp", "scratch"]


@pytest.mark.parametrize("raw, message", [
    ({"seeds": {"scored": [0, 1], "target": [1, 2]}}, "seeds.scored: shares seeds [1] with seeds.target"),
    ({"seeds": {"tuning": [100]}}, "seeds.target: shares seeds [100] with seeds.tuning"),
    ({"seeds": {"scored": [-1]}}, "seeds.scored[0]: must be >= 0, got -1"),
    ({"seeds": [0, 1, 2]}, "seeds: must be a mapping with keys scored, target, tuning"),
    ({"tuning": {"grid": {"dbp.kappa": [0.1]}}}, "tuning.grid.dbp.kappa: keys look like pretrain.<key>"),
    ({"budgets": {"scales": [1.0]}}, "budgets.scales: must be > 0 and not 1"),
    ({"budgets": {"seeds": 9}}, "budgets.seeds: must be <= the 6 scored seeds"),
    ({"arms": ["dbp"]}, "arms: needs bp"),
])
def test_bad_roles_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value)


def test_exponent_without_a_dot_is_a_number(tmp_path):
    (tmp_path / "c.yaml").write_text("dbp: {kappa: 1e-3, decor_lr: 2e-3}\n")
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"  # what PyYAML gives us
    cfg = load_config(tmp_path / "c.yaml", ["pretrain.blr=5e-3"])
    assert (cfg.dbp.kappa, cfg.dbp.decor_lr, cfg.pretrain.blr) == (1e-3, 2e-3, 5e-3)
    with pytest.raises(ConfigError, match="dbp.kappa: must be a number, got 'abc'"):
        load_config(None, ["dbp.kappa=abc"])


def test_tuned_values_become_the_arms_pretrain_section():
    cfg = with_tuned(config_from_dict({"arm_overrides": {"dbp": {"blr": 1.0}}}), "dbp",
                     {"pretrain.blr": 0.032})
    assert cfg.pretrain_for("dbp").blr == 0.032 and cfg.pretrain_for("bp").blr == 1.6e-2
    assert cfg.run_config("dbp")["pretrain"]["blr"] == 0.032
    assert cfg.run_config("bp")["dbp"] is None and cfg.run_config("identity")["dbp"]["decor_lr"] == 0.0
    with pytest.raises(ConfigError, match="only pretrain.<key> values can be tuned"):
        with_tuned(cfg, "dbp", {"dbp.kappa": 0.1})


# ------------------------------------------------------------- issue 11: edges of the config

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
BLOCK_TORCH = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'torch': raise ImportError('torch is blocked')\n"
               "sys.meta_path.insert(0, Block())\n")


def test_config_and_subset_manifest_need_no_torch(tmp_path):
    """Validating a config (the Snakefile does, with fine-tuning on) and `dbp data subset`
    (12 jobs a study) import no torch: they used to pay ~4 s each for it."""
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(5):
                (tmp_path / "img" / split / c / f"{i}.JPEG").write_bytes(b"")
    out = tmp_path / "m.txt"
    code = BLOCK_TORCH + (
        "from dbp.config import load_config\n"
        "cfg = load_config('configs/default.yaml')\n"
        "assert cfg.finetune.enabled\n"
        "from dbp.cli import main\n"
        f"main(['data', 'subset', '--config', 'configs/default.yaml', '--set', 'data.kind=imagenet',"
        f" '--set', 'data.root={tmp_path / 'img'}', '--set', 'data.fraction=0.5', '--seed', '3',"
        f" '--out', '{out}'])\n"
        "assert 'torch' not in sys.modules\n")
    run = __import__("subprocess").run([__import__("sys").executable, "-c", code], cwd=REPO,
                                       capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(out.read_text().split()) == 5  # half of the 10 train images


@pytest.mark.parametrize("text, message", [
    ("data: [unclosed\n  x: 1\n", "not valid YAML at line 2, column 4"),
    ("- a\n- b\n", "top level must be a mapping of sections, got list"),
    (b"\xff\xfe\x00garbage", "not valid YAML: not UTF-8 text"),
])
def test_config_file_that_is_no_yaml_mapping_is_one_line(tmp_path, text, message):
    bad = tmp_path / "study.yaml"
    (bad.write_bytes if isinstance(text, bytes) else bad.write_text)(text)
    run = __import__("subprocess").run([__import__("sys").executable, "-m", "dbp", "config",
                                        "--config", str(bad)], capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1
    assert run.stderr.startswith(f"dbp config: config error: {bad}: {message}")
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("raw, message", [
    ({"pretrain": {"model": "mae_vit_huge"}}, "pretrain.model: unknown model 'mae_vit_huge'"),
    ({"pretrain": {"model": "mae_vit_huge"}, "finetune": {"enabled": False}},
     "pretrain.model: unknown model 'mae_vit_huge'"),
    ({"arm_overrides": {"dbp": {"model": "vit"}}}, "arm_overrides.dbp.model: unknown model 'vit'"),
    ({"data": {"image_size": 224}},
     "data.image_size: must equal the input size of pretrain.model 'mae_vit_tiny_patch4_32' (32), got 224"),
    ({"pretrain": {"model": "mae_vit_base_patch16"}},
     "data.image_size: must equal the input size of pretrain.model 'mae_vit_base_patch16' (224), got 32"),
])
def test_model_and_image_size_are_checked_against_the_presets(raw, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        config_from_dict(raw)
    cfg = config_from_dict({"data": {"image_size": 224}, "pretrain": {"model": "mae_vit_small_patch16"}})
    assert cfg.data.image_size == 224


def test_global_batch_fixes_the_recipe_whatever_the_gpu_count():
    """pretrain.global_batch: the per-device batch follows the world size (lr, steps and
    epochs do not); a count that does not divide it stops the run, naming the key."""
    pre = config_from_dict({"pretrain": {"batch_size": None, "global_batch": 1024}}).pretrain
    assert [pre.device_batch(w) for w in (1, 4, 8)] == [1024, 256, 128]
    accum = config_from_dict({"pretrain": {"batch_size": None, "global_batch": 1024, "accum_steps": 2}})
    assert accum.pretrain.device_batch(4) == 128
    with pytest.raises(ConfigError, match=r"^pretrain.global_batch: 1024 does not split into 3 device"):
        pre.device_batch(3)
    assert config_from_dict({}).pretrain.device_batch(4) == 64  # batch_size: per device, as before
    for raw, message in (({"global_batch": 1024}, "set exactly one of batch_size (per device) and global"),
                         ({"batch_size": None}, "set exactly one of batch_size"),
                         ({"batch_size": None, "global_batch": 9, "accum_steps": 2},
                          "9 does not split into 2 accum_steps")):
        with pytest.raises(ConfigError, match=f"^pretrain.global_batch: {__import__('re').escape(message)}"):
            config_from_dict({"pretrain": raw})
