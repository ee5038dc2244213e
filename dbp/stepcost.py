"""Seconds per training step of every arm, measured side by side.

A study times its runs one after another, minutes apart. When the machine slows down in
between (another process on the cores, a noisy neighbour, a hotter chip), step times move
but steps do not. So the headline takes each arm's step-time ratio to BP from this
measurement instead of from runs made at different times (docs/protocol.md, contention):
the arms' Learners take turns of one step each (one DBP cycle when `every` > 1) in a
shuffled order, round after round, on the same batches of the study's data, loader
included. A round compares steps taken within a second of each other; the median over
rounds ignores the rounds another process disturbed. The records carry wall and process
CPU seconds per turn; `dbp.analysis.round_ratios` summarises them (no torch needed).
"""
from __future__ import annotations

import contextlib

import random
import time
from collections.abc import Callable, Iterator, Mapping

import torch
from tqdm import tqdm

from dbp.arms import get_arm
from dbp.config import DBPConfig, PretrainConfig
from dbp.data import TrainData, prepare_pretrain_data
from dbp.learner import Learner, setup_device
from dbp.pretrain import micro_batches

COLUMNS = ["round", "position", "arm", "steps", "wall_seconds", "cpu_seconds", "threads"]


def interleave(turns: Mapping[str, Callable[[], None]], rounds: int, warmup: int = 2,
               seed: int = 0, steps: Mapping[str, int] | None = None,
               on_round: Callable[[int], None] | None = None) -> list[dict]:
    """Run each callable once per round, in a fresh shuffled order per round, after
    `warmup` untimed rounds; one record per turn (wall and process CPU seconds, so the
    results side can tell a turn that shared its cores). `steps[name]`: the training steps
    one turn of `name` makes (default 1)."""
    order, rng, rows = list(turns), random.Random(seed), []
    threads = torch.get_num_threads()
    for r in range(-warmup, rounds):
        rng.shuffle(order)
        for pos, name in enumerate(order):
            w0, c0 = time.perf_counter(), time.process_time()
            turns[name]()
            if r >= 0:
                rows.append({"round": r, "position": pos, "arm": name,
                             "steps": (steps or {}).get(name, 1),
                             "wall_seconds": time.perf_counter() - w0,
                             "cpu_seconds": time.process_time() - c0, "threads": threads})
        if on_round is not None and r >= 0:
            on_round(r)
    return rows


def learner_turn(learner: Learner, batches: Iterator, steps: int) -> Callable[[], None]:
    """One turn: `steps` optimiser steps of `learner` on the next batches, synchronised
    with the device so the wall clock sees the whole step."""
    sync = torch.cuda.synchronize if learner.device.type == "cuda" else (lambda: None)

    def turn() -> None:
        for _ in range(steps):
            learner.step([next(batches) for _ in range(learner.accum_steps)])
        sync()
    return turn


def measure_arms(arms: Mapping[str, PretrainConfig], dbp: DBPConfig, data_cfg, seed: int,
                 manifest, rounds: int, warmup: int = 2, progress: bool = True) -> list[dict]:
    """Interleaved step times of `arms` (registered arm name -> its pretrain section, with
    `dbp` the study's DBP section), each trained from the seed's initial weights on the
    seed's subset, as `pretrain()` would."""
    device, rank, world = setup_device()
    learners = {name: Learner(cfg, get_arm(name), dbp, seed, device, world) for name, cfg in arms.items()}

    def data(lr: Learner) -> TrainData:  # each arm its own: a run's image cache is its own too
        return prepare_pretrain_data(
            kind=data_cfg.kind, root=data_cfg.root, embedded_seed=data_cfg.embedded_seed,
            fraction=data_cfg.fraction, class_balanced=data_cfg.class_balanced,
            on_error=data_cfg.on_error, val_images=1, image_size=lr.model.patch_embed.img_size[0],
            seed=seed, cache_images=data_cfg.cache_images, manifest=manifest, manifest_out=None)
    steps = {name: lr.dbp_cfg.every if lr.dbp_cfg else 1 for name, lr in learners.items()}
    with contextlib.ExitStack() as streams:  # closed, their loader workers end (micro_batches)
        turns = {name: learner_turn(lr, streams.enter_context(contextlib.closing(micro_batches(
            data(lr), seed, 0, lr.batch_size, rank, world, data_cfg.num_workers,
            device.type == "cuda", lr.model.num_patches))), steps[name]) for name, lr in learners.items()}
        bar = tqdm(total=rounds, desc="step cost", unit="round", disable=not progress)
        rows = interleave(turns, rounds, warmup, seed, steps, on_round=lambda r: bar.update(1))
        bar.close()
    return rows
