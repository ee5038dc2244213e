# MAE pre-training: the study's runs (arm, tuning trial, budget, sweep point) x seed, through
# `dbp pretrain-runs`. With jobs.group_runs (the default) runs that read the same inputs run
# in one job, one after another (dbp/jobs.py): a scored seed's runs (every arm, every budget),
# a tuning seed's trials, the target-setting runs, the equal-compute runs: one process
# start-up a job instead of one a run. The seed decides a run's role (target, tuning, scored, sweep;
# docs/protocol.md); every run but the tuning trials reads the per-arm winners that `select`
# wrote; an equal-compute BP run (role downstream) also reads its step count from
# `equal_compute`. A job takes all the cores it is given, so on a small machine jobs run one
# at a time and their clocks do not compete; a killed job resumes each unfinished run from
# its checkpoint when re-run with the same config.

rule pretrain:
    input:
        config=STUDY_CONFIG,
        manifests=MANIFEST,
        selected=selected_of,
        steps=steps_of,
    output:
        runs=[f"{RESULTS}/pretrain/{{run}}/seed{{seed}}/run.json"],
        metrics=f"{RESULTS}/pretrain/{{run}}/seed{{seed}}/metrics.csv",
    params:
        results=results_of,
        gpus=lambda w, resources: resources.gpu,
        seeds=lambda w: w.seed,
        manifest=manifest_template,
        runs=lambda w: w.run,
        tuned=lambda w, input: ["--tuned", *input.selected] if input.selected else [],
        steps_from=lambda w, input: ["--steps-from", *input.steps] if input.steps else [],
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


for job in grouped_jobs(STUDY):
    # a job per seed ({seed} wildcard), or one job for every seed of the group (none)
    seed = "{seed}" if job.per_seed else None
    seeds = [seed] if seed else job.seeds  # in the paths: the wildcard, or every seed

    rule:
        name:
            f"pretrain_{job.kind}"
        input:
            config=STUDY_CONFIG,
            manifests=[MANIFEST.replace("{seed}", str(s)) for s in seeds],
            selected=[SELECTED] if SELECTED and any(RUNS[r].tuned for r in job.ids) else [],
            steps=[EQUAL_STEPS[r] for r in job.ids if r in EQUAL_STEPS],
        output:
            runs=[f"{RESULTS}/pretrain/{r}/seed{s}/run.json" for s in seeds for r in job.ids],
            metrics=[f"{RESULTS}/pretrain/{r}/seed{s}/metrics.csv" for s in seeds for r in job.ids],
        params:
            results=results_of,
            gpus=lambda w, resources: resources.gpu,
            seeds=lambda w, seeds=job.seeds: [w.get("seed")] if w.get("seed") else list(map(str, seeds)),
            manifest=manifest_template,
            runs=list(job.ids),
            tuned=lambda w, input: ["--tuned", *input.selected] if input.selected else [],
            steps_from=lambda w, input: ["--steps-from", *input.steps] if input.steps else [],
        log:
            f"{RESULTS}/logs/pretrain_{job.kind}/seed{seed or 's'}.log",
        benchmark:
            f"{RESULTS}/benchmarks/pretrain_{job.kind}/seed{seed or 's'}.tsv"
        threads: TRAIN_THREADS
        resources:
            gpu=GPUS_PER_JOB,
            mem_mb=4000,
            runtime=60 * len(job.ids) * (1 if seed else len(job.seeds)),
        wildcard_constraints:
            seed=one_of(job.seeds),
        conda:
            ENV
        shell:
            PRETRAIN_SHELL

    workflow.ruleorder(f"pretrain_{job.kind}", "pretrain")  # `ruleorder:` for a rule named in a loop


rule pretrain_all:
    input:
        pretrain_outputs(),
