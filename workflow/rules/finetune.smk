# Export (fuse DBP, mmseg keys, self-checked) and segmentation fine-tuning, arm x seed.
# "scratch" fine-tunes a randomly initialised encoder: the control for pre-training itself.
# Exports serve the probe (probe.smk) too, the equal-compute BP runs' among them.

rule export:
    input:
        f"{RESULTS}/pretrain/{{arm}}/seed{{seed}}/run.json",
    output:
        f"{RESULTS}/export/{{arm}}/seed{{seed}}/encoder.pth",
    params:
        dbp=DBP,
        run=lambda w, input: Path(input[0]).parent,
    log:
        f"{RESULTS}/logs/export/{{arm}}/seed{{seed}}.log",
    wildcard_constraints:
        arm=one_of([*STUDY.arms, *DOWNSTREAM_RUNS]),
        seed=r"\d+",
    conda:
        ENV
    shell:
        "{params.dbp} export --pretrain-run {params.run} --out {output} > {log} 2>&1"


rule finetune:
    input:
        FT_DATA,
        config=STUDY_CONFIG,
        encoder=encoder_of,
    output:
        metrics=f"{RESULTS}/finetune/{{arm}}/seed{{seed}}/metrics.json",
    params:
        out=lambda w, output: Path(output.metrics).parent,
        encoder=lambda w, input: input.encoder or "none",
        launch=lambda w, resources: launch(resources.gpu),
    log:
        f"{RESULTS}/logs/finetune/{{arm}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune/{{arm}}/seed{{seed}}.tsv"
    threads: TRAIN_THREADS
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=4000,
        runtime=60,
    wildcard_constraints:
        arm=one_of(STUDY.finetune_arms() or ["scratch"]),
        seed=r"\d+",
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} {params.launch} finetune "
        "--config {input.config} --pretrained {params.encoder} --seed {wildcards.seed} "
        "--out {params.out} > {log} 2>&1"


rule finetune_all:
    input:
        finetune_outputs(),
