"""Model surgery for DBP: put decorrelated layers into a model, update them, fuse them away."""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from dbp.layers import DecorLinear, DecorMixin, DecorPatchEmbed, update_layers


def _is_patch_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == m.stride and m.groups == 1
            and m.dilation == (1, 1) and m.padding in ((0, 0), "valid")
            and m.padding_mode == "zeros")


def _decor_copy(m: nn.Module, name: str, options: dict) -> DecorMixin:
    """A decorrelated twin of `m` with the same weights (R = I, so the same function)."""
    dev = m.weight.device
    if isinstance(m, nn.Linear):
        new = DecorLinear(m.in_features, m.out_features, m.bias is not None,
                          device=dev, dtype=m.weight.dtype, **options)
    elif _is_patch_conv(m):
        new = DecorPatchEmbed(m.in_channels, m.out_channels, m.kernel_size, m.bias is not None,
                              device=dev, dtype=m.weight.dtype, **options)
    else:
        raise TypeError(f"{name!r} is a {type(m).__name__}; DBP supports nn.Linear and "
                        "patch-embedding nn.Conv2d (kernel = stride, no padding, groups = 1)")
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.train(m.training)
    return new


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _layer(m: nn.Module) -> bool:
    """A layer DBP works on: nn.Linear or a patch-embedding conv (decorrelated or not)."""
    return isinstance(m, nn.Linear) or _is_patch_conv(m)


def select_layers(model: nn.Module, include: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The layers (nn.Linear, patch-embedding nn.Conv2d: kernel = stride, no padding, groups
    = 1, dilation 1; decorrelated or not) that the regexes in `include` select, in model
    order. A pattern must fully match a qualified module name; it selects the matched module
    if it is such a layer, else every such layer *under* it (a container such as
    ``blocks.0.mlp``, or the whole model for ``.*``), as the reference implementation
    (artcogsys/decorbp) replaces every Linear of the model it is given. A matched module that
    is neither (a GELU, a LayerNorm, a padded conv) is not a candidate. A pattern that selects
    no layer is a ValueError naming it: a typo fails loudly instead of silently training BP.
    Decorrelation, the correlation probe and the MAC count all select layers here."""
    if isinstance(include, str):
        include = [include]
    named = list(model.named_modules())
    chosen: set[str] = set()
    unused: list[str] = []
    for p in map(re.compile, include):
        roots = [name for name, _ in named if p.fullmatch(name)]
        picked = {name for name, m in named if name and _layer(m)
                  and any(name == r or not r or name.startswith(r + ".") for r in roots)}
        if not picked:
            seen = ", ".join(f"{r or '<model>'} ({type(model.get_submodule(r)).__name__})"
                             for r in roots[:5])
            unused.append(f"{p.pattern}" + (f" [matched only {seen}]" if seen else ""))
        chosen |= picked
    if unused:
        raise ValueError(f"these patterns match no module of {type(model).__name__}: "
                         f"{'; '.join(unused)} (DBP works on nn.Linear and patch-embedding "
                         "nn.Conv2d, or those under a matched container)")
    return [(name, m) for name, m in named if name in chosen]


def decorrelate(model: nn.Module, include: Sequence[str], *, seed: int = 0,
                **layer_options) -> list[DecorMixin]:
    """Replace, in place, the layers `select_layers(model, include)` selects by decorrelated
    twins (R = I: the same function); return the new layers in model order.

    Already-decorrelated layers are left as they are. The conversion is all-or-nothing: the
    full plan is computed and every twin built before the first swap, so on any error the
    model is unchanged. All layers share one generator seeded with `seed` for their token
    subsampling, apart from the global RNG, so adding DBP does not change the batches, masks
    or dropout.
    """
    if _layer(model) and any(re.fullmatch(p, "") for p in ([include] if isinstance(include, str) else include)):
        raise ValueError(f"decorrelate: {type(model).__name__} is itself the layer to replace; "
                         "it cannot be swapped in place (wrap it in a container, or use "
                         "DecorLinear / DecorPatchEmbed directly)")
    try:
        chosen = [(n, m) for n, m in select_layers(model, include) if not isinstance(m, DecorMixin)]
    except ValueError as e:
        raise ValueError(f"decorrelate: {e}") from None
    generator = torch.Generator().manual_seed(seed)
    plan = [(name, _decor_copy(m, name, {**layer_options, "generator": generator})) for name, m in chosen]
    for name, new in plan:  # setattr on existing parents cannot fail half-way for valid names
        _set_submodule(model, name, new)
    return [new for _, new in plan]


def decor_modules(model: nn.Module) -> list[DecorMixin]:
    """The decorrelated layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, DecorMixin)]


def update_all(modules: Iterable[DecorMixin]) -> int:
    """One R step for every layer (call after optimizer.step()); returns how many layers had
    statistics to step from. Layers of one width step in one batched product
    (`dbp.layers.update_layers`)."""
    return update_layers(modules)


class DBP:
    """Drives the R updates of a model's decorrelated layers, optionally every k steps.

    Call `step()` after each `optimizer.step()`. On steps not followed by an update the
    layers gather no statistics, so k > 1 saves both the statistics and the update.
    """

    def __init__(self, modules: Sequence[DecorMixin], every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not modules:
            raise ValueError("DBP needs at least one decorrelated module")
        self.modules, self.every, self.steps = list(modules), every, 0
        self._arm_collection()

    def _arm_collection(self) -> None:
        collect = (self.steps + 1) % self.every == 0
        for m in self.modules:
            m.collecting = collect

    def step(self) -> bool:
        """Count one optimizer step; update R if it is due. Returns whether it updated."""
        self.steps += 1
        due = self.steps % self.every == 0
        if due:
            update_all(self.modules)
        self._arm_collection()
        return due

    def metrics(self) -> dict[str, float]:
        """Mean decorrelation loss and mean |off-diagonal correlation| of the layer inputs
        (z = R x) at the last update, over layers; NaN before the first update. Computed
        here, on request: the updates themselves never form them."""
        losses = [x for m in self.modules if (x := m.last_decor_loss) is not None]
        corrs = [x for m in self.modules if (x := m.last_mean_abs_corr) is not None]
        mean = lambda ts: float(torch.stack(ts).mean()) if ts else float("nan")  # noqa: E731
        return {"decor_loss": mean(losses), "mean_abs_corr": mean(corrs)}

    def state_dict(self) -> dict:
        """Counter and subsampling RNG (R itself lives in the model's state_dict)."""
        gens = {id(m.generator): m.generator for m in self.modules}
        return {"steps": self.steps, "every": self.every,
                "generators": [g.get_state() for g in gens.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        gens = {id(m.generator): m.generator for m in self.modules}
        for g, s in zip(gens.values(), state["generators"], strict=True):
            g.set_state(s)
        self._arm_collection()


def _plain_copy(m: DecorMixin) -> nn.Module:
    """The ordinary layer computing the same function: W <- W R, bias unchanged."""
    with torch.no_grad():
        if isinstance(m, DecorPatchEmbed):
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                            bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        else:
            new = nn.Linear(m.in_features, m.out_features, m.bias is not None,
                            device=m.weight.device, dtype=m.weight.dtype)
        new.weight.copy_(m.fused_weight())
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.train(m.training)
    return new


def fuse(model: nn.Module) -> nn.Module:
    """Fold every R into its weight (W <- W R) and return a plain model (changed in place;
    a model that is itself a decorrelated layer is returned as a new plain layer)."""
    if isinstance(model, DecorMixin):
        return _plain_copy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, DecorMixin)]
    for name in names:
        _set_submodule(model, name, _plain_copy(model.get_submodule(name)))
    return model
