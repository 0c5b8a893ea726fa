# MHD-Net (CT + WSI teacher, CT-only student), for every method of the family: per-fold
# training of teachers, then students (each reads its teacher's checkpoint of the fold) and
# the CT baseline, and the figures.

MHD_METHODS = methods_of_family("mhd")
MHD_METHODS_REGEX = alternatives_regex(MHD_METHODS)
MHD_TEACHER_REGEX = variants_where(MHD_METHODS, lambda spec: spec["model"] == "teacher")
MHD_CT_REGEX = variants_where(MHD_METHODS, lambda spec: spec["model"] != "teacher")
mhd_inputs = family_module("mhd", "workflow")  # the rules' input functions


rule mhd_train_teacher:
    input:
        unpack(lambda w: mhd_inputs.fold_inputs(config, w.method, w.variant, w.fold)),
        patches=lambda w: mhd_inputs.slide_inputs(
            config, w.method, w.variant, cohort_patch_stores
        ),
    output:
        model="results/{method}/{variant}/fold_{fold}/model.safetensors",
        predictions="results/{method}/{variant}/fold_{fold}/predictions.tsv",
        branches="results/{method}/{variant}/fold_{fold}/branches.tsv",
        metrics="results/{method}/{variant}/fold_{fold}/metrics.tsv",
        train_log="results/{method}/{variant}/fold_{fold}/train_log.tsv",
        config="results/{method}/{variant}/fold_{fold}/config.yaml",
    log:
        "logs/mhd_train_teacher/{method}_{variant}_fold{fold}.log",
    benchmark:
        "results/benchmarks/mhd_train_teacher/{method}_{variant}_fold{fold}.tsv"
    wildcard_constraints:
        method=MHD_METHODS_REGEX,
        variant=MHD_TEACHER_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: lambda wildcards: config["methods"][wildcards.method]["resources"]["threads"]
    resources:
        # the fold's CT sequences in memory, WSI patches read per batch; paper scale (three
        # ResNet-34 branches, 24 x 224^2, batch 8) needs one GPU with about 40 GB
        mem_mb=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "mem_mb"
        ],
        runtime=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "runtime"
        ],
        gpu=lambda wildcards: config["methods"][wildcards.method]["resources"]["gpu"],
    params:
        out=subpath(output.metrics, parent=True),
        patches=lambda wildcards: f"results/{config['methods'][wildcards.method]['cohort']}/patches",
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag mhd train --method {wildcards.method} --variant {wildcards.variant}"
        " --fold {wildcards.fold} --manifest {input.manifest} --splits {input.splits}"
        " --patches {params.patches} --out {params.out} --threads {threads}"
        " --settings-json {params.settings:q} > {log} 2>&1"


rule mhd_train_ct:
    input:
        unpack(lambda w: mhd_inputs.fold_inputs(config, w.method, w.variant, w.fold)),
        patches=lambda w: mhd_inputs.slide_inputs(
            config, w.method, w.variant, cohort_patch_stores
        ),
    output:
        model="results/{method}/{variant}/fold_{fold}/model.safetensors",
        predictions="results/{method}/{variant}/fold_{fold}/predictions.tsv",
        metrics="results/{method}/{variant}/fold_{fold}/metrics.tsv",
        train_log="results/{method}/{variant}/fold_{fold}/train_log.tsv",
        config="results/{method}/{variant}/fold_{fold}/config.yaml",
    log:
        "logs/mhd_train_ct/{method}_{variant}_fold{fold}.log",
    benchmark:
        "results/benchmarks/mhd_train_ct/{method}_{variant}_fold{fold}.tsv"
    wildcard_constraints:
        method=MHD_METHODS_REGEX,
        variant=MHD_CT_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: lambda wildcards: config["methods"][wildcards.method]["resources"]["threads"]
    resources:
        # a student trains against the frozen teacher (its forward pass on CT + WSI per batch)
        mem_mb=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "mem_mb"
        ],
        runtime=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "runtime"
        ],
        gpu=lambda wildcards: config["methods"][wildcards.method]["resources"]["gpu"],
    params:
        out=subpath(output.metrics, parent=True),
        patches=lambda wildcards: f"results/{config['methods'][wildcards.method]['cohort']}/patches",
        teacher=lambda wildcards, input: mhd_inputs.teacher_argument(input),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag mhd train --method {wildcards.method} --variant {wildcards.variant}"
        " --fold {wildcards.fold} --manifest {input.manifest} --splits {input.splits}"
        " --patches {params.patches} {params.teacher} --out {params.out} --threads {threads}"
        " --settings-json {params.settings:q} > {log} 2>&1"


rule mhd_figures:
    input:
        fold_all="results/{method}/fold_all.tsv",
        folds=lambda wildcards: mhd_inputs.figure_inputs(
            config,
            wildcards.method,
            n_folds(config["methods"][wildcards.method]["split"]),
        ),
    output:
        figures=report(
            directory("results/{method}/figures"),
            patterns=["{name}.png"],
            caption="../report/mhd_figures.rst",
            category="{method}",
            subcategory="figures",
            labels={"method": "{method}", "figure": "{name}"},
        ),
    log:
        "logs/mhd_figures/{method}.log",
    wildcard_constraints:
        method=MHD_METHODS_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=2000,  # the fold tables, and each counted network built once
        runtime=10,
        gpu=0,
    params:
        results=subpath(input.fold_all, parent=True),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag mhd figures --method {wildcards.method} --results {params.results}"
        " --out-dir {output.figures} --settings-json {params.settings:q} > {log} 2>&1"
