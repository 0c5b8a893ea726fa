# DeepGuide (inferior MR + superior WSI), for every method of the family: per-split training
# of the superior (CLAM on WSI features) and inferior (3D DenseNet on MR) classifiers, which
# also write every patient's latent, then the kinds trained on those latents (guidance,
# guided, retrained head, fusion), and the figures.

GUIDE_METHODS = methods_of_family("guide")
GUIDE_METHODS_REGEX = alternatives_regex(GUIDE_METHODS)
GUIDE_IMAGE_REGEX = variants_where(
    GUIDE_METHODS, lambda spec: spec["model"] in ("superior", "inferior")
)
GUIDE_LATENT_REGEX = variants_where(
    GUIDE_METHODS, lambda spec: spec["model"] not in ("superior", "inferior")
)
guide_inputs = family_module("guide", "workflow")  # the rules' input functions


rule guide_train_images:
    input:
        unpack(lambda w: guide_inputs.fold_inputs(config, w.method, w.variant, w.fold)),
    output:
        model="results/{method}/{variant}/fold_{fold}/model.safetensors",
        predictions="results/{method}/{variant}/fold_{fold}/predictions.tsv",
        metrics="results/{method}/{variant}/fold_{fold}/metrics.tsv",
        train_log="results/{method}/{variant}/fold_{fold}/train_log.tsv",
        config="results/{method}/{variant}/fold_{fold}/config.yaml",
        latents="results/{method}/{variant}/fold_{fold}/latents.safetensors",
        latent_ids="results/{method}/{variant}/fold_{fold}/latents.tsv",
    log:
        "logs/guide_train_images/{method}_{variant}_fold{fold}.log",
    benchmark:
        "results/benchmarks/guide_train_images/{method}_{variant}_fold{fold}.tsv"
    wildcard_constraints:
        method=GUIDE_METHODS_REGEX,
        variant=GUIDE_IMAGE_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: lambda wildcards: config["methods"][wildcards.method]["resources"]["threads"]
    resources:
        # the split's MR volumes (or feature bags) in memory; paper scale (DenseNet-121 on
        # 4 x 140 x 220 x 220 crops, batch 10) needs one GPU with about 32 GB
        mem_mb=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "mem_mb"
        ],
        runtime=lambda wildcards: config["methods"][wildcards.method]["resources"][
            "runtime"
        ],
        gpu=lambda wildcards: config["methods"][wildcards.method]["resources"]["gpu"],
    params:
        out=subpath(output.metrics, parent=True),
        sources=lambda wildcards, input: guide_inputs.source_arguments(
            config, wildcards.method, wildcards.variant, input
        ),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag guide train --method {wildcards.method} --variant {wildcards.variant}"
        " --fold {wildcards.fold} --manifest {input.manifest} --splits {input.splits}"
        " {params.sources} --out {params.out} --threads {threads}"
        " --settings-json {params.settings:q} > {log} 2>&1"


rule guide_train_latents:
    input:
        unpack(lambda w: guide_inputs.fold_inputs(config, w.method, w.variant, w.fold)),
    output:
        model="results/{method}/{variant}/fold_{fold}/model.safetensors",
        predictions="results/{method}/{variant}/fold_{fold}/predictions.tsv",
        metrics="results/{method}/{variant}/fold_{fold}/metrics.tsv",
        train_log="results/{method}/{variant}/fold_{fold}/train_log.tsv",
        config="results/{method}/{variant}/fold_{fold}/config.yaml",
    log:
        "logs/guide_train_latents/{method}_{variant}_fold{fold}.log",
    benchmark:
        "results/benchmarks/guide_train_latents/{method}_{variant}_fold{fold}.tsv"
    wildcard_constraints:
        method=GUIDE_METHODS_REGEX,
        variant=GUIDE_LATENT_REGEX,
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=1000,  # a split's latents (patients x 1536 floats) and a linear layer or an MLP
        runtime=10,
        gpu=0,
    params:
        out=subpath(output.metrics, parent=True),
        sources=lambda wildcards, input: guide_inputs.source_arguments(
            config, wildcards.method, wildcards.variant, input
        ),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag guide train --method {wildcards.method} --variant {wildcards.variant}"
        " --fold {wildcards.fold} --manifest {input.manifest} --splits {input.splits}"
        " {params.sources} --out {params.out} --threads {threads}"
        " --settings-json {params.settings:q} > {log} 2>&1"


rule guide_figures:
    input:
        fold_all="results/{method}/fold_all.tsv",
        folds=lambda wildcards: guide_inputs.figure_inputs(
            config,
            wildcards.method,
            n_folds(config["methods"][wildcards.method]["split"]),
        ),
    output:
        figures=report(
            directory("results/{method}/figures"),
            patterns=["{name}.png"],
            caption="../report/guide_figures.rst",
            category="{method}",
            subcategory="figures",
            labels={"method": "{method}", "figure": "{name}"},
        ),
    log:
        "logs/guide_figures/{method}.log",
    wildcard_constraints:
        method=GUIDE_METHODS_REGEX,
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
        "python -m mmdiag guide figures --method {wildcards.method} --results {params.results}"
        " --out-dir {output.figures} --settings-json {params.settings:q} > {log} 2>&1"
