# Shared definitions (no rules here): the validated study's run families, the resolved
# config file every job reads, and how a job is launched.
import hashlib
import json
import re
import sys
from pathlib import Path

import yaml
from dbp.config import to_dict
from dbp.gpus import device_count

RESOLVED = to_dict(STUDY)
CONFIG_DIGEST = hashlib.sha256(json.dumps(RESOLVED, sort_keys=True).encode()).hexdigest()
RUNS = STUDY.runs()  # run id -> arm, sweep overrides, seeds
STUDY_CONFIG = f"{RESULTS}/config.yaml"
DBP = f"{sys.executable} -m dbp"  # the dbp CLI of the Python running Snakemake (no PATH needed)
ENV = "dbp-mae-bench"
# GPUs per training job unless a profile sets resources (e.g. gpu=4: torchrun in one job)
GPUS_PER_JOB = 1 if device_count() > 0 else 0  # `conda env create -f environment.yml`; used with --use-conda


def launch(gpus):
    """Command prefix for a dbp job on `gpus` GPUs: its own devices on a workstation, and
    torchrun (DDP) inside the one job when it needs more than one."""
    if gpus <= 1:
        return f"{DBP} gpus {gpus} -- {sys.executable} -m dbp"
    return (f"{DBP} gpus {gpus} -- {sys.executable} -m torch.distributed.run --standalone "
            f"--nproc_per_node {gpus} -m dbp")


def one_of(names):
    """A wildcard constraint matching exactly these names."""
    return "|".join(re.escape(str(n)) for n in names)


def pretrain_outputs(run_ids=None):
    ids = RUNS if run_ids is None else run_ids
    return [f"{RESULTS}/pretrain/{r}/seed{s}/run.json" for r in ids for s in RUNS[r].seeds]
