"""Masked autoencoder (MAE) ViT after facebookresearch/mae `models_mae.py`, from timm parts.

Differences from the reference, all for the benchmark's paired randomness and accounting:
- masking is driven by caller-supplied noise (`forward(imgs, noise)`), so every arm of a seed
  sees the same masks and validation masks can be fixed per image (`fixed_mask_noise`);
- the mask ratio is a model attribute, so the analytic cost (`matmul_macs`) knows it;
- `param_groups` also exempts the cls/mask tokens from weight decay (timm's ViT convention;
  the reference's pre-training script decays them).

Module names follow timm's VisionTransformer (`patch_embed.proj`, `blocks.N.attn.qkv`, ...,
`norm`), so the encoder exports with plain timm keys, and the decoder lives under
`decoder_*` names that the encoder-only DBP regex cannot match.
"""
import dbp._compat  # noqa: F401  (must precede timm: see module docstring)

import math
from collections.abc import Collection, Sequence
from functools import partial

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from dbp.cost import dbp_extra_macs
from dbp.decorrelate import select_layers
from dbp.layers import DecorMixin
from dbp.presets import PRESETS  # plain data, torch-free (dbp.config reads it too)

_norm_layer = partial(nn.LayerNorm, eps=1e-6)
_ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")  # decoder_* names never match
_NO_DECAY_NAMES = frozenset({"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"})


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """MAE's get_1d_sincos_pos_embed_from_grid: (M,) positions -> (M, dim), float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1) * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed(dim: int, grid_size: int) -> Tensor:
    """MAE's get_2d_sincos_pos_embed with cls_token=True: (1, 1 + grid_size^2, dim), a zero
    row for the cls slot, then row-major patches with the column code first (as MAE, whose
    meshgrid(w, h) puts w first), so exported encoders carry MAE-identical embeddings."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return torch.cat([emb.new_zeros(1, dim), emb]).float().unsqueeze(0)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per image: the reference's int(L * (1 - ratio)); the epsilon stops float
    error (1 - 0.9 = 0.0999...) from dropping one more patch than intended."""
    return math.floor(num_patches * (1.0 - mask_ratio) + 1e-6)


def mask_noise(batch_size: int, num_patches: int, generator: torch.Generator) -> Tensor:
    """Training-mask noise from the caller's (CPU) generator, apart from the global RNG, so
    that arms drawing different amounts of global randomness still get the same masks."""
    return torch.rand(batch_size, num_patches, generator=generator)


def fixed_mask_noise(indices: Sequence[int] | Tensor, num_patches: int, seed: int = 0) -> Tensor:
    """Validation-mask noise (len(indices), L), each row seeded by (seed, image index) only,
    so an image gets the same mask in every arm, run and batch composition.

    Seeds go through numpy's SeedSequence: torch's CPU generator keeps only the low 32 bits
    of a seed, so packing (seed, index) into one torch seed would collide.
    """
    rows = [np.random.default_rng([seed, int(i)]).random(num_patches, dtype=np.float32)
            for i in indices]
    return torch.from_numpy(np.stack(rows))


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder on the visible patches and a light ViT decoder on all patches."""

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = False, mask_ratio: float = 0.75) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.in_chans, self.norm_pix_loss, self.mask_ratio = in_chans, norm_pix_loss, mask_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_norm_layer)
            for _ in range(depth))
        self.norm = _norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                  norm_layer=_norm_layer)
            for _ in range(decoder_depth))
        self.decoder_norm = _norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's initialize_weights, in its order (so in its RNG order). As there,
        only Linear biases are zeroed: the patch conv's bias keeps torch's default init."""
        grid = self.patch_embed.grid_size[0]
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], grid))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear map of the patch
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def num_visible(self) -> int:
        return num_visible(self.num_patches, self.mask_ratio)

    def patchify(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), each patch flattened pixel-major as the reference."""
        p, (h, w) = self.patch_embed.patch_size[0], self.patch_embed.grid_size
        b = imgs.shape[0]
        x = imgs.reshape(b, self.in_chans, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, h * w, p * p * self.in_chans)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) -> (B, C, H, W), the inverse of `patchify`."""
        p, (h, w) = self.patch_embed.patch_size[0], self.patch_embed.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, self.in_chans)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.in_chans, h * p, w * p)

    def random_masking(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keep the patches with the smallest noise (the reference's argsort), per image.

        Returns the kept tokens, the mask (B, L; 1 = removed) and the restoring permutation.
        """
        b, n, d = x.shape
        if noise.shape != (b, n):
            raise ValueError(f"noise must have shape {(b, n)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, : self.num_visible]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)  # fp32 even under autocast, as the loss sums it
        mask[:, : self.num_visible] = 0
        return x_kept, torch.gather(mask, 1, ids_restore), ids_restore

    def _patch_tokens(self, imgs: Tensor) -> Tensor:
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def _prepend_cls(self, x: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_encoder(self, imgs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible patches (+ cls): latent (B, 1 + visible, D), mask, ids_restore."""
        x, mask, ids_restore = self.random_masking(self._patch_tokens(imgs), noise)
        x = self._prepend_cls(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_encoder_features(self, imgs: Tensor) -> list[Tensor]:
        """Every encoder block's output (B, 1 + L, D) on all patches, before the final norm:
        what a timm ViT (or a segmentation backbone) loaded from `encoder_state_dict` sees."""
        x = self._prepend_cls(self._patch_tokens(imgs))
        feats = []
        for blk in self.blocks:
            x = blk(x)
            feats.append(x)
        return feats

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict the pixels of every patch (B, L, p*p*C) from the latent and mask tokens."""
        x = self.decoder_embed(latent)
        b, n_vis, d = x.shape
        masked = self.mask_token.expand(b, ids_restore.shape[1] + 1 - n_vis, -1)
        patches = torch.cat([x[:, 1:, :], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def target(self, imgs: Tensor) -> Tensor:
        """The regression target (B, L, p*p*C): patch pixels, normalised per patch by their
        mean and variance (eps 1e-6) when `norm_pix_loss`."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean over the removed patches of the per-patch mean squared error."""
        per_patch = ((pred - self.target(imgs)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, pred (B, L, p*p*C), mask (B, L; 1 = removed)) for masks drawn from `noise`."""
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def build_mae(name: str, **overrides) -> MaskedAutoencoderViT:
    """The preset `name`, with keyword overrides (e.g. norm_pix_loss=True, mask_ratio=0.6)."""
    if name not in PRESETS:
        raise ValueError(f"unknown MAE preset {name!r}; choose one of {sorted(PRESETS)}")
    return MaskedAutoencoderViT(**{**PRESETS[name], **overrides})


def param_groups(model: nn.Module, weight_decay: float,
                 exclude: Collection[str] = ()) -> list[dict]:
    """AdamW groups: no decay on biases, norm weights and other <= 1-D parameters, nor on
    the cls/mask tokens and position embeddings (timm's rule plus ViT's no_weight_decay
    list); frozen parameters and the names in `exclude` (another optimizer's) are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name in exclude:
            continue
        exempt = p.ndim <= 1 or name.endswith(".bias") or name in _NO_DECAY_NAMES
        (no_decay if exempt else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def encoder_state_dict(model: MaskedAutoencoderViT) -> dict[str, Tensor]:
    """The encoder's tensors under timm ViT keys (cls_token, pos_embed, patch_embed.proj.*,
    blocks.N.*, norm.*), no decoder or mask token. The tensors are the model's own (not
    copies). Refuses a model with DBP layers: their W alone is not the trained function,
    and a strict=False loader (mmseg) would drop the R keys silently; `fuse` it first."""
    decor = [n for n, m in model.named_modules() if isinstance(m, DecorMixin)]
    if decor:
        raise ValueError(f"encoder_state_dict: fuse the DBP layers first ({decor[:3]}...)")
    return {k: v for k, v in model.state_dict().items()
            if k in ("cls_token", "pos_embed") or k.startswith(_ENCODER_PREFIXES)}


def _linear_weights(module: nn.Module) -> int:
    """Sum of in x out over the Linear layers of `module`: MACs per token through it."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _attention_macs(blocks: nn.ModuleList, tokens: int) -> int:
    """q k^T and attn v: 2 x T^2 x (heads x head_dim) per block."""
    return sum(2 * tokens ** 2 * b.attn.num_heads * b.attn.head_dim for b in blocks)


def matmul_macs(model: MaskedAutoencoderViT, batch_size: int = 1) -> dict[str, int]:
    """Analytic multiply-accumulates of one forward pass, by part; the total is the sum.

    Counts what the reference computes: the patch embedding on all L patches (masking comes
    after it), the encoder and decoder_embed on 1 + visible tokens, the decoder blocks and
    decoder_pred on 1 + L tokens (the cls row is predicted, then dropped). Linear layers and
    the two attention matmuls only; norms, softmax, GELU, biases and the loss are left out
    (a few %). Hardware-free cost per step: a training step ~ 3 x this (the backward pass
    forms two products per forward one). DBP's extra work is counted by its own model.
    """
    enc_tokens, dec_tokens = 1 + model.num_visible, 1 + model.num_patches
    parts = {
        "patch_embed": model.num_patches * model.patch_embed.proj.weight.numel(),
        "encoder_linear": enc_tokens * _linear_weights(model.blocks),
        "encoder_attention": _attention_macs(model.blocks, enc_tokens),
        "decoder_embed": enc_tokens * _linear_weights(model.decoder_embed),
        "decoder_linear": dec_tokens * _linear_weights(model.decoder_blocks),
        "decoder_attention": _attention_macs(model.decoder_blocks, dec_tokens),
        "decoder_pred": dec_tokens * _linear_weights(model.decoder_pred),
    }
    return {k: batch_size * v for k, v in parts.items()}


def tokens_seen(name: str, model: MaskedAutoencoderViT) -> int:
    """Token rows per image through a layer (as `matmul_macs` counts them): every patch for
    the patch embedding, cls + every patch in the decoder, cls + visible in the encoder."""
    if name.startswith("patch_embed"):
        return model.num_patches
    return 1 + (model.num_patches if name.startswith("decoder") else model.num_visible)


def step_macs(model: MaskedAutoencoderViT, batch_size: int, patterns: Sequence[str],
              sample_frac: float, every: int, fused: bool) -> tuple[float, float]:
    """(MACs of one BP training step, DBP's extra MACs per step) on `batch_size` images.

    Recorded by the training side so that the results side never builds a model. A step is
    3 x the forward matmuls (the backward forms two products per forward one); the extra
    work follows `dbp.cost.dbp_extra_macs` over the layers whose names fully match one of
    `patterns` (none for plain BP), each with the tokens it sees. Layer names and weight
    shapes are the same before and after `decorrelate`, so either model gives the same count.
    """
    bp = 3.0 * sum(matmul_macs(model, batch_size).values())
    extra = sum(dbp_extra_macs([(m.weight.shape[0], m.weight[0].numel())],
                               batch_size * tokens_seen(name, model), sample_frac, every, fused)
                for name, m in (select_layers(model, patterns) if patterns else []))
    return bp, float(extra)
