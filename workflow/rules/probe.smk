# The linear probe of each frozen encoder (dbp probe, docs/downstream.md): the downstream
# measure that tells encoders apart on the embedded data. One job per probed scored seed probes
# all its encoders (every pre-trained arm, the equal-compute BP runs, scratch) on data loaded
# once, exporting each pre-trained one first (dbp.export, self-checked) in the same process. `equal_compute` derives an equal-compute run's steps from the records (the arm's
# run.json, the side-by-side step cost), which its pre-training job reads.

rule equal_compute:
    input:
        config=STUDY_CONFIG,
        runs=lambda w: [f"{RESULTS}/pretrain/{w.arm}/seed{s}/run.json" for s in probe_seeds(STUDY)],
        stepcost=rules.stepcost.output,
    output:
        f"{RESULTS}/equal_compute/{{arm}}.json",
    params:
        results=lambda w, output: Path(output[0]).parents[1],
    log:
        f"{RESULTS}/logs/equal_compute/{{arm}}.log",
    wildcard_constraints:
        arm=one_of(STUDY.probe.equal_compute or ["none"]),
    conda:
        ENV
    shell:
        "\"$DBP_PYTHON\" -m dbp equal-compute --config {input.config:q} --results {params.results:q} "
        "--arm {wildcards.arm:q} --out {output:q} > {log:q} 2>&1"


rule probe:
    input:
        FT_DATA,
        config=STUDY_CONFIG,
        runs=lambda w: [f"{run}/run.json" for run in probe_encoders(w.seed).values()],
    output:
        [f"{RESULTS}/probe/{a}/seed{{seed}}/metrics.json" for a in probe_arms(STUDY)],
    params:
        gpus=lambda w, resources: min(resources.gpu, 1),
        out=lambda w, output: Path(output[0]).parents[2],
        encoders=lambda w: [word for a in probe_arms(STUDY)
                            for word in ("--encoder", f"{a}={probe_encoders(w.seed).get(a, 'none')}")],
    log:
        f"{RESULTS}/logs/probe/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe/seed{{seed}}.tsv"
    threads: TRAIN_THREADS
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=4000,
        runtime=30,
    wildcard_constraints:
        seed=r"\d+",
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} \"$DBP_PYTHON\" -m dbp gpus {params.gpus} -- dbp probe --config {input.config:q} "
        "--seed {wildcards.seed:q} {params.encoders:q} --out {params.out:q} > {log:q} 2>&1"


rule probe_all:
    input:
        probe_outputs(),
