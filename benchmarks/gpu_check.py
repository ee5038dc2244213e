"""The GPU path, checked in one run: step cost at the paper's shapes, then a real pre-training
run, an export and a short fine-tune, all through the suite's own code.

1. Step time and peak memory of every arm of configs/paper.yaml (BP, DBP, the identity
   control, the optimizer rivals, ...) and of DBP unfused (the reference's way), each a
   `dbp.learner.Learner` (ViT-B/16 MAE, 224 px, bf16 autocast on CUDA), eager and
   `torch.compile`d, interleaved step by step (`dbp.stepcost.interleave`), beside the
   analytic MAC model.
2. `dbp pretrain` of DBP with the paper config on generated images in the ImageNet layout
   (NVML energy measured where the GPU has a counter), `dbp export`, and `dbp finetune` with
   the paper's segmentation preset for a few iterations.
Everything lands in one JSON file; the table is printed too.

    python benchmarks/gpu_check.py --out gpu_check.json          # one GPU, at most ~8 minutes
    python benchmarks/gpu_check.py --quick --out /tmp/check.json  # CPU, tiny shapes (the tests)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dbp._compat  # noqa: F401  (before timm)
import pandas as pd
import torch

from dbp.analysis import round_ratios
from dbp.arms import get_arm
from dbp.config import load_config
from dbp.embedded import ADE, make_embedded
from dbp.learner import Learner
from dbp.model import mask_noise
from dbp.pretrain import step_cost
from dbp.stepcost import interleave

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper.yaml"


def arms(cfg) -> dict:
    """The config's arms and DBP unfused: name -> (arm, the DBP section it derives from)."""
    out = {a: (get_arm(a), cfg.dbp) for a in cfg.arms}
    return out | {"dbp_unfused": (get_arm("dbp"), dataclasses.replace(cfg.dbp, fused=False))}


def step_table(cfg, device, batch: int, rounds: int, compiled: bool) -> pd.DataFrame:
    """Interleaved step times (median ratio to BP over rounds), each arm's first step (with
    compilation) and peak memory, and the analytic MAC ratio."""
    pre = dataclasses.replace(cfg.pretrain_for("bp"), batch_size=batch, global_batch=None,
                              compile=compiled)
    learners = {name: Learner(pre, arm, d, seed=0, device=device) for name, (arm, d) in arms(cfg).items()}
    model = learners["bp"].model
    gen = torch.Generator().manual_seed(0)
    micro = [(torch.randn(batch, 3, *model.patch_embed.img_size, generator=gen).to(device),
              mask_noise(batch, model.num_patches, gen).to(device))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first, peak, analytic = {}, {}, {}
    for name, lr in learners.items():  # alone first: compile time and peak memory per arm
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        lr.step(micro)
        sync()
        first[name] = time.perf_counter() - t0
        peak[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        cost = step_cost(lr)
        analytic[name] = 1 + cost["extra_macs_per_step"] / cost["macs_per_step"]
    rows = interleave({n: (lambda lr=lr: (lr.step(micro), sync())) for n, lr in learners.items()},
                      rounds, warmup=2)
    t = round_ratios(pd.DataFrame(rows))
    return t.assign(compiled=compiled, batch=batch, first_step_s=t["arm"].map(first),
                    peak_gib=t["arm"].map(peak), analytic=t["arm"].map(analytic))


def run(cmd: list[str], log: Path) -> float:
    """Run a `dbp` command, its output into `log`; seconds taken. Stops the check on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "dbp", *cmd], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        sys.exit(f"{tail}\ngpu_check: `dbp {cmd[0]}` failed (exit {done.returncode})")
    return time.perf_counter() - t0


def settings(data: Path, quick: bool) -> list[str]:
    """The paper config's overrides for this check: generated data, a short run, a short
    fine-tune; tiny shapes on CPU in quick mode."""
    sets = [f"data.root={data / 'imagenet'}", "data.fraction=1.0", "data.val_images=16",
            "data.num_workers=2", f"pretrain.steps={6 if quick else 300}", "pretrain.warmup_steps=2",
            f"pretrain.eval_every={3 if quick else 100}", f"pretrain.checkpoint_every={6 if quick else 300}",
            f"pretrain.batch_size={8 if quick else 64}", "pretrain.global_batch=null", "finetune.kind=ade20k",
            f"finetune.root={data / ADE}", "finetune.fraction=1.0", f"finetune.iterations={2 if quick else 40}",
            "finetune.num_workers=2"]
    if quick:
        sets += ["pretrain.model=mae_vit_tiny_patch4_32", "data.image_size=32", "finetune.preset=cpu_tiny"]
    return sets


def pipeline(work: Path, sets: list[str]) -> dict:
    """dbp pretrain -> export -> finetune with the paper config and `sets`."""
    args = [a for s in sets for a in ("--set", s)]
    out = {"pretrain_seconds": run(["pretrain", "--config", str(PAPER), *args, "--arm", "dbp",
                                    "--seed", "0", "--out", str(work / "pre")], work / "pretrain.log")}
    info = json.loads((work / "pre" / "run.json").read_text())
    out["pretrain"] = {k: info.get(k) for k in ("status", "steps_done", "train_seconds", "autocast",
                                                 "device", "energy")}
    out["export_seconds"] = run(["export", "--pretrain-run", str(work / "pre"), "--out",
                                 str(work / "encoder.pth")], work / "export.log")
    out["finetune_seconds"] = run(["finetune", "--config", str(PAPER), *args, "--pretrained",
                                   str(work / "encoder.pth"), "--seed", "0", "--out", str(work / "ft")],
                                  work / "finetune.log")
    out["finetune"] = json.loads((work / "ft" / "metrics.json").read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file for every number")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU, no compile")
    ap.add_argument("--batch", type=int, default=128, help="images per step (paper shapes)")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, rounds = (8, 3) if args.quick else (args.batch, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_embedded(work / "data", seed=0, imagenet_per_class=4 if args.quick else 20,
                             imagenet_val_per_class=1, ade_train=8, ade_val=2,
                             image_size=32 if args.quick else 224)
        sets = settings(data, args.quick)
        cfg = load_config(PAPER, sets)
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "model": cfg.pretrain.model, "batch": batch}
        tables = [step_table(cfg, device, batch, rounds, compiled=False)]
        if not args.quick:
            tables.append(step_table(cfg, device, batch, rounds, compiled=True))
        steps = pd.concat(tables, ignore_index=True)
        result["steps"] = steps.to_dict("records")
        print(steps[["arm", "compiled", "sec_per_step", "ratio", "ratio_q25", "ratio_q75", "analytic",
                     "peak_gib", "first_step_s"]].to_string(index=False, float_format=lambda x: f"{x:.4g}"),
              flush=True)
        result |= pipeline(work, sets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"pretrain {result['pretrain']['status']} in {result['pretrain_seconds']:.0f} s "
          f"({result['pretrain']['autocast']}, {result['pretrain']['device']}); export "
          f"{result['export_seconds']:.0f} s; finetune mIoU {result['finetune']['mIoU']:.3f} in "
          f"{result['finetune_seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
