"""DBP as the authors' reference code computes it: R x per token (unfused), the variance
term as the code writes it (`v * R`, i.e. R diag(v): the column form), token rows drawn
with replacement, uncentred statistics, the patch embedding decorrelated too, an R step
after every optimizer step, no projection. Layers (include), decor_lr, kappa and
sample_frac are the study's, so it differs from `dbp` only in how DBP is computed."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from dbp.arms._base import Arm

if TYPE_CHECKING:
    from dbp.config import DBPConfig

REFERENCE = dict(fused=False, variance_term="column", replacement=True, patch_embed=True,
                 center=False, variant="standard", stabilize="none", every=1)


def reference(study: DBPConfig) -> DBPConfig:
    """The study's DBP settings with the reference code's choices."""
    return dataclasses.replace(study, **REFERENCE)


ARM = Arm("dbp_ref", color="C3", about="DBP as the reference code computes it (unfused, column, "
          "with replacement, patch embedding too), AdamW", decor=reference)
