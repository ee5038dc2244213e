# MAE pre-training: one job per run family (arm, tuning trial, budget, sweep point) x seed.
# The seed decides the run's role (target, tuning, scored, sweep; docs/protocol.md); every
# run but the tuning trials reads the per-arm winners that `select` wrote; an equal-compute
# BP run (role downstream) also reads its step count from `equal_compute`. A job takes all
# the cores it is given, so on a small machine jobs run one at a time and their clocks do
# not compete; a killed job resumes from its checkpoint when re-run with the same config.


rule pretrain:
    input:
        config=STUDY_CONFIG,
        manifest=f"{RESULTS}/manifests/pretrain_seed{{seed}}.txt",
        selected=selected_of,
        steps=steps_of,
    output:
        metrics=f"{RESULTS}/pretrain/{{run}}/seed{{seed}}/metrics.csv",
        run=f"{RESULTS}/pretrain/{{run}}/seed{{seed}}/run.json",
    params:
        out=lambda w, output: Path(output.run).parent,
        arm=lambda w: RUNS[w.run].arm,
        launch=lambda w, resources: launch(resources.gpu),
        sets=lambda w: " ".join(f"--set '{a}'" for a in RUNS[w.run].set_args()),
        role=role_of,
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
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} {params.launch} pretrain --config {input.config} --arm {params.arm} "
        "--run-id {wildcards.run} --role {params.role} {params.tuned} {params.steps_from} {params.sets} "
        "--seed {wildcards.seed} --manifest {input.manifest} --out {params.out} > {log} 2>&1"


rule pretrain_all:
    input:
        pretrain_outputs(),
