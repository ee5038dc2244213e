"""The decorrelation update rule as pure tensor functions (see docs/method.md).

An update needs X R, X = E[z z^T] the second moment of the decorrelated inputs z = R x.
From d x d sums (sum z z^T, sum z, row count), which micro-batches and ranks combine by
addition, that is one d^3 product (`decor_step`). From n < d sampled rows it is cheaper
as z^T (z R) / n (`decor_step_rows`). Both apply the same rule, and both take a batch of
layers as well (leading dimension: R (L, d, d) with X (L, d, d) or z (L, n, d)), so layers
of one width step in one batched product (`dbp.decorrelate.update_all`).
"""
from __future__ import annotations

import torch
from torch import Tensor

VARIANTS = ("standard", "normalized")
VARIANCE_TERMS = ("row", "column")
STABILIZERS = ("none", "project")


def second_moment(zz: Tensor, z_sum: Tensor, n: float, center: bool) -> Tensor:
    """X = E[z z^T], or the covariance when `center` (mean removed)."""
    x = zz / n
    if center:
        mu = z_sum / n
        x = x - torch.outer(mu, mu)
    return x


def _scales(d: int, kappa: float, variant: str) -> tuple[float, float]:
    """Weights (a, s) of the C term and the v term: G = a C R + s (v term)."""
    c_scale, v_scale = (1.0, 1.0) if variant == "standard" else (1.0 / max(d - 1, 1), 2.0)
    return (1.0 - kappa) * c_scale, kappa * v_scale


def decor_gradient(x: Tensor, r: Tensor, kappa: float, variant: str, variance_term: str) -> Tensor:
    """The step direction G such that R <- R - eta * G.

    standard:   (1 - kappa) C R + kappa diag(v) R   ("row"; "column" uses R diag(v))
    normalized: C term divided by (d - 1), v term doubled.
    with C = X - diag(diag X) and v = diag(X) - 1.
    """
    diag = torch.diagonal(x)
    c = x - torch.diag_embed(diag)
    v = diag - 1.0
    a, s = _scales(x.shape[0], kappa, variant)
    if variance_term == "row":
        return a * (c @ r) + s * (v[:, None] * r)
    return a * (c @ r) + s * (r * v[None, :])


def decor_loss(x: Tensor, kappa: float) -> Tensor:
    """((1 - kappa) sum C^2 + kappa sum v^2) / d^2, the quantity the rule descends."""
    d = x.shape[0]
    diag = torch.diagonal(x)
    off = (x * x).sum() - (diag * diag).sum()
    return ((1.0 - kappa) * off + kappa * ((diag - 1.0) ** 2).sum()) / (d * d)


def mean_abs_corr(zz: Tensor, z_sum: Tensor, n: float, eps: float = 1e-12) -> Tensor:
    """Mean |Pearson correlation| over off-diagonal pairs of the features of z."""
    cov = second_moment(zz, z_sum, n, center=True)
    std = torch.sqrt(torch.clamp(torch.diagonal(cov), min=eps))
    corr = cov / torch.outer(std, std)
    d = corr.shape[0]
    if d < 2:
        return corr.new_zeros(())
    return (corr.abs().sum() - torch.diagonal(corr).abs().sum()) / (d * (d - 1))


def input_span_basis(x: Tensor, r: Tensor, rel_tol: float = 1e-6) -> Tensor:
    """Orthonormal basis (d, k) of the span of the layer inputs behind the statistics x.

    x = R E[x_in x_in^T] R^T, so the input span is R^{-1} range(x). Updating R only on this
    span (R <- R - eta G P) leaves R fixed along directions where the input has no energy
    (e.g. the all-ones direction of LayerNorm outputs): nothing in the forward pass pushes
    back there, and the plain rule lets R grow without bound along them.
    """
    evals, evecs = torch.linalg.eigh(x)
    keep = evals > rel_tol * torch.clamp(evals.max(), min=torch.finfo(x.dtype).tiny)
    q, _ = torch.linalg.qr(torch.linalg.solve(r, evecs[:, keep]))
    return q


def _step_from_xr(r: Tensor, xr: Tensor, diag: Tensor, alpha: float, *, decor_lr: float,
                  kappa: float, variant: str, variance_term: str) -> Tensor:
    """R - eta G with G = a (X R - diag(X) R) + s (v term), given alpha X R (alpha = 1, or
    the 1/n that the row form has not applied yet): one scaled copy of R and one add."""
    a, s = _scales(r.shape[-1], kappa, variant)
    rows = 1.0 + decor_lr * a * diag  # the C term's - diag(X) R, folded into a row scaling
    if variance_term == "row":
        base = r * (rows - decor_lr * s * (diag - 1.0))[..., :, None]
    else:
        base = r * rows[..., :, None] - (decor_lr * s) * (r * (diag - 1.0)[..., None, :])
    return torch.add(base, xr, alpha=-decor_lr * a * alpha)


def decor_step(
    r: Tensor,
    x: Tensor,
    *,
    decor_lr: float,
    kappa: float,
    variant: str = "standard",
    variance_term: str = "row",
    stabilize: str = "none",
) -> Tensor:
    """One update R <- R - eta G from the second moment X (R itself is untouched); one
    d x d x d product.

    stabilize="project" uses G P instead, P the orthogonal projector onto the input span.
    """
    if stabilize == "project":
        g = decor_gradient(x, r, kappa, variant, variance_term)
        q = input_span_basis(x, r)
        return r - decor_lr * ((g @ q) @ q.T)
    return _step_from_xr(r, x @ r, torch.diagonal(x, dim1=-2, dim2=-1), 1.0, decor_lr=decor_lr,
                         kappa=kappa, variant=variant, variance_term=variance_term)


def decor_step_rows(
    r: Tensor,
    z: Tensor,
    *,
    decor_lr: float,
    kappa: float,
    variant: str = "standard",
    variance_term: str = "row",
    center: bool = False,
) -> Tensor:
    """`decor_step` from the n sampled rows z (n, d) themselves, never forming X = z^T z / n:
    X R = z^T (z R) / n costs 2 n d^2 instead of n d^2 + d^3, the cheaper form when n < d
    (a ViT's fc2, whose input is 4x wider than the rows a 10 % sample gives). Equal to
    `decor_step(r, second_moment(z^T z, sum z, n, center), ...)` up to rounding."""
    n = z.shape[-2]
    xr = z.mT @ (z @ r)
    diag = (z * z).sum(-2) / n
    if center:
        mu = z.mean(-2)
        xr = xr - n * (mu[..., :, None] * (mu[..., None, :] @ r))
        diag = diag - mu * mu
    return _step_from_xr(r, xr, diag, 1.0 / n, decor_lr=decor_lr, kappa=kappa,
                         variant=variant, variance_term=variance_term)
