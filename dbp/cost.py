"""Hardware-free cost model of DBP's extra work (pure Python, no torch), shared by the
training side, which records it in run.json, and the cost benchmark."""
from __future__ import annotations

from collections.abc import Iterable


def dbp_extra_macs_parts(layer_shapes: Iterable[tuple[int, int]], tokens: int,
                         sample_frac: float, every: int, fused: bool) -> dict[str, float]:
    """DBP's extra multiply-accumulates per training step, split as the benchmark times
    them (fwd, bwd, stats, update), for layers of (out, d) = (output width, input width)
    that each see `tokens` rows per step.

    Fused: A = W R in the forward and the gradient dL/dA R^T in the backward (out d^2
    each). Unfused: R x for every token and its backward (tokens d^2 each). Statistics and
    update every `every` steps, on the n = max(1, round(f tokens)) sampled rows, as
    dbp.layers computes them: fewer rows than features, z = x R^T (fused only; unfused
    reuses z) and the step from the rows, z^T (z R) (2 n d^2); else z and Z^T Z (n d^2
    each) and the step from the sums, X R (d^3).
    """
    n = max(1, round(sample_frac * tokens))
    parts = {"fwd": 0.0, "bwd": 0.0, "stats": 0.0, "update": 0.0}
    for out, d in layer_shapes:
        rows = out if fused else tokens
        parts["fwd"] += rows * d**2
        parts["bwd"] += rows * d**2
        z = n * d**2 if fused else 0.0
        parts["stats"] += (z if n < d else z + n * d**2) / every
        parts["update"] += (2 * n * d**2 if n < d else d**3) / every
    return parts


def dbp_extra_macs(layer_shapes: Iterable[tuple[int, int]], tokens: int, sample_frac: float,
                   every: int, fused: bool) -> float:
    """Total of `dbp_extra_macs_parts`."""
    return sum(dbp_extra_macs_parts(layer_shapes, tokens, sample_frac, every, fused).values())


def newton_schulz_macs(shape: tuple[int, int], steps: int) -> float:
    """Multiply-accumulates of Muon's orthogonalisation of one (a, b) update, as
    torch.optim.Muon computes it: on X of shape (m, n), m = min(a, b) <= n (it transposes a
    tall matrix), each of `steps` iterations forms A = X X^T (m^2 n), B = b A + c A A (m^3)
    and X <- a X + B X (m^2 n). Once per optimizer step, whatever the batch."""
    m, n = sorted(shape)
    return float(steps * (2 * m * m * n + m**3))
