"""The arm registry (dbp/arms/): every arm trains through the real Learner, Muon's split,
the reference DBP against a hand-written loop, unknown names, export, the workflow."""
import dbp._compat  # noqa: F401  (must precede timm)

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz
from torch.utils.flop_counter import FlopCounterMode

from dbp import DBP, DecorMixin, DecorPatchEmbed, decor_modules, decorrelate
from dbp.arms import REGISTRY, get_arm
from dbp.arms._base import HIDDEN_WEIGHTS
from dbp.cli import main
from dbp.config import PATCH_EMBED, ConfigError, DBPConfig, PretrainConfig, load_config
from dbp.cost import newton_schulz_macs
from dbp.embedded import make_embedded
from dbp.figures import COLORS
from dbp.learner import Learner
from dbp.model import build_mae, mask_noise, step_macs
from dbp.pretrain import RunSpec, pretrain
from test_rule import reference_step
from test_workflow import REPO, _config, _dry_run_jobs

CPU = torch.device("cpu")
TINY = PretrainConfig(model="mae_vit_tiny_patch4_32", batch_size=8, blr=0.032)  # lr 1e-3
# tiny: 4 encoder blocks (width 128) and 1 decoder block (width 96), 4 weights each
TINY_HIDDEN = [(384, 128), (128, 128), (512, 128), (128, 512)] * 4 + \
    [(288, 96), (96, 96), (384, 96), (96, 384)]


def _learner(arm: str, dbp: DBPConfig = DBPConfig()) -> Learner:
    return Learner(TINY, get_arm(arm), dbp, seed=0, device=CPU)


def _batch(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), mask_noise(8, 64, g))]


def _losses(learner: Learner, steps: int, batches: list | None = None) -> list[float]:
    """The loss of each step, on `batches` in turn (default: one fixed batch)."""
    batches = batches or [_batch()]
    return [float(learner.step(batches[i % len(batches)])) for i in range(steps)]


@pytest.mark.parametrize("arm", list(REGISTRY))
def test_every_arm_trains_through_the_learner_and_lowers_the_loss(arm):
    losses = _losses(_learner(arm), 15)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_identity_equals_bp_step_for_step():
    assert _losses(_learner("identity"), 5) == _losses(_learner("bp"), 5)


def test_registry_names_colours_and_controls():
    assert list(REGISTRY)[0] == "bp" and {"dbp", "identity", "dbp_ref", "muon", "cadamw"} <= set(REGISTRY)
    colours = [COLORS[a] for a in REGISTRY] + [COLORS["scratch"]]
    assert len(set(colours)) == len(colours)  # one fixed colour per arm, declared by the arm
    assert {a for a, arm in REGISTRY.items() if arm.control_of} == {"identity"}
    with pytest.raises(ValueError, match="unknown arm 'nope'; known arms: bp, cadamw, dbp, "):
        get_arm("nope")


# ----------------------------------------------------------------------------- optimizers

@pytest.mark.parametrize("arm", ["muon", "dbp_muon"])
def test_muon_takes_the_hidden_block_weights_adamw_everything_else_once(arm):
    learner = _learner(arm)
    split = learner.param_split()
    muon, adamw = set(split["muon"]["names"]), set(split["adamw"]["names"])
    trainable = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert muon.isdisjoint(adamw) and muon | adamw == trainable
    assert split["muon"]["tensors"] + split["adamw"]["tensors"] == len(trainable)
    assert sorted(learner.model.get_parameter(n).shape for n in muon) == sorted(map(torch.Size, TINY_HIDDEN))
    assert all(re.fullmatch(HIDDEN_WEIGHTS, n) for n in muon) and len(muon) == 20
    assert {"patch_embed.proj.weight", "decoder_embed.weight", "decoder_pred.weight", "cls_token",
            "mask_token", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight"} <= adamw
    opt = learner.optimizers["muon"]
    assert isinstance(opt, torch.optim.Muon) and opt.defaults["adjust_lr_fn"] == "match_rms_adamw"
    learner.set_lr(0.123)  # the schedule reaches every group of every optimizer
    assert {g["lr"] for o in learner.optimizers.values() for g in o.param_groups} == {0.123}


def test_cautious_adamw_is_timms_with_adamws_groups():
    learner = _learner("cadamw")
    (opt,) = learner.optimizers.values()
    assert type(opt).__module__.startswith("timm.optim") and all(g["caution"] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, TINY.weight_decay]
    assert [len(g["params"]) for g in opt.param_groups] == \
        [len(g["params"]) for g in _learner("bp").optimizers["adamw"].param_groups]


@pytest.mark.parametrize("shape", [(384, 128), (96, 384), (128, 128)])
def test_newton_schulz_macs_match_torchs_iteration(shape):
    """Hand count, and the matmuls torch's own Newton-Schulz performs (addmm: 2 flops/MAC)."""
    m, n = sorted(shape)
    assert newton_schulz_macs(shape, 5) == 5 * (2 * m * m * n + m**3)
    with FlopCounterMode(display=False) as counter:
        _zeropower_via_newtonschulz(torch.randn(shape), (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, 1e-7)
    assert counter.get_total_flops() == 2 * newton_schulz_macs(shape, 5)


# ----------------------------------------------------------------------------- dbp_ref

def test_dbp_ref_layers_have_the_reference_settings():
    study = DBPConfig(decor_lr=2e-3, kappa=0.3, sample_frac=0.2, every=4, stabilize="project")
    learner = _learner("dbp_ref", study)
    d = learner.dbp_cfg
    assert (d.decor_lr, d.kappa, d.sample_frac, d.include) == (2e-3, 0.3, 0.2, study.include)
    assert (d.every, d.stabilize, d.variant) == (1, "none", "standard")
    mods = {n: m for n, m in learner.model.named_modules() if isinstance(m, DecorMixin)}
    assert isinstance(mods["patch_embed.proj"], DecorPatchEmbed) and len(mods) == 1 + 16
    for m in mods.values():
        assert (m.fused, m.variance_term, m.replacement, m.center) == (False, "column", True, False)


@pytest.mark.parametrize("d, n", [(6, 40), (16, 20)], ids=["sums", "rows"])
def test_dbp_ref_r_follows_a_hand_written_reference_loop(d, n):
    """Column variance term, rows drawn with replacement: R step for step against
    test_rule's element-wise float64 rule, with the indices drawn as the layer draws them."""
    settings = get_arm("dbp_ref").dbp_settings(DBPConfig(decor_lr=0.05, kappa=0.3, sample_frac=0.5))
    net = torch.nn.Sequential(torch.nn.Linear(d, 4))
    (layer,) = decorrelate(net, ["0"], seed=3, **settings.layer_options())
    driver, gen, rng = DBP([layer]), torch.Generator().manual_seed(3), np.random.default_rng(0)
    r = np.eye(d)
    for _ in range(6):
        x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
        net(torch.from_numpy(x).float())
        driver.step()
        idx = torch.randint(n, (round(0.5 * n),), generator=gen).numpy()
        r = reference_step(r, x[idx] @ r.T, 0.05, 0.3, "standard", "column")
    assert len(set(idx)) < len(idx)  # repeats: drawn with replacement
    assert np.abs(r - np.eye(d)).max() > 1e-2  # R moved
    np.testing.assert_allclose(layer.R.double().numpy(), r, rtol=1e-4, atol=1e-5)


def test_dbp_ref_equals_the_fused_path_with_the_same_settings():
    ref = get_arm("dbp_ref").dbp_settings(DBPConfig(decor_lr=1e-2, kappa=0.3))
    unfused, fused = _learner("dbp_ref", ref), _learner("dbp", dataclasses.replace(ref, fused=True))
    batches = [_batch(s) for s in range(3)]
    np.testing.assert_allclose(_losses(unfused, 6, batches), _losses(fused, 6, batches), rtol=1e-4)
    pairs = list(zip(decor_modules(unfused.model), decor_modules(fused.model), strict=True))
    assert len(pairs) == 17 and max(float((a.R - torch.eye(len(a.R))).abs().max()) for a, _ in pairs) > 1e-3
    for a, b in pairs:
        torch.testing.assert_close(a.R, b.R, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- names

def test_unknown_arm_is_one_line_at_load_time_and_on_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("arms: [x, bp]\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    assert str(err.value) == ("arms[0]: unknown arm 'x'; known arms: "
                              f"{', '.join(sorted(REGISTRY))}")
    with pytest.raises(ConfigError, match=r"^arm_overrides.y: unknown arm 'y'"):
        load_config(None, ["arm_overrides={y: {blr: 1.0}}"])
    done = subprocess.run([sys.executable, "-m", "dbp", "pretrain", "--arm", "nope", "--seed", "0",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("dbp pretrain: --arm: unknown arm 'nope'; known arms: bp, cadamw")


def test_dry_run_plans_every_arm_on_the_smoke_study(tmp_path):
    arms = tmp_path / "arms.yaml"
    arms.write_text("arms: [bp, dbp, identity, cadamw, muon, dbp_ref]\n")
    jobs = _dry_run_jobs(tmp_path, "--configfile", _config("smoke.yaml"), str(arms))
    # 5 tuned arms (identity is a control): the scored seed's base runs of 6 arms and one ladder
    # scale of 5 in one job, 2 learning rates x 5 arms on the tuning seed in one; alone: BP on
    # the target seed and BP at dbp's wall-clock (probe's equal-compute run); fine-tunes of
    # each tuned arm + scratch; one probe job per seed
    assert jobs == {"all": 1, "study_config": 1, "embedded_data": 1, "subset_manifest": 3,
                    "pretrain": 1 + 1, "pretrain_scored": 1, "pretrain_trials": 1, "select": 1,
                    "stepcost": 1, "equal_compute": 1, "finetune": 6, "probe": 1, "summarize": 1,
                    "figures": 1}


# ----------------------------------------------------------------------------- runs, export

@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = make_embedded(tmp_path_factory.mktemp("data") / "emb", seed=0, imagenet_per_class=2,
                         imagenet_val_per_class=1, ade_train=2, ade_val=1, image_size=32)
    return root / "imagenet"


@pytest.mark.parametrize("arm", ["muon", "dbp_ref"])
def test_runs_record_their_split_and_cost_and_export_as_plain_encoders(arm, imagenet, tmp_path, capsys):
    cfg = load_config(None, ["data.kind=imagenet", f"data.root={imagenet}", "data.num_workers=0",
                             "pretrain.batch_size=8", "pretrain.steps=2", "pretrain.warmup_steps=1",
                             "pretrain.eval_every=2", "energy.enabled=false"])
    info = pretrain(RunSpec.from_study(cfg, arm, 0, tmp_path / "run"))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == run["status"] == "finished" and run["config"]["optimizer"]["kind"] == \
        ("muon" if arm == "muon" else "adamw")
    if arm == "muon":
        assert run["optimizers"]["muon"]["tensors"] == 20 and run["dbp_macs_per_step"] == 0
        assert run["optimizer_macs_per_step"] == sum(newton_schulz_macs(s, 5) for s in TINY_HIDDEN)
    else:  # the unfused forward and the patch embedding reach the cost model
        d = get_arm("dbp_ref").dbp_settings(cfg.dbp)
        assert run["dbp_macs_per_step"] == step_macs(build_mae(TINY.model), 8, [*d.include, PATCH_EMBED],
                                                     d.sample_frac, 1, False)[1] > 0
        assert run["config"]["dbp"]["patch_embed"] is True and run["config"]["dbp"]["fused"] is False
    main(["export", "--pretrain-run", str(tmp_path / "run"), "--out", str(tmp_path / "enc.pth")])
    assert "52 tensors load" in capsys.readouterr().out
    meta = torch.load(tmp_path / "enc.pth", weights_only=False)["meta"]
    assert meta["arm"] == arm and (meta["dbp"] is None) == (arm == "muon")
