"""The registry of arms: every module of this package whose name does not start with an
underscore defines one arm, `ARM`, named like the module (docs/arms.md). Adding an arm is
adding such a module and its test; the config, CLI, workflow, step-cost job, report and
figures take it from here. Torch-free (see `_base`).
"""
from __future__ import annotations

import importlib
import pkgutil

from dbp.arms._base import Arm

__all__ = ["REGISTRY", "Arm", "UnknownArmError", "controls", "get_arm"]


class UnknownArmError(ValueError):
    """An arm name that no module of dbp/arms defines."""


def _discover() -> dict[str, Arm]:
    """name -> arm, BP first, then by name (the order of tables and figures)."""
    found: dict[str, Arm] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        arm = importlib.import_module(f"{__name__}.{info.name}").ARM
        if arm.name != info.name:
            raise ValueError(f"dbp/arms/{info.name}.py defines arm {arm.name!r}; name it like its module")
        found[arm.name] = arm
    for arm in found.values():
        if arm.control_of is not None and arm.control_of not in found:
            raise ValueError(f"arm {arm.name!r} controls unknown arm {arm.control_of!r}")
    return dict(sorted(found.items(), key=lambda item: (item[0] != "bp", item[0])))


REGISTRY: dict[str, Arm] = _discover()


def get_arm(name: str) -> Arm:
    """The registered arm `name`; UnknownArmError naming every known arm otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownArmError(f"unknown arm {name!r}; known arms: {', '.join(sorted(REGISTRY))}") from None


def controls() -> dict[str, str]:
    """Control -> the arm it controls (controls are not tuned and get no budget ladder)."""
    return {name: arm.control_of for name, arm in REGISTRY.items() if arm.control_of}
