"""BP: plain backpropagation with MAE's AdamW, the baseline that sets the target and that
every speed-up is measured against."""
from dbp.arms._base import Arm

ARM = Arm("bp", color="C0", about="backpropagation with MAE's AdamW (the baseline)")
