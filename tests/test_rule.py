"""The update rule against an independent, element-wise implementation of method.md."""
import itertools

import numpy as np
import pytest
import torch

from dbp.rule import decor_loss, decor_step, decor_step_rows, mean_abs_corr, second_moment


def reference_step(r, z, eta, kappa, variant, variance_term):
    """method.md written out loop by loop in float64 numpy, from the samples z (n, d)."""
    n, d = z.shape
    x = z.T @ z / n
    c = np.array([[x[i, j] if i != j else 0.0 for j in range(d)] for i in range(d)])
    v = np.array([x[i, i] - 1.0 for i in range(d)])
    a, b = (1.0, 1.0) if variant == "standard" else (1.0 / (d - 1), 2.0)
    vterm = np.diag(v) @ r if variance_term == "row" else r @ np.diag(v)
    return r - eta * ((1 - kappa) * a * (c @ r) + kappa * b * vterm)


@pytest.mark.parametrize("variant,variance_term", list(itertools.product(
    ["standard", "normalized"], ["row", "column"])))
def test_one_step_matches_formula(variant, variance_term):
    rng = np.random.default_rng(0)
    d, n = 6, 40
    r = np.eye(d) + 0.2 * rng.standard_normal((d, d))  # R away from diagonal: row != column
    z = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    zt = torch.from_numpy(z)
    x = second_moment(zt.T @ zt, zt.sum(0), n, center=False)
    got = decor_step(torch.from_numpy(r), x, decor_lr=0.05, kappa=0.3, variant=variant,
                     variance_term=variance_term).numpy()
    want = reference_step(r, z, 0.05, 0.3, variant, variance_term)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_row_and_column_differ_once_r_is_not_diagonal():
    torch.manual_seed(0)
    r = torch.eye(4, dtype=torch.float64) + 0.3 * torch.randn(4, 4, dtype=torch.float64)
    z = torch.randn(50, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    x = second_moment(z.T @ z, z.sum(0), 50, center=False)
    row = decor_step(r, x, decor_lr=0.1, kappa=0.5, variance_term="row")
    col = decor_step(r, x, decor_lr=0.1, kappa=0.5, variance_term="column")
    assert (row - col).abs().max() > 1e-3
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(decor_step(eye, x, decor_lr=0.1, kappa=0.5, variance_term="row"),
                               decor_step(eye, x, decor_lr=0.1, kappa=0.5, variance_term="column"))


def test_center_removes_the_mean():
    z = torch.randn(1000, 3, dtype=torch.float64) + torch.tensor([5.0, -2.0, 1.0])
    x = second_moment(z.T @ z, z.sum(0), 1000, center=True)
    torch.testing.assert_close(x, torch.cov(z.T, correction=0))


def test_loss_and_correlation_values():
    x = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    # off-diagonal sum of squares 0.5, variance errors (1, 0): ((1-k) 0.5 + k 1) / 4
    assert decor_loss(x, 0.2).item() == pytest.approx((0.8 * 0.5 + 0.2 * 1.0) / 4)
    z = torch.randn(20000, 2, dtype=torch.float64)
    z[:, 1] = 0.6 * z[:, 0] + 0.8 * z[:, 1]  # correlation 0.6
    assert mean_abs_corr(z.T @ z, z.sum(0), 20000).item() == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize("variant,variance_term,center", list(itertools.product(
    ["standard", "normalized"], ["row", "column"], [False, True])))
def test_step_from_rows_equals_step_from_second_moment(variant, variance_term, center):
    """The row form (fewer rows than features: X R = z^T (z R) / n) is the same update."""
    gen = torch.Generator().manual_seed(1)
    d, n = 24, 9
    r = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.5
    opts = dict(decor_lr=0.05, kappa=0.3, variant=variant, variance_term=variance_term)
    want = decor_step(r, second_moment(z.T @ z, z.sum(0), n, center), **opts)
    got = decor_step_rows(r, z, center=center, **opts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got - r).abs().max() > 1e-3  # a real step
