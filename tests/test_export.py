"""Export of the fused encoder to mmseg's MAE backbone: keys, completeness, equal features."""
import dataclasses

import pytest
import torch

from dbp.cli import main
from dbp.config import DBPConfig
from dbp.decorrelate import decor_modules, decorrelate
from dbp.export import (INIT_KEY_SUFFIXES, ExportError, build_backbone, check_export,
                        compare_features, export_encoder, to_mmseg_keys)
from dbp.model import build_mae, encoder_state_dict

MODEL = "mae_vit_tiny_patch4_32"


def write_final_pt(path, *, dbp: bool, seed: int = 0):
    """A pre-training run's final.pt (pretrain's format) for a perturbed tiny MAE; with DBP,
    its R matrices are moved away from the identity. Returns the (unfused) model."""
    torch.manual_seed(seed)
    model = build_mae(MODEL, norm_pix_loss=True)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial biases, norms and embeddings
            p.add_(0.05 * torch.randn_like(p))
    dbp_cfg = DBPConfig(patch_embed=True) if dbp else None
    if dbp_cfg is not None:
        decorrelate(model, dbp_cfg.patterns(), **dbp_cfg.layer_options())
        with torch.no_grad():
            for m in decor_modules(model):
                m.R.add_(0.1 * torch.randn_like(m.R))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_name": MODEL, "model_kwargs": {"mask_ratio": 0.75, "norm_pix_loss": True},
                "dbp": dataclasses.asdict(dbp_cfg) if dbp_cfg else None,
                "state_dict": model.state_dict(),
                "arm": "dbp" if dbp else "bp", "seed": seed, "step": 7}, path)
    return model.eval()


def test_key_conversion_follows_mmseg():
    sd = {k: torch.zeros(1) for k in (
        "cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.11.norm2.weight",
        "blocks.11.mlp.fc1.weight", "blocks.11.mlp.fc2.bias", "norm.weight", "norm.bias")}
    assert sorted(to_mmseg_keys(sd)) == sorted([
        "cls_token", "pos_embed", "patch_embed.projection.weight", "layers.0.ln1.bias",
        "layers.0.attn.qkv.weight", "layers.0.attn.proj.bias", "layers.11.ln2.weight",
        "layers.11.ffn.layers.0.0.weight", "layers.11.ffn.layers.1.bias"])


@pytest.mark.parametrize("dbp", [False, True], ids=["bp", "dbp"])
def test_export_loads_completely_with_equal_features(tmp_path, dbp):
    model = write_final_pt(tmp_path / "run" / "final.pt", dbp=dbp)
    out = tmp_path / "encoder.pth"
    info = export_encoder(tmp_path / "run" / "final.pt", out)
    assert info["arm"] == ("dbp" if dbp else "bp") and info["step"] == 7
    assert info["model_name"] == MODEL and len(info["source_sha256"]) == 64

    # independently of the self-check: mmseg's own strict=False load reports no missing
    # encoder weight and ignores nothing
    saved = torch.load(out, weights_only=False)
    backbone = build_backbone(MODEL)
    result = backbone.load_state_dict(saved["state_dict"], strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.endswith(INIT_KEY_SUFFIXES) for k in result.missing_keys)
    assert info["check"]["loaded_keys"] == len(saved["state_dict"]) == 52

    # the backbone, loaded the way mmseg does, computes the *unfused* pre-trained encoder
    loaded = build_backbone(MODEL, checkpoint=out)
    assert compare_features(loaded, model, seed=1) < 1e-4
    assert info["check"]["max_abs_feature_diff"] < 1e-4


def test_dbp_export_differs_from_its_unfused_weights(tmp_path):
    """Guards the test above: with R away from I, dropping R would change the features."""
    model = write_final_pt(tmp_path / "final.pt", dbp=True)
    export_encoder(tmp_path / "final.pt", tmp_path / "enc.pth")
    fused = torch.load(tmp_path / "enc.pth", weights_only=False)["state_dict"]
    raw = model.state_dict()
    assert not torch.allclose(fused["layers.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])
    assert torch.equal(fused["layers.0.attn.qkv.bias"], raw["blocks.0.attn.qkv.bias"])


def _export_with(tmp_path, edit):
    write_final_pt(tmp_path / "final.pt", dbp=False)
    export_encoder(tmp_path / "final.pt", tmp_path / "good.pth")
    ckpt = torch.load(tmp_path / "good.pth", weights_only=False)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "bad.pth")
    return tmp_path / "bad.pth"


def test_check_names_a_key_mmseg_would_ignore(tmp_path):
    def rename(ckpt):
        sd = ckpt["state_dict"]
        sd["blocks.0.attn.qkv.weight"] = sd.pop("layers.0.attn.qkv.weight")
    bad = _export_with(tmp_path, rename)
    with pytest.raises(ExportError, match=r"layers\.0\.attn\.qkv\.weight.*blocks\.0\.attn\.qkv"):
        check_export(bad)


def test_check_rejects_a_wrapper_mmseg_does_not_unwrap(tmp_path):
    def rewrap(ckpt):
        ckpt["model"] = ckpt.pop("state_dict")
    with pytest.raises(ExportError, match="no top-level 'state_dict'"):
        check_export(_export_with(tmp_path, rewrap))


def test_check_rejects_wrong_shapes_and_other_features(tmp_path):
    def shrink(ckpt):
        ckpt["state_dict"]["pos_embed"] = ckpt["state_dict"]["pos_embed"][..., :64]
    with pytest.raises(ExportError, match="does not fit"):
        check_export(_export_with(tmp_path, shrink))
    other = write_final_pt(tmp_path / "other" / "final.pt", dbp=False, seed=1)
    with pytest.raises(ExportError, match="features differ"):
        check_export(tmp_path / "good.pth", reference=other)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/final.pt"):
        export_encoder(tmp_path / "nowhere" / "final.pt", tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        check_export(tmp_path / "absent.pth")
    assert not (tmp_path / "x.pth").exists()


def test_encoder_state_dict_matches_export_apart_from_final_norm(tmp_path):
    model = write_final_pt(tmp_path / "final.pt", dbp=False)
    export_encoder(tmp_path / "final.pt", tmp_path / "enc.pth")
    exported = torch.load(tmp_path / "enc.pth", weights_only=False)["state_dict"]
    assert len(exported) == len(encoder_state_dict(model)) - 2  # norm.weight, norm.bias


def test_cli_export(tmp_path, capsys):
    write_final_pt(tmp_path / "run" / "final.pt", dbp=True)
    main(["export", "--pretrain-run", str(tmp_path / "run"), "--out", str(tmp_path / "e.pth")])
    assert "52 tensors load" in capsys.readouterr().out
    assert (tmp_path / "e.pth").is_file()


def _one_line_exit(argv, *names):
    """Run the CLI in-process: it must stop with exit status 1 and one line naming `names`."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg, msg  # sys.exit(str): one line on stderr, status 1
    for n in names:
        assert str(n) in msg
    return msg


def test_cli_bad_checkpoints_are_one_line_and_leave_nothing(tmp_path):
    """Issue 11, fault 5: a run folder without final.pt, a truncated or corrupt final.pt, a
    corrupt --pretrained: one line naming the file, exit 1, no output folder or temp file."""
    write_final_pt(tmp_path / "good" / "final.pt", dbp=False)
    data = (tmp_path / "good" / "final.pt").read_bytes()
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "final.pt").write_bytes(data[:len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside a tensor's storage: only its CRC tells
    (tmp_path / "crc").mkdir()
    (tmp_path / "crc" / "final.pt").write_bytes(bytes(flipped))
    before = sorted(p for p in tmp_path.rglob("*"))
    out = tmp_path / "out" / "export" / "enc.pth"
    assert "not found" in _one_line_exit(["export", "--pretrain-run", str(tmp_path / "empty_run"),
                                          "--out", str(out)], tmp_path / "empty_run" / "final.pt")
    assert "not a readable" in _one_line_exit(["export", "--pretrain-run", str(tmp_path / "cut"),
                                               "--out", str(out)], tmp_path / "cut" / "final.pt")
    assert "CRC error" in _one_line_exit(["export", "--pretrain-run", str(tmp_path / "crc" / "final.pt"),
                                          "--out", str(out)], tmp_path / "crc" / "final.pt")
    ft = tmp_path / "out" / "finetune"
    _one_line_exit(["finetune", "--pretrained", str(tmp_path / "cut" / "final.pt"), "--seed", "0",
                    "--out", str(ft)], tmp_path / "cut" / "final.pt")
    assert sorted(p for p in tmp_path.rglob("*")) == before  # no out/, no .tmp files


# ----------------------------------------------------------------------------- safe loading
# Issue 11, fault 8: a shared checkpoint must never run code when loaded.

class _RunsCode:
    """Unpickling this runs `touch <marker>`: what a malicious shared .pth would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def write_malicious(path, marker):
    """A .pth shaped like dbp's files whose unpickling would create `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_name": MODEL, "state_dict": {"w": torch.zeros(1)}, "meta": {},
                "run_digest": "x", "payload": _RunsCode(marker)}, path)
    return path


def test_the_malicious_file_really_runs_code_when_unpickled_unsafely(tmp_path):
    evil = write_malicious(tmp_path / "evil.pth", tmp_path / "ran")
    torch.load(evil, weights_only=False)  # the old loaders' call
    assert (tmp_path / "ran").exists()


def test_export_and_pretrained_loaders_refuse_a_malicious_file_unrun(tmp_path):
    from mmengine.runner.checkpoint import CheckpointLoader

    from dbp._compat import UnsafeCheckpointError
    from dbp.config import ConfigError
    from dbp.export import read_export
    marker = tmp_path / "pwned"
    evil = write_malicious(tmp_path / "run" / "final.pt", marker)
    out = tmp_path / "enc.pth"
    calls = [lambda: export_encoder(evil, out),            # dbp export
             lambda: read_export(evil),                      # dbp finetune --pretrained
             lambda: check_export(evil),
             lambda: CheckpointLoader.load_checkpoint(str(evil))]  # mmengine: Pretrained, resume
    for call in calls:
        with pytest.raises(UnsafeCheckpointError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{evil}: refusing to load") and "system" in msg and "\n" not in msg
        assert isinstance(e.value, ConfigError)  # dbp's main() prints it as one line
    assert not marker.exists() and not out.exists()


def test_cli_export_of_a_malicious_checkpoint_is_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = write_malicious(tmp_path / "run" / "final.pt", marker)
    with pytest.raises(SystemExit) as e:
        main(["export", "--pretrain-run", str(tmp_path / "run"), "--out", str(tmp_path / "e.pth")])
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg and msg.startswith("dbp export: ")
    assert f"{evil}: refusing to load this pre-training checkpoint" in msg
    assert not marker.exists() and not (tmp_path / "e.pth").exists()


def test_exports_and_mmengine_checkpoints_still_load_safely(tmp_path):
    import numpy as np
    from mmengine.logging import HistoryBuffer, MessageHub
    from mmengine.runner.checkpoint import CheckpointLoader

    from dbp._compat import UnsafeCheckpointError, safe_load
    write_final_pt(tmp_path / "final.pt", dbp=True)
    export_encoder(tmp_path / "final.pt", tmp_path / "enc.pth")
    enc = torch.load(tmp_path / "enc.pth", weights_only=True)  # the suite's own: plain types
    assert enc["meta"]["arm"] == "dbp" and enc["meta"]["step"] == 7
    assert torch.equal(safe_load(tmp_path / "enc.pth")["state_dict"]["cls_token"],
                       enc["state_dict"]["cls_token"])

    # an mmengine resume checkpoint: message hub of HistoryBuffers (numpy inside), numpy meta
    hub = MessageHub("safe-load-test")
    for v in (1.5, 2.5, 4.0):
        hub.update_scalar("train/loss", v)
    hub.update_scalar("train/lr", np.float64(0.1))
    hub.update_info("iter", 3)
    torch.save({"meta": {"iter": 3, "seed": np.int64(5)}, "message_hub": hub.state_dict(),
                "state_dict": {"w": torch.ones(2)}}, tmp_path / "iter_3.pth")
    ck = CheckpointLoader.load_checkpoint(str(tmp_path / "iter_3.pth"))
    loss = ck["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(loss, HistoryBuffer)
    assert loss.mean() == pytest.approx(8.0 / 3) and loss.current() == 4.0
    assert loss.min() == 1.5 and loss.max() == 4.0
    assert ck["message_hub"]["log_scalars"]["train/lr"].current() == pytest.approx(0.1)
    assert ck["meta"]["seed"] == 5 and ck["message_hub"]["runtime_info"]["iter"] == 3

    # the getattr allowed for HistoryBuffer's statistics reaches nothing else
    class Reach:
        def __reduce__(self):
            return getattr, (HistoryBuffer, "__init__")

    torch.save({"x": Reach()}, tmp_path / "reach.pth")
    with pytest.raises(UnsafeCheckpointError, match="reach.pth: refusing"):
        CheckpointLoader.load_checkpoint(str(tmp_path / "reach.pth"))


def test_encoder_for_exports_a_run_folder_once_and_passes_an_export_through(tmp_path):
    from dbp.export import encoder_for, read_export
    write_final_pt(tmp_path / "run" / "final.pt", dbp=True)
    out = encoder_for(tmp_path / "run", tmp_path / "probe")
    assert out == tmp_path / "probe" / "encoder.pth" and read_export(out)[1]["arm"] == "dbp"
    first = out.read_bytes()
    assert encoder_for(tmp_path / "run", tmp_path / "probe") == out and out.read_bytes() == first  # kept
    write_final_pt(tmp_path / "run" / "final.pt", dbp=True, seed=1)  # another final.pt: exported anew
    encoder_for(tmp_path / "run", tmp_path / "probe")
    assert out.read_bytes() != first
    assert encoder_for(out, tmp_path / "elsewhere") == out and not (tmp_path / "elsewhere").exists()
    with pytest.raises(FileNotFoundError, match="pre-training checkpoint .*empty.final.pt not found"):
        (tmp_path / "empty").mkdir()
        encoder_for(tmp_path / "empty", tmp_path / "x")
