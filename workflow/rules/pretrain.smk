# MAE pre-training: the study's runs (arm, tuning trial, budget, sweep point) x seed, through
# `dbp pretrain-runs`. With jobs.group_runs (the default) a scored seed's runs (every arm,
# every budget) run in one job, one after another, and so do a tuning seed's trials: one
# process start-up a seed instead of one a run. The seed decides a run's role (target, tuning, scored, sweep;
# docs/protocol.md); every run but the tuning trials reads the per-arm winners that `select`
# wrote; an equal-compute BP run (role downstream) also reads its step count from
# `equal_compute`. A job takes all the cores it is given, so on a small machine jobs run one
# at a time and their clocks do not compete; a killed job resumes each unfinished run from
# its checkpoint when re-run with the same config.

rule pretrain:
    input:
        config=STUDY_CONFIG,
        manifest=f"{RESULTS}/manifests/pretrain_seed{{seed}}.txt",
        selected=selected_of,
        steps=steps_of,
    output:
        runs=[f"{RESULTS}/pretrain/{{run}}/seed{{seed}}/run.json"],
        metrics=f"{RESULTS}/pretrain/{{run}}/seed{{seed}}/metrics.csv",
    params:
        results=results_of,
        launch=lambda w, resources: launch(resources.gpu),
        runs=lambda w, output: " ".join(run_ids(output)),
        tuned=lambda w, input: f"--tuned {input.selected}" if input.selected else "",
        steps_from=lambda w, input: f"--steps-from {input.steps}" if input.steps else "",
    log:
        f"{RESULTS}/logs/pretrain/{{run}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{run}}/seed{{seed}}.tsv"
    threads: TRAIN_THREADS
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=4000,
        runtime=60,
    wildcard_constraints:
        run=one_of(RUNS),
        seed=r"\d+",
    conda:
        ENV
    shell:
        PRETRAIN_SHELL


for kind, (ids, seeds) in STUDY.grouped_jobs().items():

    rule:
        name:
            f"pretrain_{kind}"
        input:
            config=STUDY_CONFIG,
            manifest=f"{RESULTS}/manifests/pretrain_seed{{seed}}.txt",
            selected=[SELECTED] if SELECTED and kind == "scored" else [],
        output:
            runs=[f"{RESULTS}/pretrain/{r}/seed{{seed}}/run.json" for r in ids],
            metrics=[f"{RESULTS}/pretrain/{r}/seed{{seed}}/metrics.csv" for r in ids],
        params:
            results=results_of,
            launch=lambda w, resources: launch(resources.gpu),
            runs=lambda w, output: " ".join(run_ids(output)),
            tuned=lambda w, input: f"--tuned {input.selected}" if input.selected else "",
            steps_from="",
        log:
            f"{RESULTS}/logs/pretrain_{kind}/seed{{seed}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/pretrain_{kind}/seed{{seed}}.tsv"
        threads: TRAIN_THREADS
        resources:
            gpu=GPUS_PER_JOB,
            mem_mb=4000,
            runtime=60 * len(ids),
        wildcard_constraints:
            seed=one_of(seeds),
        conda:
            ENV
        shell:
            PRETRAIN_SHELL

    workflow.ruleorder(f"pretrain_{kind}", "pretrain")  # `ruleorder:` for a rule named in a loop


rule pretrain_all:
    input:
        pretrain_outputs(),
