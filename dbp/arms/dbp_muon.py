"""DBP's decorrelated layers (the study's `dbp` section) trained with Muon instead of AdamW:
whether the two speed-ups add up."""
from dbp.arms._base import Arm, Muon, as_configured

ARM = Arm("dbp_muon", color="C6", about="decorrelated layers as dbp, Muon as muon",
          optimizer=Muon(), decor=as_configured)
