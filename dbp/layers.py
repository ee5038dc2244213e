"""Decorrelated layers: y = W (R x) + b with a decorrelation matrix R learned beside W.

R is a buffer (the optimizer never sees it), initialised to the identity and kept in fp32
even under AMP. The fused forward forms A = W R once per call and applies A to the tokens,
so DBP costs 2 x out x d^2 per layer and step instead of one R x per token (the reference
code's unfused way, kept as `fused=False`). Statistics come from a random subsample of the
token rows, drawn from the layer's own generator so that they cannot shift the global RNG.
"""
from __future__ import annotations

from collections.abc import Iterable
from itertools import accumulate

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dbp.rule import (STABILIZERS, VARIANCE_TERMS, VARIANTS, decor_loss, decor_step, decor_step_rows,
                      mean_abs_corr, second_moment)


def patches(x: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, H', W', C*kh*kw): the non-overlapping patches a kernel = stride
    conv sees, flattened in its weight's (C, kh, kw) order (remainders dropped, as the conv)."""
    kh, kw = kernel_size
    b, c, h, w = x.shape
    hp, wp = h // kh, w // kw
    x = x[..., : hp * kh, : wp * kw].reshape(b, c, hp, kh, wp, kw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, hp, wp, c * kh * kw)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _check_options(sample_frac: float, kappa: float, decor_lr: float, variant: str,
                   variance_term: str, stabilize: str) -> None:
    if not 0.0 < sample_frac <= 1.0:
        raise ValueError(f"sample_frac must be in (0, 1], got {sample_frac}")
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa must be in [0, 1], got {kappa}")
    if decor_lr < 0.0:
        raise ValueError(f"decor_lr must be >= 0, got {decor_lr}")
    for name, value, allowed in (("variant", variant, VARIANTS),
                                 ("variance_term", variance_term, VARIANCE_TERMS),
                                 ("stabilize", stabilize, STABILIZERS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")


class DecorMixin:
    """State and update shared by the decorrelated linear and patch-embedding layers.

    Subclasses provide `_input_rows(x)` (the layer input as rows of width d) and call
    `_collect` in their forward. The statistics are sums, so several forwards (gradient
    accumulation) pool into one update, and ranks pool by one all-reduce.
    """

    R: Tensor

    def _init_decor(self, d: int, *, fused: bool, sample_frac: float, replacement: bool,
                    decor_lr: float, kappa: float, variant: str, variance_term: str,
                    center: bool, stabilize: str, generator: torch.Generator | None,
                    seed: int, device=None) -> None:
        _check_options(sample_frac, kappa, decor_lr, variant, variance_term, stabilize)
        self.fused, self.sample_frac, self.replacement = fused, sample_frac, replacement
        self.decor_lr, self.kappa, self.variant = decor_lr, kappa, variant
        self.variance_term, self.center, self.stabilize = variance_term, center, stabilize
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.register_buffer("R", torch.eye(d, dtype=torch.float32, device=device))
        self.collecting = True  # DBP turns this off on steps that are not followed by an update
        self._last: Tensor | tuple[Tensor, Tensor, float] | None = None  # the last update's statistics
        self.reset_stats()

    def reset_stats(self) -> None:
        self._rows: list[Tensor] = []  # sampled z rows, while they are fewer than the features
        self._zz: Tensor | None = None  # then their sums: sum z z^T, sum z
        self._z_sum: Tensor | None = None
        self._n = 0

    def _sample(self, rows: Tensor) -> Tensor:
        n = rows.shape[0]
        k = max(1, round(self.sample_frac * n))
        if k == n and not self.replacement:
            return rows
        if self.replacement:
            idx = torch.randint(n, (k,), generator=self.generator)
        else:
            idx = torch.randperm(n, generator=self.generator)[:k]
        return rows[idx.to(rows.device)]

    @torch.no_grad()
    def _collect(self, rows: Tensor, decorrelated: bool = False) -> None:
        """Add z = R x over a subsample of `rows` (x, or z if `decorrelated`) to the statistics."""
        with _no_autocast(rows.device):
            dtype = torch.promote_types(rows.dtype, self.R.dtype)  # >= fp32 under AMP
            sub = self._sample(rows.detach()).to(dtype)
            self._rows.append(sub if decorrelated else sub @ self.R.T.to(dtype))
        self._n += self._rows[-1].shape[0]
        if self._n * _world_size() >= self.R.shape[0]:
            self._fold()

    def _fold(self) -> None:
        """Rows into sums: once the rows (over all ranks) outnumber the d features, the d x d
        form is the cheaper one to keep, to all-reduce and to update from."""
        if not self._rows:
            return
        with _no_autocast(self.R.device):
            z = torch.cat(self._rows)
            zz, z_sum = z.T @ z, z.sum(0)
        self._rows = []
        if self._zz is None:
            self._zz, self._z_sum = zz, z_sum
        else:
            self._zz += zz
            self._z_sum += z_sum

    def _keeps_rows(self) -> bool:
        """Whether the next step is computed from the sampled rows themselves (`decor_step_rows`):
        while they are fewer, over all ranks, than the d features (else `_collect` folded them
        into d x d sums), and no projection needs X. Both forms give the same R."""
        return self._zz is None and self.stabilize == "none"

    def step_options(self, form: str) -> dict:
        """The rule's settings for a step from `form` ("rows" or "sums")."""
        opts = dict(decor_lr=self.decor_lr, kappa=self.kappa, variant=self.variant,
                    variance_term=self.variance_term)
        return {**opts, "center": self.center} if form == "rows" else {**opts, "stabilize": self.stabilize}

    def update(self) -> bool:
        """Apply one R step from the statistics gathered since the last update; returns
        whether there were any. The step is computed even when decor_lr = 0, so that
        arm pays the full cost (the overhead-only control). The loss and correlation of these
        statistics are computed only when read. `update_layers` steps many layers at once,
        batching those of one width; this is it for one layer."""
        return update_layers([self]) == 1

    def _last_sums(self) -> tuple[Tensor, Tensor, float] | None:
        if isinstance(self._last, Tensor):
            z = self._last
            return z.T @ z, z.sum(0), float(z.shape[0])
        return self._last

    @property
    def last_decor_loss(self) -> Tensor | None:
        """The decorrelation loss of the statistics behind the last update (None before one)."""
        sums = self._last_sums()
        return None if sums is None else decor_loss(second_moment(*sums, self.center), self.kappa)

    @property
    def last_mean_abs_corr(self) -> Tensor | None:
        """Mean |correlation| of z = R x over the statistics behind the last update."""
        sums = self._last_sums()
        return None if sums is None else mean_abs_corr(*sums)

    def _fused_matrix(self, w2d: Tensor) -> Tensor:
        """A = W R in at least R's fp32 precision, cast back to W's dtype (under AMP,
        autocast then decides the precision of the token matmul)."""
        dtype = torch.promote_types(w2d.dtype, self.R.dtype)
        with _no_autocast(w2d.device):
            return (w2d.to(dtype) @ self.R.to(dtype)).to(w2d.dtype)

    def decor_extra_repr(self) -> str:
        return (f"fused={self.fused}, sample_frac={self.sample_frac}, decor_lr={self.decor_lr}, "
                f"kappa={self.kappa}, variant={self.variant}, variance_term={self.variance_term}, "
                f"center={self.center}, stabilize={self.stabilize}")


def _pool(layers: list[DecorMixin]) -> None:
    """Every rank's statistics into every rank's layers, so that every rank applies the same
    step and R stays identical everywhere: the rows of all layers that keep rows in one
    all-gather, the sums of all others in one all-reduce (one call of each per dtype, not one
    per layer)."""
    world = _world_size()
    if world == 1:
        return
    kinds: dict[tuple, list[DecorMixin]] = {}
    for m in layers:
        kinds.setdefault((m._keeps_rows(), m.R.dtype, m.R.device), []).append(m)
    for (rows, _, _), group in kinds.items():
        if rows:
            _gather_rows(group, world)
        else:
            _reduce_sums(group)


def _gather_rows(group: list[DecorMixin], world: int) -> None:
    """All ranks' sampled rows, in rank order (every rank samples as many as the others:
    equal batches)."""
    local = torch.cat([torch.cat(m._rows).reshape(-1) for m in group])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    at = 0
    for m in group:
        n, d = m._n, m.R.shape[0]
        m._rows, m._n = [p[at: at + n * d].view(n, d) for p in parts], n * world
        at += n * d


def _reduce_sums(group: list[DecorMixin]) -> None:
    """All ranks' sums z z^T, z and row counts, added."""
    buf = torch.cat([t.reshape(-1) for m in group for t in (m._zz, m._z_sum, m._z_sum.new_tensor([m._n]))])
    dist.all_reduce(buf)
    sizes = [m.R.shape[0] for m in group]
    ends = list(accumulate(d * d + d + 1 for d in sizes))
    counts = buf[[end - 1 for end in ends]].tolist()  # one device sync for all the counts
    for m, d, end, n in zip(group, sizes, ends, counts):
        start = end - (d * d + d + 1)
        m._zz, m._z_sum = buf[start: start + d * d].view(d, d), buf[start + d * d: end - 1]
        m._n = round(n)


def _step_input(m: DecorMixin) -> tuple[str, Tensor]:
    """A layer's pooled statistics as the step takes them: ("rows", z) or ("sums", X)."""
    if m._keeps_rows():
        z = m._last = torch.cat(m._rows)
        return "rows", z
    m._last = (m._zz, m._z_sum, float(m._n))
    return "sums", second_moment(m._zz, m._z_sum, m._n, m.center)


@torch.no_grad()
def update_layers(modules: Iterable[DecorMixin]) -> int:
    """One R step for every layer with statistics; returns how many stepped. Under
    torch.distributed the statistics of all layers are first pooled over the ranks in one
    collective call of each kind (`_pool`). Layers whose steps have the same form, shape and
    settings (a ViT's qkv, proj and fc1 all read width d) then step together: their R and
    statistics stacked, one batched product instead of one small product per layer (same R
    as `update()` each, up to rounding)."""
    live = [m for m in modules if m._n]
    for m in live:
        if not m._keeps_rows():
            m._fold()  # the rows a projection step needs as X
    _pool(live)
    groups: dict[tuple, tuple[str, dict, list[tuple[DecorMixin, Tensor]]]] = {}
    for m in live:
        form, t = _step_input(m)
        opts = m.step_options(form)
        alone = None if opts.get("stabilize", "none") == "none" else id(m)  # projection: 2-D only
        key = (form, tuple(t.shape), t.dtype, t.device, m.R.dtype, tuple(sorted(opts.items())), alone)
        groups.setdefault(key, (form, opts, []))[2].append((m, t))
    for form, opts, members in groups.values():
        step = decor_step_rows if form == "rows" else decor_step
        with _no_autocast(members[0][0].R.device):
            if len(members) == 1:
                (m, t), = members
                m.R.copy_(step(m.R, t, **opts))
            else:
                new = step(torch.stack([m.R for m, _ in members]),
                           torch.stack([t for _, t in members]), **opts)
                for (m, _), r in zip(members, new):
                    m.R.copy_(r)
        for m, _ in members:
            m.reset_stats()
    return sum(len(members) for _, _, members in groups.values())


_DEFAULTS = dict(fused=True, sample_frac=0.1, replacement=False, decor_lr=1e-3, kappa=1e-3,
                 variant="standard", variance_term="row", center=False, stabilize="none",
                 generator=None, seed=0)


class DecorLinear(DecorMixin, nn.Linear):
    """nn.Linear with input decorrelation; accepts inputs of any leading shape (..., d)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device=None, dtype=None, **options) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        unknown = set(options) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown DecorLinear options: {sorted(unknown)}")
        self._init_decor(in_features, device=device, **{**_DEFAULTS, **options})

    def fused_weight(self) -> Tensor:
        return self._fused_matrix(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        collect = self.training and self.collecting
        if self.fused:
            if collect:
                self._collect(x.reshape(-1, self.in_features))
            return F.linear(x, self.fused_weight(), self.bias)
        z = F.linear(x, self.R.to(x.dtype))  # R x for every token: the reference's cost
        if collect:
            self._collect(z.reshape(-1, self.in_features), decorrelated=True)
        return F.linear(z, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.decor_extra_repr()}"


class DecorPatchEmbed(DecorMixin, nn.Conv2d):
    """Patch-embedding conv (kernel = stride = patch, no padding) with R acting on the
    flattened (C, kh, kw) patch, so it fuses into the conv weight exactly like a linear."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int | tuple[int, int],
                 bias: bool = True, *, device=None, dtype=None, **options) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, patch_size, stride=patch_size,
                           bias=bias, device=device, dtype=dtype)
        unknown = set(options) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown DecorPatchEmbed options: {sorted(unknown)}")
        kh, kw = self.kernel_size
        self._init_decor(in_channels * kh * kw, device=device, **{**_DEFAULTS, **options})

    @property
    def patch_dim(self) -> int:
        return self.R.shape[0]

    def fused_weight(self) -> Tensor:
        w2d = self.weight.reshape(self.out_channels, -1)
        return self._fused_matrix(w2d).reshape_as(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        collect = self.training and self.collecting
        if self.fused:
            if collect:
                self._collect(patches(x, self.kernel_size).reshape(-1, self.patch_dim))
            return F.conv2d(x, self.fused_weight(), self.bias, self.stride)
        z = F.linear(patches(x, self.kernel_size), self.R.to(x.dtype))
        if collect:
            self._collect(z.reshape(-1, self.patch_dim), decorrelated=True)
        y = F.linear(z, self.weight.reshape(self.out_channels, -1), self.bias)
        return y.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.decor_extra_repr()}"
