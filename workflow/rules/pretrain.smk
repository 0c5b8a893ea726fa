# Self-supervised SimSiam pretraining: one encoder per scale, each its own (GPU) job.


rule ssl_pretrain:
    input:
        stores=get_cohort_patch_stores,
    output:
        encoder="results/{cohort}/ssl/{scale}/encoder.safetensors",
        log_table="results/{cohort}/ssl/{scale}/train_log.tsv",
        settings="results/{cohort}/ssl/{scale}/config.yaml",
        curve=report(
            "results/{cohort}/ssl/{scale}/loss.png",
            caption="../report/ssl_loss.rst",
            category="Pretraining",
            subcategory="{cohort}",
            labels={"cohort": "{cohort}", "scale": "{scale}"},
        ),
    log:
        "logs/ssl_pretrain/{cohort}/{scale}.log",
    benchmark:
        "results/benchmarks/ssl_pretrain/{cohort}/{scale}.tsv"
    wildcard_constraints:
        scale=r"[0-9.]+x",
    conda:
        "../../envs/mmdiag.yaml"
    threads: config["ssl"]["resources"]["threads"]
    resources:
        # Two augmented views of a batch through the encoder; ResNet-50 at batch 128 and
        # 224 px needs about 20 GB of GPU memory, the host holds the decoding workers.
        mem_mb=config["ssl"]["resources"]["mem_mb"],
        runtime=config["ssl"]["resources"]["runtime"],
        gpu=config["ssl"]["resources"]["gpu"],
    params:
        settings=lambda wildcards: settings_json("ssl"),
        launcher=lambda wildcards, resources: torch_launcher(resources.gpu),
        out_dir=subpath(output.encoder, parent=True),
        # Kept between attempts (not an output, so Snakemake does not delete it): a job
        # killed by the scheduler resumes from its last completed epoch.
        state="results/{cohort}/ssl/.resume/{scale}",
    shell:
        "{params.launcher} -m mmdiag ssl-pretrain {input.stores} --scale {wildcards.scale}"
        " --out-dir {params.out_dir} --state-dir {params.state}"
        " --settings-json {params.settings:q} > {log} 2>&1"
