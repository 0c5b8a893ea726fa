# mmdiag: raw multi-modal images -> per-fold models -> statistics -> the papers' tables.
#   snakemake --cores 8 --use-conda results/cmus/fold_all.tsv
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"
configfile: "config/methods/cmus.yaml"
configfile: "config/methods/csmil.yaml"


wildcard_constraints:
    cohort=r"[A-Za-z0-9_-]+",
    scheme=r"[A-Za-z0-9_-]+",
    variant=r"[A-Za-z0-9_-]+",
    fold=r"\d+",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/patch.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/cmus.smk"
include: "workflow/rules/csmil.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
