# Cohort preparation: synthetic demo cohort, validated manifest, patient-level splits.


rule synth:
    output:
        raw=directory("results/{cohort}/raw"),
    log:
        "logs/synth/{cohort}.log",
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=2000,  # one slide and one patient's micrographs in memory at a time
        runtime=20,
        gpu=0,
    params:
        settings=lambda wildcards: cohort_synth_settings(wildcards.cohort),
    shell:
        "python -m mmdiag synth --out {output.raw} --settings-json {params.settings:q}"
        " --no-progress > {log} 2>&1"


checkpoint manifest:
    input:
        unpack(get_cohort_source),
    output:
        manifest="results/{cohort}/manifest.tsv",
    log:
        "logs/manifest/{cohort}.log",
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=2000,  # headers; with manifest.verify: decode, up to 4 whole images at once
        runtime=30,
        gpu=0,
    params:
        source=get_cohort_source_args,
        settings=lambda wildcards: cohort_manifest_settings(wildcards.cohort),
    shell:
        "python -m mmdiag manifest {params.source} --out {output.manifest}"
        " --settings-json {params.settings:q} > {log} 2>&1"


rule splits:
    input:
        unpack(get_split_inputs),
    output:
        splits="results/{cohort}/splits/{scheme}.json",
    log:
        "logs/splits/{cohort}_{scheme}.log",
    conda:
        "../../envs/mmdiag.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
        gpu=0,
    params:
        settings=lambda wildcards: settings_json("splits"),
    shell:
        "python -m mmdiag splits --manifest {input.manifest} --scheme {wildcards.scheme}"
        " --out {output.splits} --settings-json {params.settings:q} > {log} 2>&1"
