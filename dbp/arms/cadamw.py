"""Cautious AdamW (timm's `cadamw`): AdamW that skips the update entries whose momentum
disagrees with the gradient. An optimizer-only rival with a published MAE pre-training
speed-up of up to 1.47x (Liang et al. 2024, "Cautious Optimizers")."""
from dbp.arms._base import AdamW, Arm

ARM = Arm("cadamw", color="C5", about="cautious AdamW (timm's cadamw), same groups as AdamW",
          optimizer=AdamW(caution=True))
