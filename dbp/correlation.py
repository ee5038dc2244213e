"""Measure how correlated the inputs of chosen layers are, the same way for every arm.

For a decorrelated layer the measured input is z = R x (what W sees); for a plain layer it
is x. Forward hooks gather all rows of the probed batches, so BP is measured on the same
layers and the same (validation) data as DBP without changing its computation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dbp.decorrelate import select_layers
from dbp.layers import DecorMixin, patches
from dbp.rule import decor_loss, mean_abs_corr, second_moment


class InputCorrelationProbe:
    """Context manager: `with probe: model(val_batch)`, then `probe.result()`."""

    def __init__(self, model: nn.Module, include: Sequence[str], kappa: float = 1e-3) -> None:
        self.layers = select_layers(model, include)
        self.kappa = kappa
        self._stats: dict[str, list] = {}
        self._handles: list = []

    def __enter__(self) -> InputCorrelationProbe:
        self._stats = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            with torch.autocast(device_type=x.device.type, enabled=False):
                rows = _rows(module, x).double()
                if isinstance(module, DecorMixin):
                    rows = rows @ module.R.T.double()
                acc = self._stats.setdefault(name, [0.0, 0.0, 0])
                acc[0] = acc[0] + rows.T @ rows
                acc[1] = acc[1] + rows.sum(0)
                acc[2] += rows.shape[0]
        return hook

    def result(self) -> dict[str, float]:
        """Mean over layers of the decorrelation loss and mean |off-diagonal correlation|."""
        if not self._stats:
            return {"decor_loss": float("nan"), "mean_abs_corr": float("nan")}
        losses, corrs = [], []
        for zz, z_sum, n in self._stats.values():
            losses.append(decor_loss(second_moment(zz, z_sum, n, center=False), self.kappa))
            corrs.append(mean_abs_corr(zz, z_sum, n))
        return {"decor_loss": float(torch.stack(losses).mean()),
                "mean_abs_corr": float(torch.stack(corrs).mean())}


def _rows(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.Conv2d):  # patch embedding: rows are flattened (C, kh, kw) patches
        return patches(x, module.kernel_size).reshape(-1, module.in_channels * math.prod(module.kernel_size))
    return x.reshape(-1, x.shape[-1])
