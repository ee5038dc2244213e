"""The identity control: DBP's layers with decor_lr = 0, so R stays the identity. It pays
DBP's whole cost (statistics, R step, fusion) but computes BP's function exactly, which
separates the method's overhead from its effect (docs/protocol.md rule 6)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from dbp.arms._base import Arm

if TYPE_CHECKING:
    from dbp.config import DBPConfig


def inert(study: DBPConfig) -> DBPConfig:
    """The study's DBP settings with eta = 0."""
    return dataclasses.replace(study, decor_lr=0.0)


ARM = Arm("identity", color="C2", about="DBP's layers with decor_lr 0: its cost, BP's losses",
          decor=inert, control_of="bp")
