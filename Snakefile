# mmdiag: raw multi-modal images -> per-fold models -> statistics -> the papers' tables.
#   snakemake --cores 8 results/cmus/fold_all.tsv --sdm conda
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


# One file per method family: config/methods/<name>.yaml (merged in name order).
for method_config in sorted(Path("config/methods").glob("*.yaml")):

    configfile: method_config


wildcard_constraints:
    cohort=r"[A-Za-z0-9_-]+",
    scheme=r"[A-Za-z0-9_-]+",
    variant=r"[A-Za-z0-9_-]+",
    fold=r"\d+",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/patch.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/features.smk"


# One rule file per configured method family: workflow/rules/<family>.smk.
for family in configured_families():

    include: f"workflow/rules/{family}.smk"


include: "workflow/rules/stats.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
