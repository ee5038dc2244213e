# The arms' step times measured side by side (dbp stepcost): the headline turns steps into
# seconds with these ratios, so a machine that was slower while one arm's runs were timed
# cannot fake a speed-up (docs/protocol.md, contention). One job, on the first scored seed's
# data; it takes all the cores, like a training job.
STEPCOST = "stepcost/rounds.csv"  # under results/<study>/, where dbp.analysis reads it


rule stepcost:
    input:
        config=STUDY_CONFIG,
        manifest=MANIFEST.format(seed=STUDY.seeds.scored[0]),
    output:
        f"{RESULTS}/{STEPCOST}",
    params:
        gpus=lambda w, resources: min(resources.gpu, 1),
        seed=STUDY.seeds.scored[0],
    log:
        f"{RESULTS}/logs/stepcost.log",
    benchmark:
        f"{RESULTS}/benchmarks/stepcost.tsv"
    threads: TRAIN_THREADS
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} \"$DBP_PYTHON\" -m dbp gpus {params.gpus} -- dbp stepcost --config {input.config:q} "
        "--seed {params.seed:q} --manifest {input.manifest:q} --out {output:q} > {log:q} 2>&1"
