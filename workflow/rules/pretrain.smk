# MAE pre-training: one job per arm x seed, reading the study's resolved config. Jobs take
# all the cores they are given, so on a small machine they run one at a time and their
# clocks do not compete.


rule pretrain:
    input:
        config=STUDY_CONFIG,
    output:
        metrics=f"{RESULTS}/pretrain/{{arm}}/seed{{seed}}/metrics.csv",
        run=f"{RESULTS}/pretrain/{{arm}}/seed{{seed}}/run.json",
    params:
        out=lambda w, output: Path(output.run).parent,
    log:
        f"{RESULTS}/logs/pretrain/{{arm}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{arm}}/seed{{seed}}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=4000,
    wildcard_constraints:
        arm="|".join(STUDY.arms),
        seed=r"\d+",
    shell:
        "OMP_NUM_THREADS={threads} {DBP} pretrain --config {input.config} --arm {wildcards.arm} "
        "--seed {wildcards.seed} --out {params.out} > {log} 2>&1"


rule pretrain_all:
    input:
        expand(f"{RESULTS}/pretrain/{{arm}}/seed{{seed}}/run.json", arm=STUDY.arms, seed=STUDY.seeds),
