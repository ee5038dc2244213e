"""Muon on the hidden weight matrices of every encoder and decoder block, AdamW on the rest:
an optimizer-only rival to DBP that also whitens the update, through Newton-Schulz
orthogonalisation instead of decorrelated inputs."""
from dbp.arms._base import Arm, Muon

ARM = Arm("muon", color="C4", about="torch.optim.Muon on the blocks' 2-D weights, AdamW on the rest",
          optimizer=Muon())
