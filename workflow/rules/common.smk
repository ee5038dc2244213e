# Shared definitions (no rules here): the validated study's run families, the resolved
# config file every job reads, and how a job is launched.
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import yaml
from snakemake.settings.types import DeploymentMethod
from dbp.config import to_dict
from dbp.downstream import downstream_runs, equal_compute_id, probe_arms, probe_seeds
from dbp.jobs import grouped_jobs, study_runs

RESOLVED = to_dict(STUDY)
CONFIG_DIGEST = hashlib.sha256(json.dumps(RESOLVED, sort_keys=True).encode()).hexdigest()
# The equal-compute BP runs (role "downstream"), whose steps a job derives from the records.
DOWNSTREAM_RUNS = downstream_runs(STUDY)
RUNS = study_runs(STUDY)  # run id -> arm, overrides (trial, budget, sweep point), seeds
EQUAL_STEPS = {equal_compute_id(a): f"{RESULTS}/equal_compute/{a}.json" for a in STUDY.probe.equal_compute}
STUDY_CONFIG = f"{RESULTS}/config.yaml"
MANIFEST = f"{RESULTS}/manifests/pretrain_seed{{seed}}.txt"  # a seed's train subset (pattern)
# The tuning winners per arm, written by `select`, read by every target-setting and scored run.
SELECTED = f"{RESULTS}/tuning/selected.json" if STUDY.tuning.enabled else None
ENV = "../envs/dbp.yaml"  # the jobs' software under --use-conda
# The Python of every job's `dbp` command, handed to the shell line as $DBP_PYTHON (quoted
# there): in the environment, never a rule parameter, so running Snakemake through another
# path to the same environment (python -m snakemake) re-runs nothing, and a path with a space
# stays one word. A job on `params.gpus` GPUs starts as "$DBP_PYTHON" -m dbp gpus N -- dbp ...:
# `dbp gpus` gives it its own devices on a workstation and, for more than one GPU, torchrun
# (DDP) inside the one job. Every job re-parses this file (SLURM too), so it is always set.
# (Set here, for the jobs: not variables the user must provide, so no `envvars:` directive.)
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    os.environ.update(DBP_PYTHON="python",  # the env's Python, this checkout's dbp
                      PYTHONPATH=os.pathsep.join(filter(None, (workflow.basedir, os.getenv("PYTHONPATH")))))
else:
    os.environ.update(DBP_PYTHON=sys.executable)  # the Python running Snakemake (the venv)
# Threads of a training job: every core of a local run (one job at a time, clocks do not
# compete); on a cluster (no --cores) the profile's cpus_per_task decides, and the shell
# command takes SLURM's allocation.
TRAIN_THREADS = workflow.resource_settings.cores or 1
# GPUs per training job: the rules' default `gpu` resource; profiles/slurm sets it for
# pretrain and finetune, a workstation with --set-resources pretrain:gpu=1 finetune:gpu=1.
# Nothing is probed here: the DAG may be parsed on a login node without GPUs.
GPUS_PER_JOB = 0


# The command of every pre-training job (pretrain.smk): the study's runs by id, in one process.
PRETRAIN_SHELL = (
    "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} \"$DBP_PYTHON\" -m dbp gpus {params.gpus} -- dbp pretrain-runs --config {input.config:q} "
    "--seed {params.seeds:q} --manifest {params.manifest:q} --results {params.results:q} {params.tuned:q} "
    "{params.steps_from:q} {params.runs:q} > {log:q} 2>&1"
)


def manifest_template(w):
    """--manifest of `dbp pretrain-runs`: the pattern itself, {seed} filled in by the command
    for each of its seeds (a function, so Snakemake leaves the braces alone; quoted in the
    shell line like every path)."""
    return MANIFEST


def results_of(w, output):
    """results/<study>, above a job's pretrain/<run>/seed<seed>/run.json outputs."""
    return Path(output.runs[0]).parents[3]


def one_of(names):
    """A wildcard constraint matching exactly these names."""
    return "|".join(re.escape(str(n)) for n in names)


def pretrain_outputs(run_ids=None):
    ids = RUNS if run_ids is None else run_ids
    return [f"{RESULTS}/pretrain/{r}/seed{s}/run.json" for r in ids for s in RUNS[r].seeds]


DATA_READY = [STUDY.data.root] if STUDY.data.kind == "embedded" else []  # the embedded data dir
FT = STUDY.finetune
FT_DATA = DATA_READY if FT.kind == "embedded" and FT.root == STUDY.data.root else []


def tuning_runs():
    """The run ids of the tuning trials (they do not read the selected values)."""
    return [r for r, run in RUNS.items() if not run.tuned]


def selected_of(w):
    """The selected-values file a run reads (none for tuning trials, or when pinned)."""
    return [SELECTED] if SELECTED and RUNS[w.run].tuned else []


def steps_of(w):
    """The step-count file an equal-compute run reads (none for the other runs)."""
    return [EQUAL_STEPS[w.run]] if w.run in DOWNSTREAM_RUNS else []


def finetune_outputs():
    return [f"{RESULTS}/finetune/{a}/seed{s}/metrics.json"
            for a in STUDY.finetune_arms() for s in STUDY.finetune_seeds()]


def probe_outputs():
    return [f"{RESULTS}/probe/{a}/seed{s}/metrics.json" for a in probe_arms(STUDY) for s in probe_seeds(STUDY)]


def probe_encoders(seed):
    """The pre-training runs a seed's probe job exports and probes, by encoder name (scratch
    has none)."""
    return {a: f"{RESULTS}/pretrain/{a}/seed{seed}" for a in probe_arms(STUDY) if a != "scratch"}


def encoder_of(w):
    """The pre-training run a fine-tune exports and starts from (none for scratch)."""
    return [] if w.arm == "scratch" else f"{RESULTS}/pretrain/{w.arm}/seed{w.seed}/run.json"


REPORT_TABLES = {  # table -> report subcategory
    "headline": "1 headline",
    "sensitivity": "2 readings of the curve",
    "stability": "3 unstable runs",
    "arms": "4 every arm",
    "per_seed": "5 every seed",
    "overhead": "6 step cost and contention",
    "budgets": "7 budget ladder",
    "relaxed": "8 relaxed targets",
    "tuning": "9 tuning",
    "downstream": "10 downstream",
}


def report_table(name):
    """A table's HTML flagged for `snakemake --report`, under Results, with its caption."""
    caption = "headline.rst" if name == "headline" else "tables.rst"
    return report(f"{RESULTS}/{name}.html", caption=f"../report/{caption}",
                  category="Results", subcategory=REPORT_TABLES[name])
