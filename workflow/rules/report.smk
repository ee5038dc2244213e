# Tables and figures from the runs, flagged for `snakemake --report report.html`.
# `tables` re-makes both from whatever results exist (no upstream jobs):
#   snakemake --cores all tables

rule summarize:
    input:
        pretrain_outputs(),
        finetune_outputs(),
        probe_outputs(),
        [SELECTED] if SELECTED else [],
        rules.stepcost.output,
    output:
        multiext(f"{RESULTS}/headline", ".md", ".tex"),
        multiext(f"{RESULTS}/sensitivity", ".md", ".tex"),
        multiext(f"{RESULTS}/stability", ".md", ".tex"),
        multiext(f"{RESULTS}/downstream", ".md", ".tex"),
        multiext(f"{RESULTS}/per_seed", ".md", ".tex"),
        multiext(f"{RESULTS}/overhead", ".md", ".tex"),
        multiext(f"{RESULTS}/tuning", ".md", ".tex"),
        multiext(f"{RESULTS}/budgets", ".md", ".tex"),
        f"{RESULTS}/time_to_target.csv",
        f"{RESULTS}/speedups.csv",
        *[report_table(name) for name in REPORT_TABLES],
    params:
        results=lambda w, output: Path(output[0]).parent,
        study=STUDY.name,
    log:
        f"{RESULTS}/logs/summarize.log",
    conda:
        ENV
    shell:
        "\"$DBP_PYTHON\" -m dbp summarize --results {params.results:q} --study {params.study:q} > {log:q} 2>&1"


rule figures:
    input:
        rules.summarize.output,
    output:
        report(directory(f"paper_figures/{STUDY.name}"), patterns=["{figure}.png"],
               caption="../report/figures.rst", category="Figures"),
    params:
        results=lambda w, input: Path(input[0]).parent,
        study=STUDY.name,
    log:
        f"{RESULTS}/logs/figures.log",
    conda:
        ENV
    shell:
        "\"$DBP_PYTHON\" -m dbp figures --results {params.results:q} --study {params.study:q} --out {output:q} > {log:q} 2>&1"


rule tables:
    params:
        results=RESULTS,
        study=STUDY.name,
    log:
        f"{RESULTS}/logs/tables.log",
    conda:
        ENV
    shell:
        "(\"$DBP_PYTHON\" -m dbp summarize --results {params.results:q} --study {params.study:q} && "
        "\"$DBP_PYTHON\" -m dbp figures --results {params.results:q} --study {params.study:q}) > {log:q} 2>&1"


if STUDY.reproduce.of:

    rule reproduce:
        # This study beside the one it reproduces: the same winners? the same conclusions?
        input:
            results=rules.summarize.output,
            reference=f"results/{STUDY.reproduce.of}/speedups.csv",
        output:
            f"{RESULTS}/reproduce.md",
        params:
            reference=f"results/{STUDY.reproduce.of}",
            results=RESULTS,
        log:
            f"{RESULTS}/logs/reproduce.log",
        conda:
            ENV
        shell:
            "\"$DBP_PYTHON\" -m dbp reproduce --reference {params.reference:q} --results {params.results:q} "
            "--out {output:q} > {log:q} 2>&1"
