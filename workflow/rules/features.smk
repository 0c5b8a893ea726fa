# Patch embeddings of every slide (every scale with its own encoder) and phenotype clusters.


rule extract_features:
    input:
        unpack(get_scale_encoders),
        manifest="results/{cohort}/manifest.tsv",
        stores=get_cohort_patch_stores,
    output:
        # One job per cohort: the encoders are loaded once and a GPU stays busy.
        stores=directory("results/{cohort}/features/stores"),
    log:
        "logs/extract_features/{cohort}.log",
    benchmark:
        "results/benchmarks/extract_features/{cohort}.tsv"
    conda:
        "../../envs/mmdiag.yaml"
    threads: config["features"]["resources"]["threads"]
    resources:
        mem_mb=config["features"]["resources"]["mem_mb"],
        runtime=config["features"]["resources"]["runtime"],
        gpu=config["features"]["resources"]["gpu"],
    params:
        settings=lambda wildcards: settings_json("features", "ssl"),
        encoders=get_encoder_arguments,
    shell:
        "python -m mmdiag extract-features {input.stores} --manifest {input.manifest}"
        " {params.encoders} --out-dir {output.stores}"
        " --settings-json {params.settings:q} > {log} 2>&1"


rule cluster_features:
    input:
        manifest="results/{cohort}/manifest.tsv",
        stores="results/{cohort}/features/stores",
    output:
        clusters="results/{cohort}/features/clusters.tsv",
    log:
        "logs/cluster_features/{cohort}.log",
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    params:
        settings=lambda wildcards: settings_json("features"),
    shell:
        "python -m mmdiag cluster-features {input.stores} --manifest {input.manifest}"
        " --out {output.clusters} --settings-json {params.settings:q} > {log} 2>&1"
