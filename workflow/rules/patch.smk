# Whole-slide images: tissue masks and concentric multi-scale patch stores, one per slide.


rule patch_slide:
    input:
        unpack(get_slide_inputs),
    output:
        store=directory("results/{cohort}/patches/{slide}.zarr"),
        mask="results/{cohort}/masks/tissue/{slide}.png",
        qc=report(
            "results/{cohort}/masks/tissue/{slide}_qc.png",
            caption="../report/tissue_qc.rst",
            category="Patching",
            subcategory="{cohort}",
            labels={"cohort": "{cohort}", "slide": "{slide}"},
        ),
    log:
        "logs/patch_slide/{cohort}/{slide}.log",
    benchmark:
        "results/benchmarks/patch_slide/{cohort}/{slide}.tsv"
    wildcard_constraints:
        slide=r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*",
    conda:
        "../../envs/mmdiag.yaml"
    threads: config["patching"]["workers"]
    resources:
        mem_mb=4000,  # blocks of block_px^2 RGB per worker plus the slide's patches in memory
        runtime=60,
        gpu=0,
    params:
        settings=lambda wildcards: settings_json("patching"),
        row=get_slide_row_params,
    shell:
        "python -m mmdiag patch --manifest {input.manifest} --image-id {wildcards.slide}"
        " --out {output.store} --mask {output.mask} --qc {output.qc}"
        " --settings-json {params.settings:q} > {log} 2>&1"


rule patch_index:
    input:
        stores=get_cohort_patch_stores,
    output:
        index="results/{cohort}/patches/index.tsv",
    log:
        "logs/patch_index/{cohort}.log",
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
        gpu=0,
    shell:
        "python -m mmdiag patch-index {input.stores} --out {output.index} > {log} 2>&1"
