# CMUS-Net (OM + IM + TEM bag): per-fold training of every variant, then fold_all.tsv.


rule cmus_train_fold:
    input:
        **get_method_inputs("cmus"),
    output:
        model="results/cmus/{variant}/fold_{fold}/model.safetensors",
        predictions="results/cmus/{variant}/fold_{fold}/predictions.tsv",
        metrics="results/cmus/{variant}/fold_{fold}/metrics.tsv",
        train_log="results/cmus/{variant}/fold_{fold}/train_log.tsv",
        config="results/cmus/{variant}/fold_{fold}/config.yaml",
    log:
        "logs/cmus_train_fold/{variant}_fold{fold}.log",
    benchmark:
        "results/benchmarks/cmus_train_fold/{variant}_fold{fold}.tsv"
    conda:
        "../../envs/mmdiag.yaml"
    threads: 2
    resources:
        # the fold's images are decoded once and kept in memory; paper scale (Swin-B x3 at
        # 224 px, batch 4) needs one GPU with about 16 GB
        mem_mb=config["methods"]["cmus"]["resources"]["mem_mb"],
        runtime=config["methods"]["cmus"]["resources"]["runtime"],
        gpu=config["methods"]["cmus"]["resources"]["gpu"],
    params:
        out=subpath(output.metrics, parent=True),
        settings=lambda wildcards: method_settings_json("cmus"),
    shell:
        "python -m mmdiag train --method cmus --variant {wildcards.variant}"
        " --fold {wildcards.fold} --manifest {input.manifest} --splits {input.splits}"
        " --out {params.out} --threads {threads} --settings-json {params.settings:q}"
        " > {log} 2>&1"


rule cmus_fold_all:
    input:
        metrics=get_method_fold_metrics("cmus"),
    output:
        fold_all="results/cmus/fold_all.tsv",
    log:
        "logs/cmus_fold_all/cmus.log",
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
        gpu=0,
    shell:
        "python -m mmdiag aggregate {input.metrics} --out {output.fold_all} > {log} 2>&1"
