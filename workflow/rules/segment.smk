# Segmentation: the glomerulus of every OM image (SAM with a checkpoint, else classical).


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
        method=lambda wildcards: cmus_method_of_cohort(wildcards.cohort),
        settings=lambda wildcards: settings_json_of_method(
            cmus_method_of_cohort(wildcards.cohort)
        ),
    shell:
        "python -m mmdiag segment --manifest {input.manifest} --out-dir {params.out}"
        " --method {params.method} --settings-json {params.settings:q} > {log} 2>&1"
