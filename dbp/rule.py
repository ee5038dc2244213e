"""The decorrelation update rule as pure tensor functions (see docs/method.md).

Statistics are kept as sums (sum z z^T, sum z, row count) so that micro-batches and
ranks combine by plain addition before one update.
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


def decor_gradient(x: Tensor, r: Tensor, kappa: float, variant: str, variance_term: str) -> Tensor:
    """The step direction G such that R <- R - eta * G.

    standard:   (1 - kappa) C R + kappa diag(v) R   ("row"; "column" uses R diag(v))
    normalized: C term divided by (d - 1), v term doubled.
    with C = X - diag(diag X) and v = diag(X) - 1.
    """
    d = x.shape[0]
    diag = torch.diagonal(x)
    c = x - torch.diag_embed(diag)
    v = diag - 1.0
    c_scale, v_scale = (1.0, 1.0) if variant == "standard" else (1.0 / max(d - 1, 1), 2.0)
    g = ((1.0 - kappa) * c_scale) * (c @ r)
    if variance_term == "row":
        return g + (kappa * v_scale) * (v[:, None] * r)
    return g + (kappa * v_scale) * (r * v[None, :])


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
    """One update R <- R - eta G, returned (R itself is untouched).

    stabilize="project" uses G P instead, P the orthogonal projector onto the input span.
    """
    g = decor_gradient(x, r, kappa, variant, variance_term)
    if stabilize == "project":
        q = input_span_basis(x, r)
        g = (g @ q) @ q.T
    return r - decor_lr * g
