# CMUS-Net (OM + IM + TEM bag), for every method of the family (cmus, cmus_staging): OM
# glomerulus segmentation, per-fold training or late votes, and figures.

CMUS_METHODS = methods_of_family("cmus")
CMUS_METHODS_REGEX = alternatives_regex(CMUS_METHODS)
CMUS_TRAINED_REGEX = variants_where(
    CMUS_METHODS, lambda spec: spec["model"] != "late_vote"
)
CMUS_VOTE_REGEX = variants_where(
    CMUS_METHODS, lambda spec: spec["model"] == "late_vote"
)
cmus_inputs = family_module("cmus", "workflow")  # the rules' input functions


rule cmus_segment:
    input:
        manifest="results/{cohort}/manifest.tsv",
    output:
        table="results/{cohort}/masks/glomerulus/glomeruli.tsv",
        masks=directory("results/{cohort}/masks/glomerulus/masks"),
        qc=directory("results/{cohort}/masks/glomerulus/qc"),
    log:
        "logs/cmus_segment/{cohort}.log",
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=4000,  # one OM image at a time; a SAM ViT-H checkpoint needs about 3 GB
        runtime=60,
        gpu=0,
    params:
        out=subpath(output.table, parent=True),
        method=lambda wildcards: cmus_inputs.method_of_cohort(config, wildcards.cohort),
        settings=lambda wildcards: settings_json_of_method(
            cmus_inputs.method_of_cohort(config, wildcards.cohort)
        ),
    shell:
        "python -m mmdiag cmus segment --manifest {input.manifest} --out-dir {params.out}"
        " --method {params.method} --settings-json {params.settings:q} > {log} 2>&1"


rule cmus_train_fold:
    input:
        unpack(lambda wildcards: cmus_inputs.fold_inputs(config, wildcards.method)),
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
        crops=lambda wildcards, input: cmus_inputs.crop_argument(input),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "{params.launcher} -m mmdiag cmus train --method {wildcards.method} --variant {wildcards.variant}"
        " --fold {wildcards.fold} --manifest {input.manifest} --splits {input.splits}"
        " {params.crops} --out {params.out} --threads {threads}"
        " --settings-json {params.settings:q} > {log} 2>&1"


rule cmus_vote_fold:
    input:
        members=lambda w: cmus_inputs.vote_members(config, w.method, w.variant, w.fold),
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
        "python -m mmdiag cmus vote --method {wildcards.method} --variant {wildcards.variant}"
        " --fold {wildcards.fold} --out {params.out} --settings-json {params.settings:q}"
        " {input.members} > {log} 2>&1"


rule cmus_figures:
    input:
        unpack(lambda wildcards: cmus_inputs.fold_inputs(config, wildcards.method)),
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
            category="{method}",
            subcategory="figures",
            labels={"method": "{method}", "figure": "{name}"},
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
        crops=lambda wildcards, input: cmus_inputs.crop_argument(input),
        settings=lambda wildcards: settings_json_of_method(wildcards.method),
    shell:
        "python -m mmdiag cmus figures --method {wildcards.method} --results {params.results}"
        " --manifest {input.manifest} --splits {input.splits} {params.crops}"
        " --out-dir {output.figures} --settings-json {params.settings:q} > {log} 2>&1"
