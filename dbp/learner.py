"""What one optimisation step touches, built from the config in one place: the MAE (DBP
layers swapped in for the DBP arms), AdamW, the loss scaler, the DBP driver, autocast.

`pretrain()` trains a Learner between validation points; `dbp.stepcost` times the Learners
of several arms side by side. Both therefore time exactly the same step.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dbp import DBP, decorrelate
from dbp.config import DBPConfig, PretrainConfig
from dbp.model import MaskedAutoencoderViT, build_mae, param_groups


def setup_device() -> tuple[torch.device, int, int]:
    """(device, rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world
    return torch.device("cpu"), rank, world


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 where supported on CUDA (no loss scaling needed), fp16 on request, else none."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda" and amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Learner:
    """One run's model, optimiser, scaler and DBP driver; `step()` is one optimiser step
    over `accum_steps` micro-batches. For a given seed every arm starts from the same
    weights; the DBP arms then swap their layers (R = identity at the start)."""

    def __init__(self, cfg: PretrainConfig, dbp_cfg: DBPConfig | None, seed: int,
                 device: torch.device, world: int = 1):
        torch.manual_seed(seed)
        self.model: MaskedAutoencoderViT = build_mae(cfg.model, mask_ratio=cfg.mask_ratio,
                                                     norm_pix_loss=cfg.norm_pix_loss)
        self.effective_batch = cfg.batch_size * cfg.accum_steps * world
        self.driver: DBP | None = None
        if dbp_cfg is not None:
            mods = decorrelate(self.model, dbp_cfg.patterns(), seed=seed, **dbp_cfg.layer_options())
            self.driver = DBP(mods, every=dbp_cfg.every)
        self.model.to(device)
        self.device, self.accum_steps, self.clip_grad = device, cfg.accum_steps, cfg.clip_grad
        self.peak_lr = cfg.blr * self.effective_batch / 256
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=self.peak_lr,
                                     betas=(0.9, cfg.beta2), fused=device.type == "cuda")
        self.amp_dtype = autocast_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.train_model: nn.Module = self.model
        if world > 1:  # R stays identical across ranks by all-reduce: no buffer broadcast needed
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def step(self, micro: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Forward and backward over the micro-batches (images, mask noise), the optimiser
        step, then DBP's R update when due. Returns the mean loss (a 0-d tensor, no sync)."""
        total = torch.zeros((), device=self.device)
        for imgs, noise in micro:
            imgs = imgs.to(self.device, non_blocking=True)
            with self.autocast():
                loss, _, _ = self.train_model(imgs, noise.to(self.device))
            self.scaler.scale(loss / self.accum_steps).backward()
            total += loss.detach().float() / self.accum_steps
        if self.clip_grad is not None:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.driver is not None:
            self.driver.step()
        return total

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(),
                "dbp": self.driver.state_dict() if self.driver else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.driver is not None:
            self.driver.load_state_dict(state["dbp"])
