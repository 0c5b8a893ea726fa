"""Configuration: loading, merging, validation against ``config/schema.yaml`` and defaults.

Snakemake and the command line share this code, so a bad key is reported the same way
everywhere: with its dotted path, the value found and what is allowed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

PACKAGE_ROOT = Path(__file__).resolve().parent
SCHEMA_CANDIDATES = (
    PACKAGE_ROOT.parents[1] / "config" / "schema.yaml",  # source checkout / editable install
    PACKAGE_ROOT / "schema.yaml",
)


class ConfigError(ValueError):
    """A configuration that does not satisfy the schema; the message lists every problem."""


@lru_cache(maxsize=1)
def load_schema() -> dict:
    """Return the configuration JSON schema (``config/schema.yaml``)."""
    for candidate in SCHEMA_CANDIDATES:
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text())
    raise FileNotFoundError(f"config schema not found in {[str(p) for p in SCHEMA_CANDIDATES]}")


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """Return ``base`` updated recursively by ``override`` (the same rule as Snakemake's)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(paths: Iterable[str | Path]) -> dict:
    """Read and merge YAML config files in order, then validate and fill defaults."""
    config: dict = {}
    for path in paths:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from error
        if not isinstance(loaded, Mapping):
            raise ConfigError(
                f"config file {path} must hold a mapping, not {type(loaded).__name__}"
            )
        config = deep_merge(config, loaded)
    return validate_config(config)


def validate_config(config: Mapping, *, source: str = "config") -> dict:
    """Validate ``config`` against the schema, fill defaults and check cross-references.

    Returns a new dictionary; raises :class:`ConfigError` listing every problem.
    """
    config = copy.deepcopy(dict(config))
    family_problems = list(_assign_families(config))
    schema = _schema_of_methods(config, load_schema())
    _fill_defaults(config, schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    problems = family_problems + [_describe(error) for error in validator.iter_errors(config)]
    if not problems:
        for settings in config.get("methods", {}).values():
            _expand_loss_weight_grid(settings, schema)
        problems = list(_cross_reference_problems(config))
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in sorted(set(problems)))
        raise ConfigError(f"invalid {source}:\n{listing}")
    return config


def method_families(schema: Mapping | None = None) -> dict[str, Mapping]:
    """The method families of the schema: ``$defs`` entries whose ``family`` is their name."""
    schema = schema or load_schema()
    return {
        name: definition
        for name, definition in schema["$defs"].items()
        if definition.get("properties", {}).get("family", {}).get("const") == name
    }


def family_schema(family: str, schema: Mapping | None = None) -> dict:
    """The schema of a method of ``family``: ``$defs/method`` (the keys every method shares)
    with ``$defs/<family>`` merged over it (its own keys, and its defaults for shared ones)."""
    schema = schema or load_schema()
    shared = schema["$defs"]["method"]
    own = method_families(schema)[family]
    merged = deep_merge(shared, own)
    merged["required"] = sorted(set(shared.get("required", [])) | set(own.get("required", [])))
    return merged


def _assign_families(config: dict) -> Iterable[str]:
    """Give each method its ``family`` (default: its own name, when that is a family); yield a
    problem for a family the schema does not define."""
    families = sorted(method_families())
    for name, settings in config.get("methods", {}).items():
        if not isinstance(settings, dict):
            continue
        if "family" not in settings and name in families:
            settings["family"] = name
        family = settings.get("family")
        if family is not None and family not in families:
            yield (
                f"methods.{name}.family: {family!r} is not a method family; "
                f"allowed values: {families}"
            )


def _schema_of_methods(config: Mapping, schema: Mapping) -> dict:
    """The schema with each configured method's own entry (:func:`family_schema`)."""
    families = method_families(schema)
    family_only = {"type": "object", "required": ["family"]}  # the family problem alone
    per_method = {
        name: (
            family_schema(settings["family"], schema)
            if isinstance(settings, Mapping) and settings.get("family") in families
            else family_only
        )
        for name, settings in config.get("methods", {}).items()
    }
    schema = copy.deepcopy(dict(schema))
    schema["properties"]["methods"]["properties"] = per_method
    return schema


def _resolve(node: Mapping, schema: Mapping) -> Mapping:
    ref = node.get("$ref")
    if ref:
        target: Any = schema
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        return target
    return node


def _fill_defaults(instance: Any, node: Mapping, schema: Mapping) -> None:
    """Insert schema defaults for absent keys, recursing into objects."""
    node = _resolve(node, schema)
    if not isinstance(instance, dict) or node.get("type") not in ("object", None):
        return
    for key, child in node.get("properties", {}).items():
        child = _resolve(child, schema)
        if key not in instance and "default" in child:
            instance[key] = copy.deepcopy(child["default"])
        if key in instance:
            _fill_defaults(instance[key], child, schema)
    patterns = node.get("patternProperties", {})
    extra = node.get("additionalProperties")
    for key, value in instance.items():
        if key in node.get("properties", {}):
            continue
        matching = [child for pattern, child in patterns.items() if re.search(pattern, key)]
        for child in matching:
            _fill_defaults(value, child, schema)
        if not matching and isinstance(extra, Mapping):
            _fill_defaults(value, extra, schema)


def _describe(error: jsonschema.ValidationError) -> str:
    """Turn a jsonschema error into one line that names the key and the allowed values."""
    key = ".".join(str(part) for part in error.absolute_path) or "(top level)"
    validator = error.validator
    if validator == "enum":
        return f"{key}: {error.instance!r} is not allowed; allowed values: {error.validator_value}"
    if validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        where = f"{key}: " if error.absolute_path else ""
        return f"{where}unknown key(s) {unknown}; allowed keys: {allowed}"
    if validator == "type":
        return f"{key}: {error.instance!r} has the wrong type; expected {error.validator_value}"
    return f"{key}: {error.message}"


def _cross_reference_problems(config: Mapping) -> Iterable[str]:
    """Names that must refer to other sections: cohorts, split schemes, reference variants."""
    cohorts = config.get("cohorts", {})
    schemes = config.get("splits", {}).get("schemes", {})
    for name, cohort in cohorts.items():
        if not cohort.get("synthetic") and not (cohort.get("root") or cohort.get("manifest")):
            yield (
                f"cohorts.{name}: give `root` (cohort folder) or `manifest` (TSV), or set synthetic"
            )
        if cohort.get("root") and cohort.get("manifest"):
            yield f"cohorts.{name}: give either `root` or `manifest`, not both"
    for name, scheme in schemes.items():
        if scheme["type"] == "predefined" and not scheme.get("path"):
            yield f"splits.schemes.{name}: a predefined scheme needs `path` (its partition TSV)"
        if scheme["type"] in ("kfold", "repeated") and scheme.get("n_seeds", 1) != 1:
            yield (
                f"splits.schemes.{name}: n_seeds applies to holdout and predefined schemes "
                f"(a {scheme['type']} scheme already varies its partitions)"
            )
    for method, settings in config.get("methods", {}).items():
        if settings["cohort"] not in cohorts:
            yield (
                f"methods.{method}.cohort: {settings['cohort']!r} is not a cohort; "
                f"allowed values: {sorted(cohorts)}"
            )
        if settings["split"] not in schemes:
            yield (
                f"methods.{method}.split: {settings['split']!r} is not a split scheme; "
                f"allowed values: {sorted(schemes)}"
            )
        else:
            yield from _label_problems(method, settings, config, schemes[settings["split"]])
        variants = settings.get("variants", {})
        yield from _variant_problems(method, settings, variants)
        yield from _family_problems(method, settings, config)


def _family_problems(method: str, settings: Mapping, config: Mapping) -> Iterable[str]:
    """A family's own checks: ``config_problems(method, settings, config)`` in its
    ``methods/<family>/settings.py``, when it defines one."""
    import importlib

    try:
        module = importlib.import_module(f"mmdiag.methods.{settings['family']}.settings")
    except ModuleNotFoundError:
        return
    check = getattr(module, "config_problems", None)
    if check is not None:
        yield from check(method, settings, config)


def _label_problems(method: str, settings: Mapping, config: Mapping, scheme: Mapping):
    """A method's tasks and its split's stratification label must be label columns of its
    cohort (``disease``, ``mn_stage`` or one of the cohort's tasks)."""
    from mmdiag.data.tasks import cohort_tasks

    if settings["cohort"] not in config.get("cohorts", {}):
        return
    tasks = cohort_tasks(cohort_manifest_rules(config, settings["cohort"]))
    columns = {task.column for task in tasks.values()}
    if scheme.get("label", "disease") not in columns:
        yield (
            f"methods.{method}.split: its label {scheme.get('label')!r} is not a label column "
            f"of cohort {settings['cohort']!r}; allowed values: {sorted(columns)}"
        )
    unknown = [name for name in settings.get("tasks") or [] if name not in tasks]
    if unknown:
        yield (
            f"methods.{method}.tasks: {unknown} are not tasks of cohort {settings['cohort']!r}; "
            f"allowed values: {sorted(tasks)}"
        )


def _variant_problems(method: str, settings: Mapping, variants: Mapping) -> Iterable[str]:
    """The reference, table rows and vote members must name variants."""
    where = f"methods.{method}"
    if settings.get("reference") not in variants:
        yield (
            f"{where}.reference: {settings.get('reference')!r} is not a variant; "
            f"allowed values: {sorted(variants)}"
        )
    headline = settings.get("headline")
    if headline and headline["variant"] not in variants:
        yield (
            f"{where}.headline.variant: {headline['variant']!r} is not a variant; "
            f"allowed values: {sorted(variants)}"
        )
    for name, table in settings.get("tables", {}).items():
        unknown = [r for r in table["rows"] if r not in variants]
        reference = table.get("reference") or settings.get("reference")
        if reference not in table["rows"]:
            yield f"{where}.tables.{name}.reference: {reference!r} is not one of its rows"
        if unknown:
            yield f"{where}.tables.{name}: {sorted(set(unknown))} are not variants of its rows"
    grid = settings.get("loss_weight_grid")
    if grid and grid["base"] not in variants:
        yield (
            f"{where}.loss_weight_grid.base: {grid['base']!r} is not a variant; "
            f"allowed values: {sorted(variants)}"
        )
    trained = [v for v, spec in variants.items() if spec["model"] != "late_vote"]
    for name, spec in variants.items():
        if spec["model"] == "late_vote":
            bad = [m for m in spec["members"] if m not in trained]
            if len(spec["members"]) < 2 or bad:
                yield (
                    f"{where}.variants.{name}.members: a vote needs at least two trained "
                    f"variants; {bad or spec['members']} given, allowed values: {sorted(trained)}"
                )
        elif "loss_weights" in spec and abs(sum(spec["loss_weights"].values()) - 1) > 1e-6:
            yield f"{where}.variants.{name}.loss_weights: must sum to 1, got {spec['loss_weights']}"


def cohort_manifest_rules(config: Mapping, cohort: str) -> dict:
    """The manifest section with a cohort's ``manifest_rules`` overrides (e.g. its classes).

    Every method reads its classes through this, whatever its family, so a method trains on
    the classes its cohort's manifest was built with.
    """
    overrides = config.get("cohorts", {}).get(cohort, {}).get("manifest_rules", {})
    return dict(config["manifest"]) | dict(overrides)


def loss_weight_grid(step: float, minimum: float) -> list[tuple[float, float, float]]:
    """(alpha, beta, gamma) on a grid of ``step`` with every weight >= ``minimum``, summing to 1."""
    n_steps = round(1 / step)
    low = round(minimum / step)
    grid = []
    for a in range(low, n_steps + 1):
        for b in range(low, n_steps + 1 - a):
            g = n_steps - a - b
            if g >= low:
                grid.append((round(a * step, 10), round(b * step, 10), round(g * step, 10)))
    return grid


def loss_weight_variant_name(alpha: float, beta: float, gamma: float) -> str:
    """The name of the grid variant with loss weights (alpha, beta, gamma)."""
    return f"wl_a{round(alpha * 10)}_b{round(beta * 10)}_g{round(gamma * 10)}"


def loss_weight_grid_variants(settings: Mapping) -> list[str]:
    """The names of the variants a method's ``loss_weight_grid`` adds (none without one)."""
    grid = settings.get("loss_weight_grid")
    if not grid:
        return []
    return [loss_weight_variant_name(*w) for w in loss_weight_grid(grid["step"], grid["minimum"])]


def _expand_loss_weight_grid(settings: dict, schema: Mapping) -> None:
    """Fig. 6: add a copy of the grid's base variant for every (alpha, beta, gamma)."""
    grid = settings.get("loss_weight_grid")
    if not grid or grid["base"] not in settings["variants"]:
        return
    base = settings["variants"][grid["base"]]
    for alpha, beta, gamma in loss_weight_grid(grid["step"], grid["minimum"]):
        name = loss_weight_variant_name(alpha, beta, gamma)
        variant = copy.deepcopy(base)
        variant["loss_weights"] = {"OM": alpha, "IM": beta, "TEM": gamma}
        settings["variants"].setdefault(name, variant)
