"""DBP: the decorrelated layers of the study's `dbp` section (the paper's method, in this
suite's fused form by default), trained with MAE's AdamW."""
from dbp.arms._base import Arm, as_configured

ARM = Arm("dbp", color="C1", about="decorrelated layers as the study's dbp section sets them, AdamW",
          decor=as_configured)
