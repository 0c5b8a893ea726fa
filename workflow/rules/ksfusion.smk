# Knowledge-driven subspace fusion (WSI patch features + tumour / microenvironment gene
# subspaces), for every method of the family: one job per variant and split trains the
# variant on every task (diagnosis, grading, survival), then the figures.

KSFUSION_METHODS = methods_of_family("ksfusion")
KSFUSION_METHODS_REGEX = alternatives_regex(KSFUSION_METHODS)
ksfusion_inputs = family_module("ksfusion", "workflow")  # the rules' input functions


rule ksfusion_train:
    input:
        unpack(lambda w: ksfusion_inputs.fold_inputs(config, w.method)),
    output:
        model="results/{method}/{variant}/fold_{fold}/model.safetensors",
        predictions="results/{method}/{variant}/fold_{fold}/predictions.tsv",
        metrics="results/{method}/{variant}/fold_{fold}/metrics.tsv",
        train_log="results/{method}/{variant}/fold_{fold}/train_log.tsv",
        config="results/{method}/{variant}/fold_{fold}/config.yaml",
        genes="results/{method}/{variant}/fold_{fold}/genes.tsv",
    log:
        "logs/ksfusion_train/{method}_{variant}_fold{fold}.log",
    benchmark:
        "results/benchmarks/ksfusion_train/{method}_{variant}_fold{fold}.tsv"
    wildcard_constraints:
        method=KSFUSION_METHODS_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: lambda wildcards: config["methods"][wildcards.method]["resources"]["threads"]
    resources:
        # every sample's patch set and feature grid in memory; paper scale (2 500 patches of
        # 1024-d, a 50 x 50 grid, batch 8) fits one GPU of 24 GB with fused attention
        mem_mb=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "mem_mb"
        ],
        runtime=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "runtime"
        ],
        gpu=lambda wildcards: config["methods"][wildcards.method]["resources"]["gpu"],
    params:
        out=subpath(output.metrics, parent=True),
        genes=lambda wildcards: ksfusion_inputs.gene_files(config, wildcards.method),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag ksfusion train --method {wildcards.method}"
        " --variant {wildcards.variant} --fold {wildcards.fold}"
        " --manifest {input.manifest} --splits {input.splits} --features {input.features}"
        " --expression {params.genes[expression]:q} --gene-sets {params.genes[gene_sets]:q}"
        " --out {params.out} --threads {threads}"
        " --settings-json {params.settings:q} > {log} 2>&1"


rule ksfusion_figures:
    input:
        fold_all="results/{method}/fold_all.tsv",
        folds=lambda wildcards: ksfusion_inputs.figure_inputs(
            config,
            wildcards.method,
            n_folds(config["methods"][wildcards.method]["split"]),
        ),
    output:
        figures=report(
            directory("results/{method}/figures"),
            patterns=["{name}.png"],
            caption="../report/ksfusion_figures.rst",
            category="{method}",
            subcategory="figures",
            labels={"method": "{method}", "figure": "{name}"},
        ),
    log:
        "logs/ksfusion_figures/{method}.log",
    wildcard_constraints:
        method=KSFUSION_METHODS_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    params:
        results=subpath(input.fold_all, parent=True),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag ksfusion figures --method {wildcards.method}"
        " --results {params.results} --out-dir {output.figures}"
        " --settings-json {params.settings:q} > {log} 2>&1"
