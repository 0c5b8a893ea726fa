# CS-MIL: per-split training of every variant on a cohort's features, its figures, and the
# toy benchmark's Table 5 when both toy methods are configured.

CSMIL_METHODS = methods_of_family("csmil")
CSMIL_METHODS_REGEX = alternatives_regex(CSMIL_METHODS)
TOY_METHODS = {"micro": "csmil_micro", "macro": "csmil_macro"}
if set(TOY_METHODS.values()) <= set(CSMIL_METHODS):
    EXTRA_FINAL_OUTPUTS.append("results/csmil_toy/table5.md")


rule csmil_train_fold:
    input:
        unpack(get_method_inputs_of),
        clusters=get_method_clusters,
        features=get_method_feature_stores,
    output:
        predictions="results/{method}/{variant}/fold_{fold}/predictions.tsv",
        metrics="results/{method}/{variant}/fold_{fold}/metrics.tsv",
        model="results/{method}/{variant}/fold_{fold}/model.safetensors",
        attention="results/{method}/{variant}/fold_{fold}/attention.tsv",
    log:
        "logs/csmil_train_fold/{method}/{variant}/fold_{fold}.log",
    benchmark:
        "results/benchmarks/csmil_train_fold/{method}/{variant}/fold_{fold}.tsv"
    wildcard_constraints:
        method=CSMIL_METHODS_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: lambda wildcards: config["methods"][wildcards.method]["resources"]["threads"]
    resources:
        # The cohort's features (patches x 3 scales x 2048 floats) and a small MIL head.
        mem_mb=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "mem_mb"
        ],
        runtime=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "runtime"
        ],
        gpu=lambda wildcards: config["methods"][wildcards.method]["resources"]["gpu"],
    params:
        out_dir=subpath(output.predictions, parent=True),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "OMP_NUM_THREADS={threads} python -m mmdiag csmil train --method {wildcards.method}"
        " --variant {wildcards.variant} --fold {wildcards.fold} --manifest {input.manifest}"
        " --splits {input.splits} --clusters {input.clusters} {input.features}"
        " --out-dir {params.out_dir} --settings-json {params.settings:q} > {log} 2>&1"


rule csmil_figures:
    input:
        fold_all="results/{method}/fold_all.tsv",
        manifest=lambda wildcards: get_method_inputs(wildcards.method)["manifest"],
        features=get_method_feature_stores,
    output:
        figures=report(
            directory("results/{method}/figures"),
            patterns=["{name}.png"],
            caption="../report/csmil_figures.rst",
            category="{method}",
            subcategory="figures",
            labels={"method": "{method}", "figure": "{name}"},
        ),
    log:
        "logs/csmil_figures/{method}.log",
    wildcard_constraints:
        method=CSMIL_METHODS_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=2000,  # slide thumbnails
        runtime=10,
        gpu=0,
    params:
        results=subpath(input.fold_all, parent=True),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag csmil figures --method {wildcards.method} --results {params.results}"
        " --manifest {input.manifest} --features {input.features}"
        " --out-dir {output.figures} --settings-json {params.settings:q} > {log} 2>&1"


rule csmil_toy_table:
    input:
        micro=f"results/{TOY_METHODS['micro']}/fold_all.tsv",
        macro=f"results/{TOY_METHODS['macro']}/fold_all.tsv",
    output:
        table="results/csmil_toy/table5.md",
        page=report(
            "results/csmil_toy/table5.html",
            caption="../report/csmil_toy.rst",
            category=TOY_METHODS["micro"],
            subcategory="tables",
            labels={"method": "csmil_micro + csmil_macro", "table": "table5"},
        ),
        latex="results/csmil_toy/table5.tex",
        values="results/csmil_toy/table5.tsv",
    log:
        "logs/csmil_toy_table.log",
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
        gpu=0,
    params:
        out=subpath(output.table, parent=True),
        method=TOY_METHODS["micro"],
        settings=lambda wildcards: settings_json_of_method(TOY_METHODS["micro"]),
    shell:
        "python -m mmdiag csmil toy-table --micro {input.micro} --macro {input.macro}"
        " --method {params.method} --out-dir {params.out} --settings-json {params.settings:q}"
        " > {log} 2>&1"
