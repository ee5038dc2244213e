# The DBP-MAE study as a DAG. Default: the embedded study on CPU.
#   snakemake --cores all                                  # configs/default.yaml
#   snakemake --cores all --configfile configs/paper.yaml  # paper scale (GPUs)
# The config is validated once, here, before any job runs (dbp.config names the bad key).
import os

from snakemake.utils import validate

from dbp.config import ConfigError, config_from_dict, with_base


report: "workflow/report/workflow.rst"


try:  # key names, types, ranges, folders, sweep points: one line naming the bad key
    if not workflow.config_settings.configfiles:  # no study named: the embedded default
        config.setdefault("base", "default")
    RAW = with_base(config)  # the study over the base it names (none: the typed defaults), as `dbp config` does
    STUDY = config_from_dict(RAW)
except ConfigError as e:
    raise WorkflowError(f"config error: {e}")
validate(RAW, f"{workflow.basedir}/workflow/schemas/study.schema.yaml")  # the same types and ranges

RESULTS = f"results/{STUDY.name}"
os.environ.update(STUDY.reproduce.env)  # a reproduction's kernel switches, for every job it starts

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/tuning.smk"
include: "workflow/rules/stepcost.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.pretrain_all.input,
        rules.study_config.output,  # its digest stamp: a stale config.yaml is rewritten
        rules.figures.output,
        [f"{RESULTS}/reproduce.md"] if STUDY.reproduce.of else [],
