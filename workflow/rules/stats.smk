# Statistics of every method: fold_all.tsv from the per-fold metrics, then the summary, the
# tests against the reference row and the paper tables. One rule each, whatever the method.

ALL_METHODS_REGEX = alternatives_regex(config["methods"])


rule fold_all:
    input:
        metrics=lambda wildcards: get_method_fold_files(wildcards.method, "metrics.tsv"),
    output:
        fold_all="results/{method}/fold_all.tsv",
    log:
        "logs/fold_all/{method}.log",
    wildcard_constraints:
        method=ALL_METHODS_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=500,  # a few thousand rows of metrics
        runtime=5,
        gpu=0,
    shell:
        "python -m mmdiag aggregate {input.metrics} --out {output.fold_all} > {log} 2>&1"


rule tables:
    input:
        fold_all="results/{method}/fold_all.tsv",
        predictions=lambda wildcards: get_method_fold_files(
            wildcards.method, "predictions.tsv"
        ),
    output:
        summary="results/{method}/summary.tsv",
        stats="results/{method}/stats.tsv",
        tables=report(
            directory("results/{method}/tables"),
            patterns=["{name}.html"],
            caption="../report/method_table.rst",
            category="{method}",
            subcategory="tables",
            labels={"method": "{method}", "table": "{name}"},
        ),
    log:
        "logs/tables/{method}.log",
    wildcard_constraints:
        method=ALL_METHODS_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=1000,  # pooled test predictions; the bootstrap resamples them in place
        runtime=10,
        gpu=0,
    params:
        out=subpath(output.summary, parent=True),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag tables --method {wildcards.method} --fold-all {input.fold_all}"
        " --out-dir {params.out} --settings-json {params.settings:q} {input.predictions}"
        " > {log} 2>&1"


rule overview:
    input:
        unpack(get_overview_inputs),
    output:
        overview=report(
            "results/overview.html",
            caption="../report/overview.rst",
            category="Overview",
            labels={"page": "run overview"},
        ),
    log:
        "logs/overview.log",
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=500,  # reads the manifests and summaries
        runtime=5,
        gpu=0,
    params:
        named=get_overview_arguments,
        settings=lambda wildcards: settings_json("methods", "splits"),
    shell:
        "python -m mmdiag overview --out {output.overview} {params.named}"
        " --settings-json {params.settings:q} > {log} 2>&1"
