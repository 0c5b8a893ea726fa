"""Deploying the workflow: as a module of another Snakemake workflow, its workflow-catalog
metadata, the configuration guide, and the command lines the documentation shows."""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from snakemake.cli import get_argument_parser

from mmdiag.config import ConfigError, load_config

from .test_workflow import BIN, ROOT, TINY_CONFIG, _run, copy_workflow

CATALOG_FILE = ROOT / ".snakemake-workflow-catalog.yml"
CONFIG_README = ROOT / "config/README.md"
DOCS = ("README.md", "config/README.md")

# The keys the Snakemake workflow catalog documents for .snakemake-workflow-catalog.yml (its
# "Adding workflows" page; the catalog generator reads usage.mandatory-flags, usage.report and
# usage.software-stack-deployment, and shows `singularity` as `apptainer`).
CATALOG_USAGE_KEYS = {"mandatory-flags", "software-stack-deployment", "report"}
CATALOG_DEPLOYMENT_KEYS = {
    "conda",
    "apptainer",
    "apptainer+conda",
    "singularity",
    "singularity+conda",
}

OUTER_SNAKEFILE = """\
from pathlib import Path

MMDIAG = Path({workflow})


configfile: MMDIAG / "config/config.yaml"


for method_config in sorted((MMDIAG / "config/methods").glob("*.yaml")):

    configfile: method_config


configfile: "tiny.yaml"


module mmdiag:
    snakefile:
        str(MMDIAG / "Snakefile")
    config:
        config


use rule * from mmdiag{rename}


rule which_mmdiag:
    output:
        "which_mmdiag.txt",
    shell:
        "python -c 'import mmdiag; print(mmdiag.__file__)' > {{output}}"
"""
MODULE_TARGETS = (
    "results/demo/splits/kfold3.json",
    "results/demo/patches/index.tsv",
    "which_mmdiag.txt",
)


def copy_checkout(folder: Path) -> Path:
    """A checkout of the workflow elsewhere: what Snakemake reads, and the package's source."""
    folder.mkdir()
    copy_workflow(folder)
    shutil.copytree(ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


@pytest.fixture(scope="module", params=["", " as mmdiag_*"], ids=["same_names", "prefixed"])
def module_run(request, tmp_path_factory):
    """Another workflow that imports this one as a Snakemake module (`module mmdiag:`,
    `use rule * from mmdiag`, with and without renaming the rules) and builds the tiny demo
    cohort's splits and patch index (through the manifest checkpoint) in its own folder.

    A module ignores its own `configfile:` directives when it is given `config:`, so the outer
    workflow loads the workflow's config.yaml and methods/*.yaml itself, then its own file.
    """
    base = tmp_path_factory.mktemp("deploy")
    checkout = copy_checkout(base / "mmdiag")
    outer = base / "analysis"
    outer.mkdir()
    snakefile = OUTER_SNAKEFILE.format(workflow=json.dumps(str(checkout)), rename=request.param)
    (outer / "Snakefile").write_text(snakefile)
    (outer / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    command = [str(BIN / "snakemake"), "--cores", "2", "--show-failed-logs", *MODULE_TARGETS]
    result = _run(command, outer)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return checkout, outer, command, request.param, result.stdout + result.stderr


@pytest.mark.integration
def test_the_workflow_runs_as_a_module_of_another_workflow(module_run):
    _, outer, command, rename, log = module_run
    header, *rows = (outer / "results/demo/manifest.tsv").read_text().splitlines()
    column = header.split("\t").index("patient_id")
    patients = {row.split("\t")[column] for row in rows}
    assert len(patients) == TINY_CONFIG["synth"]["n_patients"]
    splits = json.loads((outer / "results/demo/splits/kfold3.json").read_text())
    assert len(splits["folds"]) == 3
    index = (outer / "results/demo/patches/index.tsv").read_text().splitlines()
    assert len(index) == 1 + TINY_CONFIG["synth"]["wsi"]["n_patients"]
    assert (outer / "logs/splits/demo_kfold3.log").is_file()
    prefix = "mmdiag_" if rename else ""
    assert f"rule {prefix}splits:" in log

    again = _run([*command, "--dry-run"], outer)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.integration
def test_module_jobs_run_the_package_of_the_module_checkout(module_run):
    checkout, outer, *_ = module_run
    source = Path((outer / "which_mmdiag.txt").read_text().strip())
    assert source == checkout / "src/mmdiag/__init__.py"


def test_the_catalog_file_uses_the_documented_keys():
    settings = yaml.safe_load(CATALOG_FILE.read_text())
    assert set(settings) == {"usage"}
    usage = settings["usage"]
    assert set(usage) <= CATALOG_USAGE_KEYS
    assert {"software-stack-deployment", "report"} <= set(usage)

    flags = usage.get("mandatory-flags", {})
    assert set(flags) <= {"desc", "flags"}
    assert isinstance(flags.get("desc", ""), str)
    listed = flags.get("flags", [])
    assert isinstance(listed, str) or all(isinstance(flag, str) for flag in listed)

    deployment = usage["software-stack-deployment"]
    assert set(deployment) <= CATALOG_DEPLOYMENT_KEYS
    assert all(isinstance(value, bool) for value in deployment.values())
    assert deployment["conda"] is True
    assert usage["report"] is True


def _rule_blocks(rule_file: Path):
    """(name, text) of every rule and checkpoint of a rule file."""
    text = rule_file.read_text()
    starts = list(re.finditer(r"^(?:rule|checkpoint) (\w+):", text, flags=re.M))
    ends = [match.start() for match in starts[1:]] + [len(text)]
    for match, end in zip(starts, ends[: len(starts)], strict=True):
        yield match.group(1), text[match.start() : end]


def test_the_catalog_claims_hold_for_the_rule_files():
    """conda: every rule that runs a command declares an environment file that exists;
    report: outputs are marked for the report, each with a caption file that exists."""
    captions = []
    for rule_file in sorted((ROOT / "workflow/rules").glob("*.smk")):
        for name, block in _rule_blocks(rule_file):
            if "shell:" in block:
                env = re.search(r"conda:\s*\n\s*\"([^\"]+)\"", block)
                assert env, f"{rule_file.name}: rule {name} declares no conda environment"
                assert (rule_file.parent / env.group(1)).is_file(), (name, env.group(1))
            for caption in re.findall(r"caption=\"([^\"]+)\"", block):
                assert (rule_file.parent / caption).is_file(), (name, caption)
                captions.append(caption)
    assert captions


def test_the_config_readme_describes_every_config_file():
    text = CONFIG_README.read_text()
    folder = ROOT / "config"
    files = [path for path in folder.iterdir() if path.is_file() and path.name != "README.md"]
    for sub in ("methods", "paper"):
        files += sorted((folder / sub).glob("*"))
    assert len(files) > 4
    missing = [str(path.relative_to(folder)) for path in files]
    missing = [name for name in missing if f"`{name}`" not in text]
    assert not missing, f"config/README.md does not mention {missing}"


# The documented command lines


def _fenced_blocks(text: str):
    """(language, first line number, lines) of every ``` block of a Markdown text."""
    block, language, start = None, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            if block is None:
                block, language, start = [], line.strip()[3:].strip(), number + 1
            else:
                yield language, start, block
                block = None
        elif block is not None:
            block.append(line)


def documented_commands(program: str = "snakemake"):
    """(doc, line number, command) of every `snakemake ...` (or other ``program``) line in a
    fenced block of the README and config/README.md, continuation lines (a trailing
    backslash) joined."""
    commands, seen = [], set()
    for doc in DOCS:
        for _, start, lines in _fenced_blocks((ROOT / doc).read_text()):
            joined, first = "", None
            for number, line in enumerate(lines, start=start):
                first = number if not joined else first
                if line.rstrip().endswith("\\"):
                    joined += line.strip()[:-1].strip() + " "
                    continue
                command, joined = (joined + line.strip()).strip(), ""
                if not command.startswith(f"{program} "):
                    continue
                try:  # the same command with another comment is one command
                    key = tuple(shlex.split(command, comments=True))
                except ValueError:  # unbalanced quotes: its test reports it
                    key = (command,)
                if key not in seen:
                    seen.add(key)
                    commands.append((doc, first, command))
    return commands


def documented_files():
    """The YAML blocks that name their file on their first line (`# my_cohort.yaml`)."""
    files = {}
    for doc in DOCS:
        for language, _, lines in _fenced_blocks((ROOT / doc).read_text()):
            named = re.fullmatch(r"#\s*([\w.-]+\.ya?ml)\s*", lines[0]) if lines else None
            if language in ("yaml", "yml") and named:
                files[named.group(1)] = "\n".join(lines[1:]) + "\n"
    return files


DEPLOYMENT_FLAGS = {"--sdm", "--software-deployment-method", "--deployment-method", "--deployment"}


def _without_deployment(tokens):
    """The command line without --use-conda and --sdm and its values."""
    kept, dropping = [], False
    for token in tokens:
        if dropping and not token.startswith("-"):
            continue
        dropping = False
        if token == "--use-conda" or token.split("=")[0] in DEPLOYMENT_FLAGS:
            dropping = "=" not in token and token != "--use-conda"
            continue
        kept.append(token)
    return kept


def plan_dry_run(command: str, workdir: Path):
    """The arguments that dry-run ``command`` in the copy ``workdir``, or why it is skipped.

    See :func:`test_documented_command_dry_runs` for the rules.
    """
    tokens = shlex.split(command, comments=True)[1:]
    try:
        args = get_argument_parser().parse_args(tokens)
    except (SystemExit, ValueError) as error:  # a usage error, or a value it cannot parse
        raise AssertionError(f"Snakemake does not accept {command!r}: {error!r}") from error

    configfiles = [workdir / path for path in args.configfile or []]
    absent = [str(path.relative_to(workdir)) for path in configfiles if not path.is_file()]
    if absent:
        return None, f"config file(s) {absent} are the reader's own"
    defaults = [workdir / "config/config.yaml", *sorted(workdir.glob("config/methods/*.yaml"))]
    config = load_config([*defaults, *configfiles])  # a documented config must be valid

    if args.executor == "slurm":
        return None, "runs on a SLURM cluster"
    for profile in (args.workflow_profile, args.profile):
        if profile is None:
            continue
        folder = workdir / Path(profile).expanduser()
        if not (folder / "config.yaml").is_file():
            return None, f"profile {profile} is the reader's own"
        settings = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        if settings.get("executor", "local") != "local":
            return None, f"profile {profile} runs on a cluster"

    for name, cohort in config["cohorts"].items():
        if cohort["synthetic"]:
            continue
        if cohort["root"]:
            paths = [Path(cohort["root"]) / "clinical.tsv", Path(cohort["root"]) / "images.tsv"]
        else:
            paths = [Path(cohort["manifest"])]
        for path in paths:
            if path.is_absolute():
                if not path.exists():
                    return None, f"cohort {name} is the reader's own ({path})"
                continue
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
            (workdir / path).touch()
    return [*_without_deployment(tokens), "--dry-run"], None


@pytest.fixture(scope="module")
def docs_copy(tmp_path_factory):
    """A copy of the workflow holding the documentation's named YAML files."""
    workdir = tmp_path_factory.mktemp("docs")
    copy_workflow(workdir)
    for name, text in documented_files().items():
        (workdir / name).write_text(text)
    return workdir


def test_the_documentation_shows_commands_that_dry_run(docs_copy):
    commands = documented_commands()
    planned = {doc: 0 for doc in DOCS}
    for doc, _, command in commands:
        try:
            args, _ = plan_dry_run(command, docs_copy)
        except (AssertionError, ConfigError):  # reported by test_documented_command_dry_runs
            continue
        planned[doc] += args is not None
    assert all(planned.values()), planned
    assert "my_cohort.yaml" in documented_files()


@pytest.mark.parametrize(
    "doc, line, command",
    [pytest.param(*entry, id=f"{entry[0]}:{entry[1]}") for entry in documented_commands()],
)
def test_documented_command_dry_runs(docs_copy, doc, line, command):
    """Each `snakemake` line of a fenced block of README.md and config/README.md dry-runs
    (`--dry-run` added) in a copy of the workflow. Snakemake's own parser must accept the line
    as written, and every config it combines must validate; then

    - YAML blocks whose first line names a file (`# my_cohort.yaml`) are written into the copy
      first, so that the documented config files exist;
    - `--use-conda` and `--sdm ...` are dropped: a dry run with them asks `conda info` and
      fails where conda is not installed, and a dry run deploys nothing anyway;
    - a line is skipped when it names a config file or profile the copy does not have (the
      reader's own, e.g. `~/mmdiag-slurm`), runs on a cluster (`--executor slurm`, or a profile
      whose `executor` is not local, e.g. `workflow/profiles/slurm`), or reads a cohort at an
      absolute path that does not exist (a folder on the reader's machine);
    - the cohort tables of a relative `root` or `manifest` (e.g. the paper configs'
      `data/renal_biopsy`) are created empty in the copy: a dry run only needs the manifest
      rule's inputs to exist, it never reads them.
    """
    args, skipped = plan_dry_run(command, docs_copy)
    if skipped:
        pytest.skip(f"{doc}:{line}: {skipped}")
    result = _run([str(BIN / "snakemake"), *args], docs_copy)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert "This was a dry-run" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "doc, line, command",
    [
        pytest.param(*entry, id=f"{entry[0]}:{entry[1]}")
        for entry in documented_commands(program="mmdiag")
    ],
)
def test_documented_mmdiag_line_fits_the_command_line(doc, line, command):
    """Each `mmdiag` line of the documentation names a command, only its options, every
    option it requires, and configured variants (the section "Bring your own cohort" is also
    run for real, in tests/test_byo_cohort.py)."""
    from mmdiag.cli_support import default_config_files
    from tests.cli_lines import check_command_line

    check_command_line(command, load_config(default_config_files(ROOT)))
