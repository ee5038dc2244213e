"""What an arm is: the DBP settings it trains with and the optimizer(s) it builds.

Declarative and torch-free, because `dbp.config` validates a study's `arms:` against the
registry without loading torch; torch and timm are imported inside `build`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from dbp.cost import newton_schulz_macs

if TYPE_CHECKING:
    import torch

    from dbp.config import DBPConfig, PretrainConfig

    Optimizers = dict[str, torch.optim.Optimizer]

# Muon's hidden matrices: every encoder and decoder block's linear weights. The patch
# embedding, decoder_embed and decoder_pred map into or out of pixel space, which Muon's
# authors leave to AdamW, as they do every vector and token.
HIDDEN_WEIGHTS = r"(decoder_)?blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight"


@dataclass(frozen=True)
class AdamW:
    """MAE's optimizer: AdamW, betas (0.9, pretrain.beta2), decoupled weight decay on the
    weight matrices only (`dbp.model.param_groups`). `caution`: timm's cautious AdamW
    (`cadamw`), which drops the update entries whose momentum disagrees in sign with the
    gradient and rescales the others by the fraction dropped."""
    caution: bool = False

    @property
    def name(self) -> str:
        return "cadamw" if self.caution else "adamw"

    def build(self, model: torch.nn.Module, cfg: PretrainConfig, lr: float, device: torch.device,
              exclude: Collection[str] = ()) -> Optimizers:
        """One optimizer over every trainable parameter not in `exclude`."""
        import torch

        from dbp.model import param_groups  # imports dbp._compat before timm
        groups = param_groups(model, cfg.weight_decay, exclude)
        betas = (0.9, cfg.beta2)
        if self.caution:
            from timm.optim import create_optimizer_v2
            return {self.name: create_optimizer_v2(groups, "cadamw", lr=lr, betas=betas,
                                                   weight_decay=cfg.weight_decay)}
        return {self.name: torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")}

    def macs(self, optimizers: Optimizers) -> float:
        """Matmul work beyond BP's: none (AdamW is element-wise)."""
        return 0.0

    def settings(self) -> dict[str, Any]:
        return {"kind": self.name, **asdict(self)}


@dataclass(frozen=True)
class Muon:
    """torch.optim.Muon on the hidden weights (`hidden`, a regex over parameter names), AdamW
    on everything else, both from the one learning rate the schedule sets. With
    adjust_lr_fn="match_rms_adamw" Muon scales its orthogonalised update to AdamW's typical
    RMS (lr x 0.2 sqrt(max(rows, cols))), so AdamW's learning rate, schedule and weight decay
    serve both, and one learning rate per arm is tuned on the grid every arm gets."""
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr_fn: str = "match_rms_adamw"
    hidden: str = HIDDEN_WEIGHTS
    name = "muon"

    def hidden_names(self, model: torch.nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad and re.fullmatch(self.hidden, n)]

    def build(self, model: torch.nn.Module, cfg: PretrainConfig, lr: float,
              device: torch.device) -> Optimizers:
        import torch
        hidden = self.hidden_names(model)
        muon = torch.optim.Muon([model.get_parameter(n) for n in hidden], lr=lr,
                                weight_decay=cfg.weight_decay, momentum=self.momentum,
                                nesterov=self.nesterov, ns_steps=self.ns_steps,
                                adjust_lr_fn=self.adjust_lr_fn)
        return {self.name: muon, **AdamW().build(model, cfg, lr, device, exclude=set(hidden))}

    def macs(self, optimizers: Optimizers) -> float:
        """Newton-Schulz work per step (`dbp.cost.newton_schulz_macs`) over Muon's weights."""
        return sum(newton_schulz_macs(tuple(p.shape), g["ns_steps"])
                   for g in optimizers[self.name].param_groups for p in g["params"])

    def settings(self) -> dict[str, Any]:
        return {"kind": self.name, **asdict(self), "others": AdamW().settings()}


def as_configured(study: DBPConfig) -> DBPConfig:
    """The study's `dbp` section as it is."""
    return study


@dataclass(frozen=True)
class Arm:
    """One arm of a study. `decor` derives its DBP settings from the study's `dbp` section
    (None: no decorrelated layers); `optimizer` builds its optimizer(s); a control
    (`control_of`) is not tuned, gets no budget ladder and takes the winner of the arm it
    controls; `color` is its fixed colour in every figure."""
    name: str
    color: str
    about: str
    optimizer: AdamW | Muon = AdamW()
    decor: Callable[[DBPConfig], DBPConfig] | None = None
    control_of: str | None = None

    def dbp_settings(self, study: DBPConfig) -> DBPConfig | None:
        return None if self.decor is None else self.decor(study)

    def build_optimizers(self, model: torch.nn.Module, cfg: PretrainConfig, lr: float,
                         device: torch.device) -> Optimizers:
        """Name -> optimizer; together they cover every trainable parameter exactly once."""
        return self.optimizer.build(model, cfg, lr, device)

    def optimizer_macs(self, optimizers: Optimizers) -> float:
        return self.optimizer.macs(optimizers)
