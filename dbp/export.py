"""Export a pre-trained MAE encoder for mmsegmentation's MAE backbone, and prove it loads.

mmseg loads a backbone checkpoint (`init_cfg=dict(type='Pretrained', ...)`) with strict=False
and unwraps only a top-level 'state_dict': a misspelt key or a wrong wrapper leaves weights at
their random init and nothing complains (seen with mmseg 1.2.2). So the export checks its own
output the way mmseg reads it: every backbone weight must come from the file, and the
backbone's features must equal the fused encoder's.

Key mapping (mmseg's beit2mmseg converter): patch_embed.proj -> patch_embed.projection,
blocks. -> layers., norm1/norm2 -> ln1/ln2, mlp.fc1 -> ffn.layers.0.0, mlp.fc2 ->
ffn.layers.1. The final `norm.*` is dropped: the UperNet recipe's MAE backbone has
final_norm=False and taps the blocks before it (as `forward_encoder_features` does).
"""
from __future__ import annotations

from dbp._compat import mm_shims, safe_load  # first: before timm (see that module)

import contextlib
import hashlib
import io
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dbp.config import DBPConfig
from dbp.decorrelate import decorrelate, fuse
from dbp.provenance import provenance
from dbp.records import atomic_torch_save
from dbp.model import PRESETS, MaskedAutoencoderViT, build_mae, encoder_state_dict
from dbp.seg_recipe import mae_backbone_cfg

FORMAT = "dbp-export-v1: mmseg MAE backbone keys, DBP fused"
# Backbone entries with no counterpart in a plain ViT; they keep mmseg's init, which is the
# identity: zero relative-position bias (MAEAttention), layer scale 1 (init_values=1.0).
INIT_KEY_SUFFIXES = ("attn.relative_position_bias_table", "attn.relative_position_index",
                     "gamma_1", "gamma_2")
DROPPED_KEYS = ("norm.weight", "norm.bias")
_PREFIX_RENAMES = (("patch_embed.proj.", "patch_embed.projection."), ("blocks.", "layers."))
_INNER_RENAMES = ((".norm1.", ".ln1."), (".norm2.", ".ln2."), (".mlp.fc1.", ".ffn.layers.0.0."),
                  (".mlp.fc2.", ".ffn.layers.1."))
# Max abs feature difference allowed, relative to the features' largest magnitude (at least 1):
# float32 rounding gives 2e-7..6e-7 of it here; one weight left at init gives O(1).
FEATURE_TOLERANCE = 1e-5


class ExportError(ValueError):
    """An exported checkpoint that mmseg would not load completely or faithfully."""


def check_checkpoint_file(path: str | Path, what: str) -> Path:
    """`path` if it is an intact torch.save archive (what `dbp pretrain` and `dbp export`
    write: a zip whose every CRC is checked here, before torch unpickles anything); else
    FileNotFoundError or ExportError naming the file, so a truncated or corrupt checkpoint
    stops a command with one line instead of an unpickling traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ExportError(f"{path}: not a readable {what} (a torch.save zip archive): {e}") from None
    if bad is not None:
        raise ExportError(f"{path}: corrupt {what}: CRC error in {bad}")
    return path


def encoder_for(source: str | Path, export_dir: str | Path) -> Path:
    """The export a fine-tune or probe reads. `source` is an export (a file from `dbp
    export`), returned checked, or a pre-training run folder, whose fused encoder this process
    exports to export_dir/encoder.pth: one job instead of an export job (~7 s of start-up on
    2 cores) before it. An export of the same final.pt bytes already there is kept, so a
    re-run reads the same encoder bytes (the probe's digest keys on them)."""
    source = Path(source)
    if not source.is_dir():
        return check_checkpoint_file(source, "pretrained encoder")
    final = check_checkpoint_file(source / "final.pt", "pre-training checkpoint")
    out = Path(export_dir) / "encoder.pth"
    try:
        same = read_export(out)[1].get("source_sha256") == _sha256(final)
    except (OSError, ValueError, RuntimeError):  # none there yet, or unreadable: export
        same = False
    if not same:
        export_encoder(final, out)
    return out


# ----------------------------------------------------------------------------- conversion

def to_mmseg_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ViT encoder keys -> mmseg MAE backbone keys (the final norm dropped)."""
    out = {}
    for key, value in state.items():
        if key in DROPPED_KEYS:
            continue
        for old, new in _PREFIX_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        for old, new in _INNER_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


# ----------------------------------------------------------------------------- pre-trained model

def load_pretrained_mae(final_pt: str | Path) -> tuple[MaskedAutoencoderViT, dict]:
    """The MAE of a pre-training run's final.pt with DBP fused (W <- W R), and the raw file."""
    final_pt = Path(final_pt)
    if not final_pt.is_file():
        raise FileNotFoundError(f"pre-training checkpoint {final_pt} not found")
    ckpt = safe_load(final_pt, "cpu", what="pre-training checkpoint")
    model = build_mae(ckpt["model_name"], **ckpt["model_kwargs"])
    if ckpt["dbp"] is not None:  # recreate the R buffers so the saved ones load
        dbp_cfg = DBPConfig(**ckpt["dbp"])
        decorrelate(model, dbp_cfg.patterns(), **dbp_cfg.layer_options())
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return fuse(model).eval(), ckpt


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_encoder(final_pt: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Write the fused encoder of `final_pt` as {'state_dict', 'meta'} for mmseg, then check it.

    Returns the meta plus the check's report. Raises ExportError (and leaves no file) if mmseg
    would not load every weight or the backbone's features differ from the encoder's.
    """
    final_pt, out_path = Path(final_pt), Path(out_path)
    model, ckpt = load_pretrained_mae(final_pt)
    meta = {"format": FORMAT, "source": str(final_pt.resolve()), "source_sha256": _sha256(final_pt),
            "arm": ckpt["arm"], "seed": ckpt["seed"], "step": ckpt["step"],
            "model_name": ckpt["model_name"], "model_kwargs": ckpt["model_kwargs"],
            "dbp": ckpt["dbp"], "dropped_keys": list(DROPPED_KEYS), "provenance": provenance()}
    state = {k: v.detach().clone() for k, v in to_mmseg_keys(encoder_state_dict(model)).items()}
    atomic_torch_save({"state_dict": state, "meta": meta}, out_path)
    try:
        report = check_export(out_path, reference=model)
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    return {**meta, "check": report}


# ----------------------------------------------------------------------------- self-check

def read_export(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict, meta) of an export; raises naming the file if mmseg would unwrap nothing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained encoder {path} not found")
    raw = safe_load(path, "cpu", what="pretrained encoder")
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        found = sorted(raw)[:5] if isinstance(raw, dict) else type(raw).__name__
        raise ExportError(f"{path}: no top-level 'state_dict' (found {found}); mmseg would load "
                          "nothing from it. Export a pre-training run with `dbp export`.")
    return raw["state_dict"], raw.get("meta", {})


def _some(keys: list[str], n: int = 8) -> str:
    """At most n keys and the count, for error messages."""
    return f"{len(keys)}: {keys[:n]}{' ...' if len(keys) > n else ''}" if keys else "none"


def _is_init_key(key: str) -> bool:
    return key.endswith(INIT_KEY_SUFFIXES)


def build_backbone(model_name: str, checkpoint: str | Path | None = None, **cfg) -> torch.nn.Module:
    """The mmseg MAE backbone for `model_name`, initialised as mmseg does (init_weights),
    from `checkpoint` if given. mmengine's loader prints to stdout; that goes nowhere here."""
    mm_shims()
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    with warnings.catch_warnings():  # BEiT's torch.meshgrid without indexing=: harmless
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        backbone = MODELS.build(mae_backbone_cfg(model_name, checkpoint=checkpoint, **cfg))
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            backbone.init_weights()
        except RuntimeError as e:  # load_state_dict(strict=False) still rejects wrong shapes
            raise ExportError(f"{checkpoint}: does not fit the {model_name} backbone: {e}") from e
    return backbone


def _load_and_check_keys(path: str | Path, model_name: str | None) -> tuple[torch.nn.Module, dict]:
    """Load `path` into the mmseg backbone as mmseg does; raise ExportError naming every
    backbone weight not taken from the file, every file key the backbone ignores, and every
    weight whose loaded value differs from the file's."""
    state, meta = read_export(path)
    model_name = model_name or meta.get("model_name")
    if model_name not in PRESETS:
        raise ExportError(f"{path}: unknown model {model_name!r}; pass one of {sorted(PRESETS)}")
    if meta.get("model_name", model_name) != model_name:
        raise ExportError(f"{path}: exported from {meta['model_name']}, not {model_name}")
    backbone = build_backbone(model_name, checkpoint=path)
    loaded = backbone.state_dict()
    expected = {k for k in loaded if not _is_init_key(k)}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(loaded))
    differ = sorted(k for k in expected & set(state) if not torch.equal(loaded[k], state[k]))
    if missing or unexpected or differ:
        hint = (" It looks like a pre-training checkpoint: convert it with `dbp export`."
                if any(k.startswith(("blocks.", "decoder")) for k in unexpected) else "")
        raise ExportError(
            f"{path} does not load into mmseg's {model_name} backbone: "
            f"missing (would stay random) {_some(missing)}; ignored by mmseg "
            f"{_some(unexpected)}; loaded with other values {_some(differ)}.{hint}")
    return backbone, {"model_name": model_name, "loaded_keys": len(expected),
                      "init_keys": sorted(k for k in loaded if _is_init_key(k))}


@torch.no_grad()
def compare_features(backbone: torch.nn.Module, reference: MaskedAutoencoderViT,
                     batch: int = 2, seed: int = 0) -> float:
    """Max abs difference of every block's patch features, backbone vs `reference`, on one
    seeded random input at the pre-training size; raises ExportError beyond FEATURE_TOLERANCE."""
    size = reference.patch_embed.img_size[0]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    reference.eval()
    backbone.eval()  # mmseg's BEiT.train() returns None, so not chained
    ours, theirs = reference.forward_encoder_features(x), backbone(x)
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        a = a[:, 1:].transpose(1, 2).reshape(b.shape)  # drop cls, tokens -> (B, C, h, w)
        diff, scale = float((a - b).abs().max()), float(b.abs().max())
        worst = max(worst, diff)
        if diff > FEATURE_TOLERANCE * max(1.0, scale):
            raise ExportError(f"block {i}: mmseg backbone features differ from the fused "
                              f"encoder's (max abs diff {diff:.3g}, feature scale {scale:.3g})")
    return worst


def check_export(path: str | Path, reference: MaskedAutoencoderViT | None = None,
                 model_name: str | None = None) -> dict[str, Any]:
    """Check that mmseg loads every backbone weight of `path` (the model named by its meta, or
    `model_name`) and, given `reference` (the fused encoder), that the features are equal.
    Returns a report; raises FileNotFoundError or ExportError naming what is wrong."""
    backbone, report = _load_and_check_keys(path, model_name)
    if reference is not None:
        report["max_abs_feature_diff"] = compare_features(backbone, reference)
    return report
