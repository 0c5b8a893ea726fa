# CMUS-Net (OM + IM + TEM bag), for every method of the family (cmus, cmus_staging):
# per-fold training or late votes, fold_all.tsv, tables and figures.


rule cmus_train_fold:
    input:
        unpack(get_cmus_fold_inputs),
    output:
        model="results/{method}/{variant}/fold_{fold}/model.safetensors",
        predictions="results/{method}/{variant}/fold_{fold}/predictions.tsv",
        metrics="results/{method}/{variant}/fold_{fold}/metrics.tsv",
        train_log="results/{method}/{variant}/fold_{fold}/train_log.tsv",
        config="results/{method}/{variant}/fold_{fold}/config.yaml",
    log:
        "logs/cmus_train_fold/{method}_{variant}_fold{fold}.log",
    benchmark:
        "results/benchmarks/cmus_train_fold/{method}_{variant}_fold{fold}.tsv"
    wildcard_constraints:
        method=CMUS_METHODS_REGEX,
        variant=CMUS_TRAINED_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: lambda wildcards: config["methods"][wildcards.method]["resources"]["threads"]
    resources:
        # the fold's images are decoded once and kept in memory; paper scale (Swin-B x3 at
        # 224 px, batch 4) needs one GPU with about 16 GB; gpu > 1 (e.g. from a profile's
        # set-resources) trains data-parallel with one torchrun process per GPU
        mem_mb=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "mem_mb"
        ],
        runtime=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "runtime"
        ],
        gpu=lambda wildcards: config["methods"][wildcards.method]["resources"]["gpu"],
    params:
        launcher=lambda wildcards, resources: torch_launcher(resources.gpu),
        out=subpath(output.metrics, parent=True),
        crops=get_cmus_crop_argument,
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "{params.launcher} -m mmdiag train --method {wildcards.method} --variant {wildcards.variant}"
        " --fold {wildcards.fold} --manifest {input.manifest} --splits {input.splits}"
        " {params.crops} --out {params.out} --threads {threads}"
        " --settings-json {params.settings:q} > {log} 2>&1"


rule cmus_vote_fold:
    input:
        members=get_cmus_vote_members,
    output:
        predictions="results/{method}/{variant}/fold_{fold}/predictions.tsv",
        metrics="results/{method}/{variant}/fold_{fold}/metrics.tsv",
        train_log="results/{method}/{variant}/fold_{fold}/train_log.tsv",
        config="results/{method}/{variant}/fold_{fold}/config.yaml",
    log:
        "logs/cmus_vote_fold/{method}_{variant}_fold{fold}.log",
    wildcard_constraints:
        method=CMUS_METHODS_REGEX,
        variant=CMUS_VOTE_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
        gpu=0,
    params:
        out=subpath(output.metrics, parent=True),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag vote --method {wildcards.method} --variant {wildcards.variant}"
        " --fold {wildcards.fold} --out {params.out} --settings-json {params.settings:q}"
        " {input.members} > {log} 2>&1"


rule cmus_fold_all:
    input:
        metrics=lambda wildcards: get_method_fold_files(wildcards.method, "metrics.tsv"),
    output:
        fold_all="results/{method}/fold_all.tsv",
    log:
        "logs/cmus_fold_all/{method}.log",
    wildcard_constraints:
        method=CMUS_METHODS_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
        gpu=0,
    shell:
        "python -m mmdiag aggregate {input.metrics} --out {output.fold_all} > {log} 2>&1"


rule cmus_tables:
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
            patterns=["{name}.md"],
            caption="../report/cmus_table.rst",
            category="CMUS-Net",
        ),
    log:
        "logs/cmus_tables/{method}.log",
    wildcard_constraints:
        method=CMUS_METHODS_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    params:
        out=subpath(output.summary, parent=True),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag tables --method {wildcards.method} --fold-all {input.fold_all}"
        " --out-dir {params.out} --settings-json {params.settings:q} {input.predictions}"
        " > {log} 2>&1"


rule cmus_figures:
    input:
        unpack(get_cmus_fold_inputs),
        fold_all="results/{method}/fold_all.tsv",
        predictions=lambda wildcards: get_method_fold_files(
            wildcards.method, "predictions.tsv"
        ),
        model=lambda wildcards: (
            f"results/{wildcards.method}/"
            f"{config['methods'][wildcards.method]['reference']}/fold_0/model.safetensors"
        ),
    output:
        figures=report(
            directory("results/{method}/figures"),
            patterns=["{name}.png"],
            caption="../report/cmus_figures.rst",
            category="CMUS-Net",
        ),
    log:
        "logs/cmus_figures/{method}.log",
    wildcard_constraints:
        method=CMUS_METHODS_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=3000,  # the reference model and one fold's images
        runtime=20,
        gpu=0,
    params:
        results=subpath(input.fold_all, parent=True),
        crops=get_cmus_crop_argument,
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag figures --method {wildcards.method} --results {params.results}"
        " --manifest {input.manifest} --splits {input.splits} {params.crops}"
        " --out-dir {output.figures} --settings-json {params.settings:q} > {log} 2>&1"
