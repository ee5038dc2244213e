# Fair tuning (docs/protocol.md rule 5): every tuned arm ran the same grid on the tuning
# seeds; `select` picks each arm's lowest final validation loss (fully decayed schedules) and
# writes the winners that the target-setting and scored runs read. Controls take the winner
# of the arm they control.

if SELECTED:

    rule select:
        input:
            config=STUDY_CONFIG,
            runs=pretrain_outputs(tuning_runs()),
        output:
            SELECTED,
        params:
            results=lambda w, output: Path(output[0]).parents[1],
        log:
            f"{RESULTS}/logs/select.log",
        conda:
            ENV
        shell:
            "\"$DBP_PYTHON\" -m dbp select --config {input.config:q} --results {params.results:q} --out {output:q} > {log:q} 2>&1"
