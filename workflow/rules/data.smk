# Data: the resolved config, the embedded default (made once, cached by generator seed),
# and per seed the train-subset manifest shared by all arms of that seed (paired data).

rule study_config:
    output:
        STUDY_CONFIG,
        # a stamp per config digest: a changed config (or a fresh clone, whose committed
        # config.yaml Snakemake has no record of) lacks it, so the config is rewritten and
        # every job after it re-runs, never reading a stale file
        f"{RESULTS}/logs/config.{CONFIG_DIGEST[:16]}.digest",
    params:
        digest=CONFIG_DIGEST,  # a config change re-runs everything downstream
        resolved=RESOLVED,
    log:
        f"{RESULTS}/logs/study_config.log",
    run:
        from dbp.records import atomic_write_text

        atomic_write_text(output[0], yaml.safe_dump(params.resolved, sort_keys=False))
        atomic_write_text(output[1], f"{params.digest}\n")


if STUDY.data.kind == "embedded":

    rule embedded_data:
        output:
            directory(STUDY.data.root),
        params:
            seed=STUDY.data.embedded_seed,
        log:
            f"{RESULTS}/logs/embedded_data.log",
        conda:
            ENV
        shell:
            "\"$DBP_PYTHON\" -m dbp data make --root {output:q} --seed {params.seed:q} > {log:q} 2>&1"


rule subset_manifest:
    input:
        DATA_READY,
        config=STUDY_CONFIG,
    output:
        MANIFEST,
    log:
        f"{RESULTS}/logs/manifests/pretrain_seed{{seed}}.log",
    wildcard_constraints:
        seed=r"\d+",
    conda:
        ENV
    shell:
        "\"$DBP_PYTHON\" -m dbp data subset --config {input.config:q} --seed {wildcards.seed:q} --out {output:q} > {log:q} 2>&1"


rule data:
    input:
        expand(MANIFEST,
               seed=sorted({s for r in RUNS.values() for s in r.seeds})),
