"""The MAE model: masking from caller noise, loss, DBP surgery, export to timm, cost model."""
import dbp._compat  # noqa: F401  (must precede timm)

from functools import partial

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dbp import DecorLinear, DecorPatchEmbed, cost, decorrelate, fuse
from dbp.model import (PRESETS, build_mae, encoder_state_dict, fixed_mask_noise, mask_noise,
                       matmul_macs, num_visible, param_groups, step_macs)

TINY = "mae_vit_tiny_patch4_32"
ENCODER_LAYERS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
L = 64  # (32 / 4)^2 patches


def _tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_mae(TINY, **overrides)


def _batch(b: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), mask_noise(b, L, g)


def test_forward_shapes_and_mask_follow_noise():
    model = _tiny()
    imgs, noise = _batch()
    loss, pred, mask = model(imgs, noise)
    assert loss.shape == () and torch.isfinite(loss)
    assert pred.shape == (4, L, 4 * 4 * 3) and mask.shape == (4, L)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.sum(1).tolist() == [48.0] * 4  # L * 0.75 removed, 16 kept per image
    kept = noise.argsort(dim=1)[:, :16]  # the smallest noise is kept
    assert mask.gather(1, kept).sum() == 0


def test_backward_reaches_every_trainable_parameter_and_no_fixed_one():
    model = _tiny()
    model(*_batch())[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.parameters() if p.requires_grad)
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None


def test_same_noise_same_loss_different_noise_different_mask():
    imgs, noise = _batch()
    a, b = _tiny(seed=3), _tiny(seed=3)
    loss_a, _, mask_a = a(imgs, noise)
    loss_b, _, mask_b = b(imgs, noise.clone())
    assert torch.equal(loss_a, loss_b) and torch.equal(mask_a, mask_b)
    loss_c, _, mask_c = a(imgs, _batch(seed=2)[1])
    assert not torch.equal(mask_a, mask_c) and loss_c != loss_a


def test_noise_helpers_are_reproducible_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    first = mask_noise(2, L, torch.Generator().manual_seed(7))
    assert torch.equal(first, mask_noise(2, L, torch.Generator().manual_seed(7)))
    fixed = fixed_mask_noise([3, 5, 7], L)
    assert torch.equal(torch.get_rng_state(), state)
    assert fixed.shape == (3, L) and fixed.dtype == torch.float32


def test_fixed_mask_noise_is_independent_of_batch_composition():
    a = fixed_mask_noise([3, 5, 7], L)
    b = fixed_mask_noise(torch.tensor([5, 0]), L)
    assert torch.equal(a[1], b[0])  # image 5, in two different batches
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(fixed_mask_noise([5], L, seed=1)[0], a[1])
    # seeds are not packed into one 32-bit torch seed, so (seed, index) pairs do not collide
    assert not torch.equal(fixed_mask_noise([2 ** 32], L)[0], fixed_mask_noise([0], L)[0])


def test_patchify_layout_and_exact_round_trip():
    model = _tiny()
    imgs = _batch()[0]
    patches = model.patchify(imgs)
    assert patches.shape == (4, L, 48)
    # patch 1 is row 0, column 1, flattened (p, q, c) as in the reference
    assert torch.equal(patches[:, 1], imgs[:, :, 0:4, 4:8].permute(0, 2, 3, 1).reshape(4, 48))
    assert torch.equal(model.unpatchify(patches), imgs)


def test_norm_pix_loss_of_a_perfect_normalised_prediction_is_zero():
    model = _tiny(norm_pix_loss=True)
    imgs, noise = _batch()
    imgs = 0.5 + 0.2 * imgs  # pixel-like scale, so normalising changes the target a lot
    mask = model(imgs, noise)[2]
    raw = model.patchify(imgs)
    normalised = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert model.forward_loss(imgs, normalised, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert model.forward_loss(imgs, raw, mask).item() > 0.1
    plain = _tiny(norm_pix_loss=False)
    assert plain.forward_loss(imgs, raw, mask).item() == 0.0


def test_encoder_regex_selects_encoder_linears_only_and_keeps_the_loss():
    model = _tiny()
    imgs, noise = _batch()
    before = model(imgs, noise)[0]
    layers = decorrelate(model, [ENCODER_LAYERS])
    assert len(layers) == 16 and all(isinstance(m, DecorLinear) for m in layers)
    names = [n for n, m in model.named_modules() if isinstance(m, DecorLinear)]
    assert all(n.startswith("blocks.") for n in names)  # never decoder_blocks.*
    assert torch.equal(model(imgs, noise)[0], before)  # R = I: the same function, bit for bit


def test_patch_embedding_can_be_decorrelated():
    model = _tiny()
    imgs, noise = _batch()
    before = model(imgs, noise)[0]
    (layer,) = decorrelate(model, [r"patch_embed\.proj"])
    assert isinstance(layer, DecorPatchEmbed) and layer.R.shape == (48, 48)
    assert torch.equal(model(imgs, noise)[0], before)


def test_param_groups_split_every_trainable_parameter_once():
    model = _tiny()
    no_decay, decay = param_groups(model, weight_decay=0.05)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
    name_of = {id(p): n for n, p in model.named_parameters()}
    nd = {name_of[id(p)] for p in no_decay["params"]}
    d = {name_of[id(p)] for p in decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert nd.isdisjoint(d) and nd | d == trainable
    assert len(no_decay["params"]) + len(decay["params"]) == len(trainable)
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable
    assert {"cls_token", "mask_token"} <= nd
    assert all(n.endswith(".bias") or "norm" in n for n in nd - {"cls_token", "mask_token"})
    assert {n for n in trainable if n.endswith(".bias")} <= nd
    assert {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)} == \
        {n[: -len(".weight")] for n in nd if n.endswith(".weight")}
    assert all(model.get_parameter(n).ndim >= 2 and n.endswith(".weight") for n in d)
    assert "patch_embed.proj.weight" in d and "blocks.0.attn.qkv.weight" in d


def _timm_vit() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=2,
                             qkv_bias=True, class_token=True, global_pool="", num_classes=0,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))


def _block_outputs(vit: VisionTransformer, imgs: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in vit.blocks]
    final = vit.forward_features(imgs)
    for h in hooks:
        h.remove()
    return [*outs, final]


def _assert_matches_timm(model, imgs: torch.Tensor) -> None:
    vit = _timm_vit().eval()
    vit.load_state_dict(encoder_state_dict(model), strict=True)
    *vit_blocks, vit_final = _block_outputs(vit, imgs)
    with torch.no_grad():
        feats = model.forward_encoder_features(imgs)
    assert len(feats) == 4 and feats[0].shape == (4, 1 + L, 128)
    for ours, theirs in zip(feats, vit_blocks, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.norm(feats[-1]), vit_final, rtol=0, atol=1e-5)


def test_encoder_state_dict_loads_into_timm_vit_with_the_same_features():
    model = _tiny().eval()
    sd = encoder_state_dict(model)
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    _assert_matches_timm(model, _batch()[0])


def test_fused_dbp_encoder_exports_the_trained_function():
    model = _tiny().eval()
    layers = decorrelate(model, [ENCODER_LAYERS, r"patch_embed\.proj"])
    g = torch.Generator().manual_seed(0)
    for m in layers:  # a trained-looking R, far from I
        m.R.add_(0.05 * torch.randn(m.R.shape, generator=g))
    imgs = _batch()[0]
    with pytest.raises(ValueError, match="fuse"):
        encoder_state_dict(model)
    with torch.no_grad():
        decorrelated = model.forward_encoder_features(imgs)
    fuse(model)
    _assert_matches_timm(model, imgs)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_encoder_features(imgs)[-1], decorrelated[-1],
                                   rtol=0, atol=1e-5)


def test_fixed_sincos_pos_embed_matches_the_mae_reference():
    def one_d(dim, pos):  # facebookresearch/mae util/pos_embed.py, transcribed
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    model = _tiny()
    gs, dim = 8, 128
    grid = np.stack(np.meshgrid(np.arange(gs, dtype=np.float32), np.arange(gs, dtype=np.float32)))
    ref = np.concatenate([np.zeros((1, dim)),
                          np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], 1)])
    torch.testing.assert_close(model.pos_embed[0], torch.from_numpy(ref).float(), rtol=0, atol=1e-6)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert model.decoder_pos_embed.shape == (1, 1 + L, 96)


def test_init_follows_the_reference():
    model = _tiny()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            bound = (6 / (m.in_features + m.out_features)) ** 0.5  # xavier_uniform
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
            assert not m.bias.any(), name
        elif isinstance(m, nn.LayerNorm):
            assert (m.weight == 1).all() and not m.bias.any(), name
    # the patch conv: xavier as a 128 x 48 linear map; its bias keeps torch's default, as in
    # the reference (whose init zeroes only Linear biases)
    assert model.patch_embed.proj.weight.abs().max() <= (6 / (128 + 48)) ** 0.5
    assert model.patch_embed.proj.bias.abs().max() <= 48 ** -0.5
    for token in (model.cls_token, model.mask_token):
        assert 0.01 < token.std().item() < 0.03


def test_presets_and_overrides():
    with pytest.raises(ValueError, match="mae_vit_base_patch16"):
        build_mae("mae_vit_huge")
    model = _tiny(mask_ratio=0.5)
    assert model.num_visible == 32 and model(*_batch())[2].sum(1).tolist() == [32.0] * 4
    assert num_visible(100, 0.9) == 10  # int(100 * (1 - 0.9)) would give 9
    with torch.device("meta"):  # shapes only, no 300 M-parameter init
        large = build_mae("mae_vit_large_patch16")
    assert len(large.blocks) == 24 and large.blocks[0].attn.num_heads == 16
    assert large.decoder_embed.out_features == 512 and len(large.decoder_blocks) == 8
    assert set(PRESETS) == {"mae_vit_small_patch16", "mae_vit_base_patch16",
                            "mae_vit_large_patch16", TINY, "mae_vit_bench_patch4_32"}


def test_matmul_macs_by_hand_and_by_torch_flop_counter():
    model = _tiny()
    # tiny, per image: L = 64 patches of 48 values, 16 visible -> 17 encoder tokens, 65 decoder.
    by_hand = (64 * 48 * 128                                  # patch embedding, all patches
               + 4 * 17 * (3 * 128 ** 2 + 128 ** 2 + 2 * 128 * 512)  # qkv, proj, fc1, fc2
               + 4 * 2 * 17 ** 2 * 128                        # q k^T and attn v
               + 17 * 128 * 96                                # decoder_embed
               + 1 * 65 * (3 * 96 ** 2 + 96 ** 2 + 2 * 96 * 384)
               + 1 * 2 * 65 ** 2 * 96
               + 65 * 96 * 48)                                # decoder_pred
    assert by_hand == 22_566_592
    macs = matmul_macs(model, batch_size=2)
    assert sum(macs.values()) == 2 * by_hand
    # torch counts 2 FLOPs per MAC; the unfused attention path exposes its two bmm's.
    for blk in [*model.blocks, *model.decoder_blocks]:
        blk.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        model(*_batch(b=2))
    assert counter.get_total_flops() == 2 * 2 * by_hand


def test_matmul_macs_of_vit_base_is_plausible():
    with torch.device("meta"):
        model = build_mae("mae_vit_base_patch16")
    macs = matmul_macs(model, batch_size=1)
    # 9,781,133,312 MACs: encoder on 50 tokens 4.29 G (a full 197-token ViT-B is the usual
    # ~17.5 G), decoder 512 x 8 on 197 tokens 5.28 G, patch embedding 0.12 G.
    assert sum(macs.values()) == 9_781_133_312
    assert 4.2e9 < macs["encoder_linear"] + macs["encoder_attention"] < 4.4e9
    assert sum(matmul_macs(model, batch_size=8).values()) == 8 * 9_781_133_312


def test_step_macs_counts_the_matched_layers_with_their_tokens():
    model = _tiny()
    bp, extra = step_macs(model, 8, [ENCODER_LAYERS], 0.1, 2, True)
    assert bp == 3 * sum(matmul_macs(model, batch_size=8).values())
    # tiny: 4 blocks of qkv, proj, fc1, fc2 as (out, in), each on 8 x 17 encoder tokens
    blocks = [(384, 128), (128, 128), (512, 128), (128, 512)] * 4
    assert extra == pytest.approx(cost.dbp_extra_macs(blocks, 8 * 17, 0.1, 2, True), rel=1e-12)
    patch = cost.dbp_extra_macs([(128, 48)], 8 * L, 0.1, 2, True)  # every patch, unmasked
    _, with_patch = step_macs(model, 8, [ENCODER_LAYERS, r"patch_embed\.proj"], 0.1, 2, True)
    assert with_patch == pytest.approx(extra + patch, rel=1e-12)
    assert step_macs(model, 8, [], 0.1, 2, True) == (bp, 0.0)  # plain BP: no extra work
    decorrelate(model, [ENCODER_LAYERS])  # same names and shapes: the same count
    assert step_macs(model, 8, [ENCODER_LAYERS], 0.1, 2, True) == (bp, extra)


def test_extra_macs_follow_the_update_form_the_layer_uses():
    """n = 5 sampled rows < d = 16: z (n d^2) and z^T (z R) (2 n d^2); n = 20 >= 16: z and
    Z^T Z (n d^2 each) and X R (d^3). The fused forward and backward are out d^2 each."""
    rows_form = cost.dbp_extra_macs_parts([(8, 16)], 50, 0.1, 1, True)
    assert rows_form == {"fwd": 8 * 256, "bwd": 8 * 256, "stats": 5 * 256, "update": 2 * 5 * 256}
    sums_form = cost.dbp_extra_macs_parts([(8, 16)], 200, 0.1, 2, True)
    assert sums_form == {"fwd": 8 * 256, "bwd": 8 * 256, "stats": 2 * 20 * 256 / 2, "update": 16**3 / 2}
    unfused = cost.dbp_extra_macs_parts([(8, 16)], 50, 0.1, 1, False)
    assert unfused == {"fwd": 50 * 256, "bwd": 50 * 256, "stats": 0.0, "update": 2 * 5 * 256}
