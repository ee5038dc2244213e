"""What one optimisation step touches, built from the config in one place: the MAE (DBP
layers swapped in where the arm asks for them), the arm's optimizer(s), the loss scaler,
the DBP driver, autocast. The arm (dbp/arms/) decides; nothing here names one.

`pretrain()` trains a Learner between validation points; `dbp.stepcost` times the Learners
of several arms side by side. Both therefore time exactly the same step.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dbp import DBP, decorrelate
from dbp.arms import Arm
from dbp.config import DBPConfig, PretrainConfig
from dbp.model import MaskedAutoencoderViT, build_mae


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


def perturb_(model: nn.Module, scale: float, seed: int) -> None:
    """Multiply every parameter by (1 + scale x N(0, 1)), drawn from a generator of its own
    (the global random stream, hence batches and masks, stays as it was): a numerics
    replicate, as another CPU's rounding would nudge the run, but the same on every machine."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


class Learner:
    """One run's model, optimisers, scaler and DBP driver; `step()` is one optimiser step
    over `accum_steps` micro-batches. For a given seed every arm starts from the same
    weights; an arm with DBP settings (derived from the study's `dbp` section) then swaps
    its layers (R = identity at the start) and builds its optimizers over the result."""

    def __init__(self, cfg: PretrainConfig, arm: Arm, dbp: DBPConfig, seed: int,
                 device: torch.device, world: int = 1):
        torch.manual_seed(seed)
        self.model: MaskedAutoencoderViT = build_mae(cfg.model, mask_ratio=cfg.mask_ratio,
                                                     norm_pix_loss=cfg.norm_pix_loss)
        if cfg.perturb:
            perturb_(self.model, cfg.perturb, seed)
        self.arm, self.dbp_cfg = arm, arm.dbp_settings(dbp)
        self.batch_size = cfg.device_batch(world)
        self.effective_batch = self.batch_size * cfg.accum_steps * world
        self.driver: DBP | None = None
        if self.dbp_cfg is not None:
            mods = decorrelate(self.model, self.dbp_cfg.patterns(), seed=seed,
                               **self.dbp_cfg.layer_options())
            self.driver = DBP(mods, every=self.dbp_cfg.every)
        self.model.to(device)
        self.device, self.accum_steps, self.clip_grad = device, cfg.accum_steps, cfg.clip_grad
        self.peak_lr = self.lr = cfg.blr * self.effective_batch / 256
        self.optimizers = arm.build_optimizers(self.model, cfg, self.peak_lr, device)
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
        """The schedule's learning rate, for every group of every optimizer."""
        self.lr = lr
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def param_split(self) -> dict[str, dict]:
        """Which parameters each optimizer steps (run.json records it): name -> tensor and
        element counts and the parameter names."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        split = {}
        for key, opt in self.optimizers.items():
            params = [p for g in opt.param_groups for p in g["params"]]
            split[key] = {"tensors": len(params), "numel": sum(p.numel() for p in params),
                          "names": [name_of[id(p)] for p in params]}
        return split

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
        opts = self.optimizers.values()
        if self.clip_grad is not None:
            for opt in opts:
                self.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        for opt in opts:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if self.driver is not None:
            self.driver.step()
        return total

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(),
                "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
                "scaler": self.scaler.state_dict(),
                "dbp": self.driver.state_dict() if self.driver else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        self.scaler.load_state_dict(state["scaler"])
        if self.driver is not None:
            self.driver.load_state_dict(state["dbp"])
