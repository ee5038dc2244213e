"""Segmentation fine-tuning: recipe and config builder, ADE-layout loader, Runner outputs,
resume, determinism, checks."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.runner import IterBasedTrainLoop, ValLoop
from test_export import MODEL, write_final_pt

from dbp.cli import main
from dbp.config import ConfigError, load_config
from dbp.datasets import ADESegDataset, read_class_names
from dbp.embedded import ADE, make_embedded
from dbp.export import ExportError, export_encoder
from dbp.interrupt import Interrupted
from dbp.seg_recipe import (SEG_PRESETS, build_seg_config, out_indices, resolve_recipe,
                            run_iterations)
from dbp.segment import finetune
from dbp.subset import list_ade_stems, write_manifest


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = make_embedded(tmp_path_factory.mktemp("data") / "emb", seed=0, imagenet_per_class=1,
                         imagenet_val_per_class=1, ade_train=8, ade_val=2, image_size=32)
    return root / ADE


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc")
    write_final_pt(d / "final.pt", dbp=True)
    export_encoder(d / "final.pt", d / "encoder.pth")
    return d / "encoder.pth"


REPO = Path(__file__).resolve().parents[1]
NO_ENERGY = dict(enabled=False, country_iso_code="NLD", measure_power_secs=1.0, fallback_watts=18.0)


def _config(ade, tmp_path, preset="cpu_tiny", overrides=None, **kw):
    write_manifest(tmp_path / "m.txt", list_ade_stems(ade, "training")[:5])
    args = dict(work_dir=tmp_path, ade_root=ade, classes=read_class_names(ade),
                train_manifest=tmp_path / "m.txt", model_name=MODEL, pretrained=None, seed=0,
                fraction=1.0, num_workers=0, world_size=1, on_gpu=False)
    return build_seg_config(resolve_recipe(preset, overrides or {}), **{**args, **kw})


def _finetune(out, ade, pretrained, iterations=3, **kw):
    args = dict(recipe=resolve_recipe("cpu_tiny", {"iterations": iterations}),
                pretrained=pretrained, data_root=ade, seed=0, model_name=MODEL, fraction=1.0,
                manifest=None, num_workers=0, energy=NO_ENERGY, verbose=False,
                resolved_config=None)
    return finetune(out, **{**args, **kw})


def _warmup(cfg) -> int:
    """Warm-up iterations of a config's LR schedule (0 without a LinearLR phase)."""
    first = cfg["param_scheduler"][0]
    return first["end"] if first["type"] == "LinearLR" else 0


def test_out_indices_spread_over_depth():
    assert out_indices(4) == (0, 1, 2, 3)
    assert out_indices(12) == (3, 5, 7, 11)  # mmseg's MAE config
    assert out_indices(6) == (1, 2, 3, 5)
    with pytest.raises(ValueError):
        out_indices(3)


def test_config_takes_sizes_from_the_data_and_the_encoder(ade, tmp_path):
    cfg = _config(ade, tmp_path, pretrained="enc.pth")
    k = len(read_class_names(ade))
    assert k == 19 and cfg["model"]["decode_head"]["num_classes"] == k
    assert cfg["model"]["auxiliary_head"]["num_classes"] == k
    bb = cfg["model"]["backbone"]
    sizes = (bb["embed_dims"], bb["num_layers"], bb["patch_size"], bb["img_size"])
    assert sizes == (128, 4, 4, (32, 32)) and bb["init_values"] == 1.0
    assert bb["init_cfg"] == dict(type="Pretrained", checkpoint="enc.pth")
    assert cfg["train_dataloader"]["dataset"]["ann_file"] == str((tmp_path / "m.txt").resolve())
    assert cfg["optim_wrapper"]["paramwise_cfg"]["num_layers"] == 4


def test_cpu_runs_are_deterministic_and_gpu_runs_use_amp(ade, tmp_path):
    cpu = _config(ade, tmp_path, preset="paper")
    assert cpu["optim_wrapper"]["type"] == "OptimWrapper"  # AmpOptimWrapper asserts on CPU
    assert cpu["randomness"] == dict(seed=0, deterministic=True)
    assert cpu["env_cfg"]["dist_cfg"]["backend"] == "gloo" and not cpu["env_cfg"]["cudnn_benchmark"]
    gpu = _config(ade, tmp_path, preset="paper", on_gpu=True)
    assert gpu["optim_wrapper"]["type"] == "AmpOptimWrapper"
    assert gpu["randomness"] == dict(seed=0, deterministic=False)
    assert gpu["env_cfg"]["dist_cfg"]["backend"] == "nccl" and gpu["env_cfg"]["cudnn_benchmark"]
    assert _config(ade, tmp_path, on_gpu=True)["optim_wrapper"]["type"] == "OptimWrapper"


def test_paper_preset_scales_with_the_subset_but_keeps_its_warmup(ade, tmp_path):
    cfg = _config(ade, tmp_path, preset="paper", fraction=0.1)
    assert cfg["train_cfg"]["max_iters"] == 16_000 and cfg["train_cfg"]["val_interval"] == 1600
    assert cfg["default_hooks"]["checkpoint"]["interval"] == 1600
    assert _warmup(cfg) == 1500 and cfg["param_scheduler"][1]["end"] == 16_000  # mmseg's fixed
    assert cfg["model"]["test_cfg"] == dict(mode="slide", crop_size=(512, 512), stride=(341, 341))
    assert cfg["optim_wrapper"]["paramwise_cfg"]["decay_rate"] == 0.65
    assert cfg["train_dataloader"]["batch_size"] == 16
    pinned = resolve_recipe("paper", {"iterations": 5})
    assert run_iterations(pinned, 0.1) == 5 and run_iterations(SEG_PRESETS["paper"], 0.1) == 16_000


def test_paper_warmup_stays_fixed_while_cpu_tiny_scales_with_the_run(ade, tmp_path):
    assert _warmup(_config(ade, tmp_path, "paper", {"iterations": 16_000})) == 1500
    assert _warmup(_config(ade, tmp_path, "paper", {"iterations": 160_000})) == 1500
    assert _warmup(_config(ade, tmp_path, "paper", {"iterations": 40})) == 39  # before the end
    # cpu_tiny as before: 50 of its 1000 iterations, scaled with the run's length
    assert _warmup(_config(ade, tmp_path)) == 50
    assert _warmup(_config(ade, tmp_path, fraction=0.5)) == 25
    assert _warmup(_config(ade, tmp_path, "cpu_tiny", {"iterations": 200})) == 10
    tiny = _config(ade, tmp_path, "cpu_tiny", {"iterations": 16_000})
    assert _warmup(tiny) == 800 and tiny["default_hooks"]["checkpoint"]["interval"] == 4000
    # a warm-up asked for is taken as it is
    assert _warmup(_config(ade, tmp_path, "cpu_tiny", {"iterations": 200, "warmup": 7})) == 7


def test_paper_mae_is_paper_with_the_mae_authors_lr_and_layer_decay(ade, tmp_path):
    mae = _config(ade, tmp_path, preset="paper_mae")
    paper = _config(ade, tmp_path, preset="paper")
    assert mae["optim_wrapper"]["optimizer"]["lr"] == 8e-5
    assert mae["optim_wrapper"]["paramwise_cfg"]["decay_rate"] == 0.8
    del mae["optim_wrapper"], paper["optim_wrapper"]
    assert mae == paper


def test_resolve_recipe_applies_overrides_and_names_bad_ones():
    r = resolve_recipe("paper", {"lr": 2e-4, "layer_decay": 0.9, "drop_path_rate": 0.2,
                                 "weight_decay": 0.01, "warmup": 10, "iterations": 100})
    assert (r.lr, r.layer_decay, r.drop_path_rate, r.weight_decay) == (2e-4, 0.9, 0.2, 0.01)
    assert (r.warmup, r.iterations, r.name, r.crop) == (10, 100, "paper", 512)
    assert resolve_recipe("cpu_tiny", {}) == SEG_PRESETS["cpu_tiny"]
    with pytest.raises(ValueError, match="unknown segmentation preset 'papr'"):
        resolve_recipe("papr", {})
    with pytest.raises(ValueError, match="cannot override batch_size, crop"):
        resolve_recipe("paper", {"crop": 256, "lr": 1e-4, "batch_size": 8})


def test_the_recipe_needs_no_torch_mmengine_or_mmseg():
    """Resolving a recipe and building its config import none of the training stack."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'mmengine', 'mmseg', 'mmcv'):\n"
            "            raise ImportError(name + ' is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from dbp.seg_recipe import build_seg_config, resolve_recipe\n"
            "cfg = build_seg_config(resolve_recipe('paper_mae', {'iterations': 10}), work_dir='w',\n"
            "    ade_root='a', classes=['wall'], train_manifest='m.txt',\n"
            "    model_name='mae_vit_base_patch16', pretrained=None, seed=0, fraction=1.0,\n"
            "    num_workers=0, world_size=1, on_gpu=False)\n"
            "assert cfg['train_cfg']['max_iters'] == 10\n"
            "assert not {'torch', 'mmengine', 'mmseg', 'mmcv'} & set(sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_ade_loader_reduces_zero_label_and_counts_classes(ade, tmp_path):
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)  # the Runner does this from the config
    cfg = _config(ade, tmp_path)
    train = DATASETS.build(cfg["train_dataloader"]["dataset"])
    assert len(train) == 5  # the manifest, not the folder
    assert train.metainfo["classes"] == tuple(read_class_names(ade))
    val = DATASETS.build(cfg["val_dataloader"]["dataset"])
    gt = val[0]["data_samples"].gt_sem_seg.data[0].numpy()
    raw = ADESegDataset(ade, "validation", reduce_zero_label=False)[0][1]
    assert (raw == 0).any()  # the fixture has ignore pixels
    np.testing.assert_array_equal(gt == 255, raw == 0)  # 0 -> ignore
    np.testing.assert_array_equal(gt[raw > 0], raw[raw > 0] - 1)  # k -> k - 1
    assert gt[raw > 0].max() < 19


def test_finetune_writes_metrics_and_stays_quiet(ade, encoder, tmp_path, capfd):
    m = _finetune(tmp_path / "run", ade, encoder)
    out = capfd.readouterr()
    assert "Param groups" not in out.out + out.err and "Iter(train)" not in out.out + out.err
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    assert 0.0 <= m["mIoU"] <= 1.0 and 0.0 <= m["aAcc"] <= 1.0 and m["iterations"] == 3
    assert list(m["per_class_iou"]) == read_class_names(ade)
    assert all(v is None or 0.0 <= v <= 1.0 for v in m["per_class_iou"].values())
    assert m["train_seconds"] > 0 and m["excluded_seconds"]["eval"] > 0
    assert m["arm"] == "dbp" and m["train_images"] == 8 and m["val_images"] == 2
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "finished" and run["pretrained_meta"]["arm"] == "dbp"
    assert run["resumed_from"] is None and "git_commit" in run["provenance"]
    log = next((tmp_path / "run").glob("*/*.log")).read_text()
    assert "Param groups" in log and "Iter(train) [3/3]" in log
    # a finished run is not repeated
    assert _finetune(tmp_path / "run", ade, encoder) == saved


@pytest.mark.skipif(torch.cuda.is_available(), reason="deterministic on CPU only")
def test_same_encoder_and_seed_give_the_same_metrics_on_cpu(ade, encoder, tmp_path):
    first = _finetune(tmp_path / "a", ade, encoder, iterations=4)
    second = _finetune(tmp_path / "b", ade, encoder, iterations=4)
    timing = ("train_seconds", "excluded_seconds", "energy_kwh", "co2_kg")
    assert first["mIoU"] == second["mIoU"] and first["aAcc"] > 0
    assert {k: v for k, v in first.items() if k not in timing} == \
        {k: v for k, v in second.items() if k not in timing}
    assert not torch.are_deterministic_algorithms_enabled()  # mmengine's switch is undone


class Killed(Exception):
    """A simulated kill of the process mid-training."""


def test_resume_continues_from_the_last_checkpoint(ade, encoder, tmp_path, monkeypatch):
    run_iter = IterBasedTrainLoop.run_iter

    def killed_at_iter_2(self, data_batch):
        if self._iter == 2:
            raise Killed
        run_iter(self, data_batch)

    monkeypatch.setattr(IterBasedTrainLoop, "run_iter", killed_at_iter_2)
    with pytest.raises(Killed):
        _finetune(tmp_path, ade, encoder, iterations=4)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"
    assert not (tmp_path / "metrics.json").exists()
    monkeypatch.setattr(IterBasedTrainLoop, "run_iter", run_iter)

    m = _finetune(tmp_path, ade, encoder, iterations=4)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "finished" and run["resumed_from"] == 2 and m["iterations"] == 4
    log = next(Path(run["log_dir"]).glob("*.log")).read_text()
    assert "Iter(train) [1/4]" not in log and "Iter(train) [4/4]" in log  # only 3 and 4 ran


def test_a_stop_signal_saves_the_fine_tune_and_it_resumes_there(ade, encoder, tmp_path, monkeypatch):
    """Issue 24: SIGTERM lost a fine-tune back to its last scheduled checkpoint (the paper
    recipe's is at the end). Now it saves after the iteration in progress and resumes there,
    ending with an unbroken run's metrics."""
    whole = _finetune(tmp_path / "whole", ade, encoder, iterations=4)
    run_iter = IterBasedTrainLoop.run_iter

    def signalled_in_iter_2(self, data_batch):
        if self._iter == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        run_iter(self, data_batch)

    monkeypatch.setattr(IterBasedTrainLoop, "run_iter", signalled_in_iter_2)
    with pytest.raises(Interrupted) as stop:
        _finetune(tmp_path / "cut", ade, encoder, iterations=4)
    assert stop.value.code == 143
    run = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert run["status"] == "interrupted" and not (tmp_path / "cut" / "metrics.json").exists()
    assert (tmp_path / "cut" / "last_checkpoint").read_text() == str(tmp_path / "cut" / "iter_2.pth")
    monkeypatch.setattr(IterBasedTrainLoop, "run_iter", run_iter)
    m = _finetune(tmp_path / "cut", ade, encoder, iterations=4)
    run = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert run["status"] == "finished" and run["resumed_from"] == 2 and m["iterations"] == 4
    assert "resumed epoch: 0, iter: 2" in next(Path(run["log_dir"]).glob("*.log")).read_text()


def test_resume_after_the_last_iteration_still_validates(ade, encoder, tmp_path, monkeypatch):
    val_run = ValLoop.run

    def killed_in_validation(self):
        raise Killed

    monkeypatch.setattr(ValLoop, "run", killed_in_validation)
    with pytest.raises(Killed):
        _finetune(tmp_path, ade, encoder, iterations=2)
    monkeypatch.setattr(ValLoop, "run", val_run)
    m = _finetune(tmp_path, ade, encoder, iterations=2)
    assert m["iterations"] == 2 and 0.0 <= m["mIoU"] <= 1.0
    assert json.loads((tmp_path / "run.json").read_text())["resumed_from"] == 2


def test_a_changed_config_or_encoder_is_never_reused(ade, encoder, tmp_path, capsys):
    first = _finetune(tmp_path, ade, encoder, iterations=2)
    assert first["iterations"] == 2
    again = _finetune(tmp_path, ade, encoder, iterations=3)  # a finished folder, new config
    assert again["iterations"] == 3 and "starting over" in capsys.readouterr().out
    other_seed = _finetune(tmp_path, ade, encoder, iterations=3, seed=1)
    assert json.loads((tmp_path / "run.json").read_text())["seed"] == 1
    assert other_seed["seed"] == 1
    scratch = _finetune(tmp_path, ade, None, iterations=3, seed=1)  # another encoder
    assert scratch["arm"] == "scratch"
    assert _finetune(tmp_path, ade, None, iterations=3, seed=1) == scratch  # unchanged: reused


def test_scratch_arm_trains_from_random_init(ade, tmp_path):
    m = _finetune(tmp_path, ade, None)
    assert m["arm"] == "scratch" and 0.0 <= m["mIoU"] <= 1.0


def test_bad_pretrained_stops_before_training(ade, encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        _finetune(tmp_path / "a", ade, tmp_path / "missing.pth")
    # a pre-training checkpoint, not an export: mmseg would silently load nothing from it
    write_final_pt(tmp_path / "final.pt", dbp=False)
    with pytest.raises(ExportError, match=r"does not load.*pre-training checkpoint.*dbp export"):
        _finetune(tmp_path / "b", ade, tmp_path / "final.pt")
    ckpt = torch.load(encoder, weights_only=False)
    ckpt["state_dict"] = {k.replace("ln1", "norm1"): v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "renamed.pth")
    with pytest.raises(ExportError, match=r"missing .*layers\.0\.ln1\.weight"):
        _finetune(tmp_path / "c", ade, tmp_path / "renamed.pth")
    with pytest.raises(ExportError, match="exported from mae_vit_tiny_patch4_32"):
        _finetune(tmp_path / "d", ade, encoder, model_name="mae_vit_bench_patch4_32")
    assert not list(tmp_path.glob("*/iter_*.pth"))  # nothing was trained


def test_malicious_pretrained_encoder_stops_finetune_before_it_runs(ade, tmp_path):
    """Issue 11, fault 8: `dbp finetune --pretrained shared.pth` must never unpickle code."""
    from test_export import write_malicious

    from dbp._compat import UnsafeCheckpointError
    marker = tmp_path / "pwned"
    evil = write_malicious(tmp_path / "shared.pth", marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        _finetune(tmp_path / "run", ade, evil)
    assert str(e.value).startswith(f"{evil}: refusing to load this pretrained encoder")
    assert not marker.exists() and not list(tmp_path.glob("run/iter_*.pth"))


def test_finetune_config_names_bad_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("pretrain: {steps: 50}\nfinetune: {fraction: 0.5}\n")
    cfg = load_config(tmp_path / "c.yaml", ["finetune.iterations=7"])
    assert cfg.finetune.fraction == 0.5 and cfg.finetune.iterations == 7
    assert cfg.finetune_arms() == ["bp", "dbp", "scratch"]  # identity's encoder is BP's
    with pytest.raises(ConfigError, match="finetune.fraction"):
        load_config(None, ["finetune.fraction=2"])
    with pytest.raises(ConfigError, match="finetune.lr"):
        load_config(None, ["finetune.lr=-1"])
    with pytest.raises(ConfigError, match="finetune.root"):
        load_config(None, ["finetune.kind=ade20k", "finetune.root=/nope"])


def test_cli_finetune_reports_a_missing_export(ade, tmp_path):
    with pytest.raises(SystemExit, match="missing.pth"):
        main(["finetune", "--set", "finetune.kind=ade20k", "--set", f"finetune.root={ade}",
              "--pretrained", str(tmp_path / "missing.pth"), "--seed", "0",
              "--out", str(tmp_path / "run")])


def _break_labels(ade, tmp_path):
    """A copy of the ADE fixture with three bad annotations: another size, a label above the
    class count, RGB; the paths of the three."""
    import shutil

    from PIL import Image
    bad = tmp_path / "ade"
    shutil.copytree(ade, bad)
    train, val = list_ade_stems(bad, "training"), list_ade_stems(bad, "validation")
    paths = [bad / "annotations" / "training" / f"{train[0]}.png",
             bad / "annotations" / "training" / f"{train[-1]}.png",
             bad / "annotations" / "validation" / f"{val[0]}.png"]
    Image.new("L", (7, 5)).save(paths[0])
    label = np.asarray(Image.open(paths[1])).copy()
    label[0, 0] = len(read_class_names(bad)) + 1
    Image.fromarray(label).save(paths[1])
    Image.open(paths[2]).convert("RGB").save(paths[2])
    return bad, paths


@pytest.mark.parametrize("command", ["finetune", "probe"])
def test_bad_labels_are_named_before_any_training(ade, tmp_path, command):
    """Issue 24: an annotation of another size was used silently, a label above the class
    count left out of mIoU. Now every pair is checked first: one line per bad file, no run."""
    bad, paths = _break_labels(ade, tmp_path)
    args = (["--pretrained", "none"] if command == "finetune"
            else ["--encoder", "scratch=none", "--set", "probe.train_images=8"])
    out = subprocess.run([sys.executable, "-m", "dbp", command, "--set", "finetune.kind=ade20k",
                          "--set", f"finetune.root={bad}", *args, "--seed", "0",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    n_classes = len(read_class_names(bad))
    assert lines[1:] == [f"{paths[0]}: annotation 7x5, image 32x32",
                         f"{paths[1]}: labels [{n_classes + 1}] outside 0..{n_classes} (the class list) and 255 (ignore)",
                         f"{paths[2]}: RGB annotation, not single-channel 8-bit labels (mode L or P)"]
    assert lines[0] == f"dbp {command}: 3 of 10 annotations under {bad} fail their check:"
    assert not list((tmp_path / "run").rglob("metrics.json")) and not list((tmp_path / "run").rglob("run.json"))
