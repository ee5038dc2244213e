"""DecorLinear / DecorPatchEmbed: fused = unfused, statistics, and that the method decorrelates."""
import pytest
import torch
from torch import nn

from dbp import DecorLinear, DecorPatchEmbed
from dbp.layers import update_layers
from dbp.rule import second_moment


def _moved(layer, scale=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    d = layer.R.shape[0]
    layer.R.copy_(torch.eye(d) + scale * torch.randn(d, d, generator=g))
    return layer


def _twin(layer_cls, *args, **kw):
    torch.manual_seed(0)
    a = layer_cls(*args, fused=True, **kw)
    b = layer_cls(*args, fused=False, **kw)
    b.load_state_dict(a.state_dict())
    _moved(a), _moved(b)
    return a, b


@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12)])
def test_fused_equals_unfused_forward_and_grads(shape):
    a, b = _twin(DecorLinear, 12, 9)
    x = torch.randn(*shape)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.bias.grad, b.bias.grad, rtol=1e-5, atol=1e-5)


def test_fused_equals_unfused_float64_exactly_enough():
    a, b = _twin(DecorLinear, 12, 9, dtype=torch.float64)
    x = torch.randn(4, 6, 12, dtype=torch.float64, requires_grad=True)
    a(x).sum().backward()
    ga = x.grad.clone()
    x.grad = None
    b(x).sum().backward()
    torch.testing.assert_close(ga, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-12, atol=1e-12)


def test_patch_embed_fused_equals_unfused_and_plain_conv():
    a, b = _twin(DecorPatchEmbed, 3, 8, 4)
    x = torch.randn(2, 3, 16, 18)  # 18 is not a multiple of 4: the conv drops the remainder
    ya, yb = a(x), b(x)
    assert ya.shape == (2, 8, 4, 4)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ya.square().sum().backward(), yb.square().sum().backward()
    torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-4, atol=1e-5)
    # R acts on the flattened (C, kh, kw) patch: with R = P a permutation, W R = W permuted
    conv = nn.Conv2d(3, 8, 4, stride=4)
    conv.load_state_dict({k: v for k, v in a.state_dict().items() if k != "R"})
    a.R.copy_(torch.eye(48))
    torch.testing.assert_close(a(x), conv(x))


def test_statistics_sampled_rows_and_fraction():
    layer = DecorLinear(4, 2, sample_frac=0.25)
    x = torch.randn(10, 8, 4)  # 80 rows -> 20 sampled
    layer(x)
    assert layer._n == 20
    layer(x)  # a second forward (gradient accumulation) pools its statistics
    assert layer._n == 40
    layer.eval()
    layer(x)
    assert layer._n == 40  # no statistics in eval mode


def test_full_sample_statistics_equal_second_moment_of_rx():
    layer = _moved(DecorLinear(5, 3, sample_frac=1.0))
    x = torch.randn(6, 7, 5)
    layer(x)
    z = x.reshape(-1, 5) @ layer.R.T
    layer._fold()
    torch.testing.assert_close(second_moment(layer._zz, layer._z_sum, layer._n, False),
                               z.T @ z / 42, rtol=1e-5, atol=1e-6)


def test_with_replacement_can_repeat_rows():
    layer = DecorLinear(3, 3, sample_frac=1.0, replacement=True)
    x = torch.arange(30.0).reshape(10, 3)
    layer(x)
    assert layer._n == 10
    layer._fold()
    assert not torch.allclose(layer._z_sum, x.sum(0))  # a draw with repeats (seed 0)


def test_subsampling_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    layer = DecorLinear(4, 4, sample_frac=0.5)
    torch.manual_seed(123)
    layer(torch.ones(10, 4))
    torch.testing.assert_close(torch.rand(3), expected)


def _correlated_source(d, seed=0):
    """Samples x = M g with a fixed mixing M that has a strong common mode."""
    gen = torch.Generator().manual_seed(seed)
    mix = (torch.randn(d, d, generator=gen) + 2.0 * torch.ones(d, d)) / d
    return lambda n: torch.randn(n, d, generator=gen) @ mix.T


@pytest.mark.parametrize("variance_term", ["row", "column"])
def test_repeated_updates_decorrelate_and_normalise(variance_term):
    sample = _correlated_source(8)
    layer = DecorLinear(8, 4, sample_frac=0.5, decor_lr=0.05, kappa=0.5,
                        variance_term=variance_term)
    first = None
    for _ in range(600):
        layer(sample(256))
        layer.update()
        first = first if first is not None else layer.last_mean_abs_corr.item()
    x = sample(20000)
    z = x @ layer.R.T
    corr = torch.corrcoef(z.T)
    off = (corr - torch.diag(torch.diagonal(corr))).abs().sum() / (8 * 7)
    assert first > 0.5
    assert off < 0.03  # from 0.82 in the input
    torch.testing.assert_close(z.var(0), torch.ones(8), atol=0.06, rtol=0)


def test_identity_arm_keeps_r_but_reports_statistics():
    layer = DecorLinear(6, 6, decor_lr=0.0, sample_frac=1.0)
    layer(_correlated_source(6)(100))
    layer.update()
    torch.testing.assert_close(layer.R, torch.eye(6), rtol=0, atol=0)
    assert layer.last_mean_abs_corr.item() > 0.5
    assert layer.update() is False  # nothing gathered since


@pytest.mark.parametrize("kwargs,match", [
    (dict(kappa=1.5), "kappa"), (dict(kappa=-0.1), "kappa"),
    (dict(sample_frac=0.0), "sample_frac"), (dict(sample_frac=1.2), "sample_frac"),
    (dict(variant="fancy"), "variant"), (dict(variance_term="diag"), "variance_term"),
    (dict(decor_lr=-1.0), "decor_lr"), (dict(stabilize="clip"), "stabilize"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecorLinear(4, 4, **kwargs)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="sample_fraction"):
        DecorLinear(4, 4, sample_fraction=0.1)


@pytest.mark.parametrize("center", [False, True])
def test_layer_steps_from_rows_and_from_sums_alike(center):
    """A wide layer (8 sampled rows < 32 features) keeps rows and steps from them; the same
    statistics folded into sums give the same R."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=gen) @ (torch.eye(32) + 0.3)
    opts = dict(sample_frac=0.5, decor_lr=0.05, kappa=0.2, center=center)
    rows, sums = DecorLinear(32, 4, **opts), DecorLinear(32, 4, **opts)
    rows(x), sums(x)
    assert rows._zz is None and len(rows._rows) == 1  # 8 rows kept as rows
    sums._fold()
    rows.update(), sums.update()
    torch.testing.assert_close(rows.R, sums.R, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rows.R, torch.eye(32))
    torch.testing.assert_close(rows.last_decor_loss, sums.last_decor_loss)


@pytest.mark.parametrize("variant", ["standard", "normalized"])
@pytest.mark.parametrize("variance_term", ["row", "column"])
@pytest.mark.parametrize("center", [False, True])
def test_batched_update_equals_per_layer_updates(variant, variance_term, center):
    """update_layers steps layers of one width together (rows form: 6 sampled rows < 24
    features; sums form: 12 rows >= 8 features) and gives each the R of its own update();
    a layer with other settings steps on its own, beside them."""
    opts = dict(sample_frac=0.5, decor_lr=0.05, kappa=0.2, variant=variant,
                variance_term=variance_term, center=center)
    shapes = [(24, 5), (24, 3), (8, 4), (8, 8), (8, 2)]

    def layers():
        out = []
        for i, (d_in, d_out) in enumerate(shapes):
            extra = dict(kappa=0.5) if i == 4 else {}
            out.append(_moved(DecorLinear(d_in, d_out, **{**opts, **extra}, seed=i), seed=i))
        return out

    batched, single = layers(), layers()
    for group in (batched, single):
        for i, m in enumerate(group):
            gen = torch.Generator().manual_seed(10 + i)
            d = m.R.shape[0]
            m(torch.randn(12 if d == 24 else 24, d, generator=gen) @ (torch.eye(d) + 0.3))
    assert batched[0]._zz is None and batched[2]._zz is not None  # both forms are covered
    assert update_layers(batched) == len(shapes)
    for a, b in zip(batched, single):
        assert b.update()
        torch.testing.assert_close(a.R, b.R, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a.R, torch.eye(a.R.shape[0]))
        torch.testing.assert_close(a.last_decor_loss, b.last_decor_loss)
        assert a._n == 0 and not a._rows and a._zz is None  # statistics cleared
    assert update_layers(batched) == 0
