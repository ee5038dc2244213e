"""The linear probe of a frozen encoder: its records, a backbone left untouched, repeatable
scores, no stale reuse, and one-line errors from `dbp probe`."""
import json
import subprocess
import sys

import pytest
import torch
from test_export import MODEL
from test_segment import ade, encoder  # noqa: F401  (the same tiny ADE data and DBP export)

from dbp.cli import main
from dbp.config import ProbeConfig
from dbp.datasets import read_class_names
from dbp.export import build_backbone
from dbp.seg_probe import load_probe_data, normaliser, patch_targets, probe, probe_backbone

TINY = ProbeConfig(heads=2, train_images=6, steps=6, batch_tokens=128)


def _probe(out, ade, pretrained, settings=TINY, seed=0):
    return probe(out, data=load_probe_data(ade, settings, MODEL), settings=settings, pretrained=pretrained,
                 seed=seed, model_name=MODEL, resolved_config=None)


def test_probe_writes_its_records(ade, encoder, tmp_path):
    m = _probe(tmp_path / "run", ade, encoder)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == json.loads(json.dumps(m))
    assert 0.0 <= m["mIoU"] <= 1.0 and 0.0 <= m["aAcc"] <= 1.0 and len(m["mIoU_heads"]) == 2
    assert m["mIoU"] == pytest.approx(sum(m["mIoU_heads"]) / 2)
    assert list(m["per_class_iou"]) == read_class_names(ade) and m["num_classes"] == 19
    assert all(v is None or 0.0 <= v <= 1.0 for v in m["per_class_iou"].values())
    assert m["arm"] == "dbp" and m["heads"] == 2 and m["train_images"] == 6 and m["val_images"] == 2
    assert m["blocks"] == [0, 1, 2, 3] and m["feature_dim"] == 4 * 128  # UperNet's taps
    assert m["features"] == "standardised"
    assert m["seconds"] > 0 and 0 < m["train_patches"] <= 6 * 16 * 16  # 32 px mosaics in 2 x 2 tiles
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "finished" and run["pretrained_meta"]["arm"] == "dbp"
    assert len(run["run_digest"]) == 64 and "git_commit" in run["provenance"]
    assert _probe(tmp_path / "run", ade, encoder) == m  # finished: reused, not repeated


def test_the_frozen_backbone_is_left_untouched(ade, encoder):
    backbone = build_backbone(MODEL, checkpoint=encoder)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    encoder_bytes = encoder.read_bytes()
    out = probe_backbone(backbone, load_probe_data(ade, TINY, MODEL), settings=TINY, seed=0, size=32, patch=4)
    assert 0.0 <= out["mIoU"] <= 1.0
    after = backbone.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert encoder.read_bytes() == encoder_bytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="deterministic on CPU only")
def test_same_encoder_and_seed_give_the_same_score(ade, encoder, tmp_path):
    first, second = (_probe(tmp_path / d, ade, encoder) for d in ("a", "b"))
    assert first["mIoU_heads"] == second["mIoU_heads"] and first["per_class_iou"] == second["per_class_iou"]
    scratch = [_probe(tmp_path / d, ade, None, seed=3) for d in ("c", "d")]
    assert scratch[0]["arm"] == "scratch" and scratch[0]["mIoU"] == scratch[1]["mIoU"]


def test_a_changed_setting_or_encoder_is_never_reused(ade, encoder, tmp_path, capsys):
    assert _probe(tmp_path, ade, encoder)["steps"] == 6
    longer = ProbeConfig(**{**TINY.__dict__, "steps": 7})
    assert _probe(tmp_path, ade, encoder, settings=longer)["steps"] == 7
    assert "starting over" in capsys.readouterr().out
    assert _probe(tmp_path, ade, None, settings=longer)["arm"] == "scratch"


def test_patch_targets_are_class_frequencies_and_the_features_normalised():
    labels = torch.tensor([[[0, 0, 1, 255], [0, 1, 1, 255], [255] * 4, [255] * 4]])
    t = patch_targets(labels, 2, 3).reshape(2, 2, 3)
    assert t[0, 0].tolist() == [0.75, 0.25, 0.0] and t[0, 1].tolist() == [0.0, 1.0, 0.0]
    assert t[1].sum() == 0  # no labelled pixel: no target
    mixing = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0]
    x = 5.0 + torch.randn(20_000, 6, generator=torch.Generator().manual_seed(1)) * torch.arange(1.0, 7.0) @ mixing
    assert torch.allclose(normaliser(x, whiten=True)(x).T.cov(), torch.eye(6), atol=0.03)
    standardised = normaliser(x, whiten=False)(x)
    assert torch.allclose(standardised.var(0), torch.ones(6), atol=1e-3)
    assert torch.allclose(standardised.mean(0), torch.zeros(6), atol=1e-3)


def test_cli_probe_names_a_missing_encoder_in_one_line(ade, tmp_path):
    out = subprocess.run([sys.executable, "-m", "dbp", "probe", "--set", "finetune.kind=ade20k",
                          "--set", f"finetune.root={ade}", "--encoder", "scratch=none",
                          "--encoder", f"bp={tmp_path / 'missing.pth'}", "--seed", "0",
                          "--out", str(tmp_path / "probe")], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"dbp probe: pretrained encoder {tmp_path / 'missing.pth'} not found"]
    assert not list((tmp_path / "probe").rglob("*.json"))  # checked before any encoder was probed


def test_cli_probe_names_a_bad_config_key(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["probe", "--set", "probe.stepz=5", "--encoder", "scratch=none", "--seed", "0",
              "--out", str(tmp_path / "run")])
    assert str(e.value.code).startswith("dbp probe: config error: probe.stepz: unknown key")
    assert "\n" not in str(e.value.code)
