# CMUS-Net (OM + IM + TEM bag): per-fold training of every variant, fold_all.tsv, tables.


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
        metrics=get_method_fold_files("cmus", "metrics.tsv"),
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


rule cmus_tables:
    input:
        fold_all="results/cmus/fold_all.tsv",
        predictions=get_method_fold_files("cmus", "predictions.tsv"),
    output:
        summary="results/cmus/summary.tsv",
        stats="results/cmus/stats.tsv",
        table_md=report(
            "results/cmus/table.md",
            caption="../report/cmus_table.rst",
            category="CMUS-Net",
        ),
        table_tex="results/cmus/table.tex",
    log:
        "logs/cmus_tables/cmus.log",
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    params:
        out=subpath(output.summary, parent=True),
        settings=lambda wildcards: method_settings_json("cmus"),
    shell:
        "python -m mmdiag tables --method cmus --fold-all {input.fold_all} --out-dir {params.out}"
        " --settings-json {params.settings:q} {input.predictions} > {log} 2>&1"
