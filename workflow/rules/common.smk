# Configuration validation, wildcard constraints and input functions shared by every rule.
import functools
import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

# The checkout's package validates the config, also where mmdiag is not installed. Its src/
# sits two folders above this file (workflow.basedir is the importing workflow's folder when
# this workflow is used as a module).
SOURCE_DIR = Path(str(workflow.current_basedir)).parents[1] / "src"
sys.path.insert(0, str(SOURCE_DIR))
from mmdiag.config import (
    ConfigError,
    cohort_manifest_rules,
    validate_config,
)  # noqa: E402
from mmdiag.data.splits import scheme_fold_count  # noqa: E402
from mmdiag.io import read_tsv  # noqa: E402
from mmdiag.methods import family_module  # noqa: E402

try:
    config.update(validate_config(config))
except ConfigError as error:
    raise WorkflowError(str(error))

# Rules run `python -m mmdiag`; putting the checkout's src/ on PYTHONPATH in every job's shell
# makes the package importable inside conda environments and cluster jobs alike.
shell.prefix(
    "set -euo pipefail; export PYTHONPATH="
    + shlex.quote(str(SOURCE_DIR))
    + "${{PYTHONPATH:+:$PYTHONPATH}}; "
)


def settings_json(*sections):
    """The validated config sections a stage needs, as JSON for `--settings-json`.

    Keys keep the config's order: variants are table rows in the order the config lists them.
    """
    return json.dumps({section: config[section] for section in sections})


#: Manifest settings that say how images are checked, not what the cohort holds.
MANIFEST_CHECK_KEYS = ("verify", "decode_regions_per_level")


def settings_json_of_method(method):
    """A method's validated settings plus its cohort's manifest rules (its classes; not how
    thoroughly the manifest checked the images, which does not change a method's run).
    """
    rules = cohort_manifest_rules(config, config["methods"][method]["cohort"])
    rules = {k: v for k, v in rules.items() if k not in MANIFEST_CHECK_KEYS}
    return json.dumps(
        {"methods": {method: config["methods"][method]}, "manifest": rules}
    )


def torch_launcher(n_gpus):
    """How a training job starts Python: plain for 0-1 GPU, torchrun with one process per GPU.

    Used as ``params: launcher=lambda wildcards, resources: torch_launcher(resources.gpu)`` so
    a profile's ``set-resources`` (e.g. 4 GPUs on a cluster) also sets the process count.
    """
    n_gpus = int(n_gpus or 0)
    if n_gpus <= 1:
        return "python"
    return f"torchrun --standalone --nproc-per-node {n_gpus}"


def cohort_config(cohort):
    """A configured cohort's settings; a target naming another cohort stops the DAG with the
    configured names (instead of a KeyError)."""
    if cohort not in config["cohorts"]:
        raise WorkflowError(
            f"unknown cohort {cohort!r} in a target (results/{cohort}/...); "
            f"configured cohorts: {sorted(config['cohorts'])}"
        )
    return config["cohorts"][cohort]


def cohort_synth_settings(cohort):
    """What `mmdiag synth` needs for a cohort: the synth section for the renal demo cohort;
    the generator's own settings for the thymic tumour (tet), RadPath-like (radpath) and
    glioma (glioma) cohorts; the toy settings and the patch size for toy slides (only what changes the files,
    so that other edits do not remake a cohort).
    """
    settings = cohort_config(cohort)
    generator = settings["generator"]
    if generator in ("tet", "radpath", "glioma"):
        return json.dumps(
            {"cohort": {"generator": generator, generator: settings[generator]}}
        )
    if settings["generator"] == "toy_mil":
        return json.dumps(
            {
                "cohort": {"generator": "toy_mil", "toy": settings["toy"]},
                "patching": {"patch_px": config["patching"]["patch_px"]},
            }
        )
    return json.dumps({"synth": config["synth"]})


def cohort_manifest_settings(cohort):
    """What `mmdiag manifest` needs for a cohort: the manifest rules with its overrides."""
    return json.dumps({"manifest": cohort_manifest_rules(config, cohort)})


def alternatives_regex(names):
    """A wildcard constraint that matches exactly one of ``names`` (never matches if empty)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


def configured_families():
    """The method families of the configured methods (each has workflow/rules/<family>.smk)."""
    return sorted({settings["family"] for settings in config["methods"].values()})


def methods_of_family(family):
    """The configured methods of a family, in config order."""
    return [
        m for m, settings in config["methods"].items() if settings["family"] == family
    ]


def variants_where(methods, condition):
    """A wildcard constraint matching the variants of ``methods`` whose settings satisfy
    ``condition``."""
    return alternatives_regex(
        {
            name
            for method in methods
            for name, spec in config["methods"][method]["variants"].items()
            if condition(spec)
        }
    )


#: Final targets that method rule files add beside each method's fold_all, tables, figures.
EXTRA_FINAL_OUTPUTS = []


def get_cohort_source(wildcards):
    """Inputs of the manifest step: the synthetic cohort folder, or the user's tables and the
    image files they list (so that an image replaced in place remakes the manifest and its
    checksum)."""
    cohort = cohort_config(wildcards.cohort)
    if cohort["synthetic"]:
        return {"raw": f"results/{wildcards.cohort}/raw"}
    if cohort["manifest"]:
        tables = {"user_manifest": cohort["manifest"]}
        images = Path(cohort["manifest"])
    else:
        root = Path(cohort["root"])
        tables = {"clinical": root / "clinical.tsv", "images": root / "images.tsv"}
        images = root / "images.tsv"
    return tables | {"image_files": listed_image_files(images)}


def listed_image_files(table_path):
    """The existing files and folders an images table (or manifest) lists, relative paths
    taken from its folder (as `mmdiag manifest` does). Missing ones and unreadable tables are left to `mmdiag manifest`,
    whose errors name every row."""
    try:
        table = read_tsv(table_path, all_strings=True)
    except Exception:  # the manifest step reports the table's problem
        return []
    if "path" not in table.columns:
        return []
    folder = Path(table_path).parent
    paths = (
        folder / Path(p.strip()).expanduser()
        for p in table["path"].dropna()
        if p.strip()
    )
    return sorted({str(p) for p in paths if p.exists()})


def get_cohort_source_args(wildcards, input):
    """Command-line arguments of `mmdiag manifest` for the cohort's source."""
    if "user_manifest" in input.keys():
        return f"--manifest {input.user_manifest}"
    if "raw" in input.keys():
        return f"--root {input.raw}"
    return f"--root {Path(input.clinical).parent}"


def n_folds(scheme):
    """Number of folds a split scheme produces."""
    return scheme_fold_count(config["splits"]["schemes"][scheme])


def get_split_inputs(wildcards):
    """Inputs of the splits step: the manifest, and a predefined scheme's partition table."""
    inputs = {"manifest": f"results/{wildcards.cohort}/manifest.tsv"}
    scheme = config["splits"]["schemes"].get(wildcards.scheme, {})
    if scheme.get("type") == "predefined":
        inputs["partition"] = scheme["path"]
    return inputs


def get_method_fold_files(method, name):
    """A per-fold file (metrics.tsv, predictions.tsv) of every variant x fold of a method."""
    settings = config["methods"][method]
    return expand(
        "results/{method}/{variant}/fold_{fold}/{name}",
        method=method,
        variant=list(settings["variants"]),
        fold=range(n_folds(settings["split"])),
        name=name,
    )


def get_method_inputs(method):
    """The manifest and split file a method trains on."""
    settings = config["methods"][method]
    return {
        "manifest": f"results/{settings['cohort']}/manifest.tsv",
        "splits": f"results/{settings['cohort']}/splits/{settings['split']}.json",
    }


def cohort_manifest_path(cohort):
    """The cohort's manifest; raises Snakemake's signal to wait while the checkpoint is due."""
    return checkpoints.manifest.get(cohort=cohort).output.manifest


@functools.cache
def manifest_slide_rows(manifest_path, modified_ns):
    """The WSI rows of a manifest by image_id (read once per version of the file)."""
    manifest = read_tsv(manifest_path, all_strings=True)
    slides = manifest[manifest["modality"] == "WSI"]
    return {row["image_id"]: row for row in slides.to_dict("records")}


def cohort_slide_rows(cohort):
    path = cohort_manifest_path(cohort)
    return manifest_slide_rows(path, Path(path).stat().st_mtime_ns)


def cohort_patch_stores(cohort):
    """Every WSI of a cohort's manifest as a patch store (the manifest is a checkpoint)."""
    return [
        f"results/{cohort}/patches/{slide}.zarr"
        for slide in sorted(cohort_slide_rows(cohort))
    ]


def get_cohort_patch_stores(wildcards):
    return cohort_patch_stores(wildcards.cohort)


def slide_row(wildcards):
    rows = cohort_slide_rows(wildcards.cohort)
    if wildcards.slide not in rows:
        raise WorkflowError(
            f"{cohort_manifest_path(wildcards.cohort)}: no WSI row with image_id "
            f"{wildcards.slide!r}"
        )
    return rows[wildcards.slide]


def get_slide_inputs(wildcards):
    """A slide's patch job reads its own file and its own manifest row only: the manifest is
    `ancient` (a rewrite for another patient does not re-patch this slide) and the row's
    path, checksum and µm/px are the job's `params`, whose change re-runs it."""
    return {
        "manifest": ancient(cohort_manifest_path(wildcards.cohort)),
        "slide": slide_row(wildcards)["path"],
    }


def get_slide_row_params(wildcards):
    row = slide_row(wildcards)
    return json.dumps({key: row.get(key, "") for key in ("path", "sha256", "mpp")})


def patch_scales():
    """Scale names of the patch stores, finest first (20x, 10x, 5x for the defaults)."""
    from mmdiag.patching.tiling import scale_name

    patching = config["patching"]
    factors = [1, *patching["context_factors"]]
    return [scale_name(patching["base_mpp"] * factor) for factor in factors]


def get_scale_encoders(wildcards):
    """The pretrained encoder of every scale of a cohort's patch stores."""
    return {
        scale: f"results/{wildcards.cohort}/ssl/{scale}/encoder.safetensors"
        for scale in patch_scales()
    }


def get_encoder_arguments(wildcards, input):
    """`--encoder SCALE=PATH` for each scale."""
    return " ".join(
        f"--encoder {scale}={input[scale]}" for scale in get_scale_encoders(wildcards)
    )


def get_method_inputs_of(wildcards):
    """The manifest and split file of the method in the wildcards."""
    return get_method_inputs(wildcards.method)


def get_method_clusters(wildcards):
    """The phenotype clusters of a method's cohort."""
    return (
        f"results/{config['methods'][wildcards.method]['cohort']}/features/clusters.tsv"
    )


def get_method_feature_stores(wildcards):
    """The folder of feature stores of a method's cohort."""
    return f"results/{config['methods'][wildcards.method]['cohort']}/features/stores"


def get_overview_inputs(wildcards):
    """The report's overview reads every method's cohort manifest and summary."""
    methods = config["methods"]
    inputs = {f"summary_{m}": f"results/{m}/summary.tsv" for m in methods}
    cohorts = sorted({settings["cohort"] for settings in methods.values()})
    return inputs | {f"manifest_{c}": f"results/{c}/manifest.tsv" for c in cohorts}


def get_overview_arguments(wildcards, input):
    """`mmdiag overview` options naming each manifest and summary."""
    arguments = []
    for name, path in input.items():
        kind, _, key = name.partition("_")
        arguments.append(f"--{kind} {shlex.quote(f'{key}={path}')}")
    return " ".join(arguments)


def get_final_outputs():
    """Final targets: each configured method's fold_all.tsv, tables and figures, what the
    method rule files add (EXTRA_FINAL_OUTPUTS), and the report's overview page."""
    return (
        [
            f"results/{method}/{name}"
            for method in config["methods"]
            for name in ("fold_all.tsv", "tables", "figures")
        ]
        + EXTRA_FINAL_OUTPUTS
        + ["results/overview.html"]
    )
