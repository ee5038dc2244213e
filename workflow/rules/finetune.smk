# Segmentation fine-tuning, arm x seed: the job exports its pre-training run first (fuse DBP,
# mmseg keys, self-checked; into the fine-tune's folder), then fine-tunes UperNet on it.
# "scratch" fine-tunes a randomly initialised encoder: the control for pre-training itself.

rule finetune:
    input:
        FT_DATA,
        config=STUDY_CONFIG,
        encoder=encoder_of,
    output:
        metrics=f"{RESULTS}/finetune/{{arm}}/seed{{seed}}/metrics.json",
    params:
        out=lambda w, output: Path(output.metrics).parent,
        encoder=lambda w, input: Path(input.encoder).parent if input.encoder else "none",
        gpus=lambda w, resources: resources.gpu,
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
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} \"$DBP_PYTHON\" -m dbp gpus {params.gpus} -- dbp finetune "
        "--config {input.config:q} --pretrained {params.encoder:q} --seed {wildcards.seed:q} "
        "--out {params.out:q} > {log:q} 2>&1"


rule finetune_all:
    input:
        finetune_outputs(),
