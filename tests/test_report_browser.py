"""Tests of the report browser helper on a tiny report that a toy workflow builds.

The toy workflow writes a PNG of a known size, an HTML table, a TSV file and a PNG whose bytes
are not an image, each marked for the report; the helper must see each as a reader would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .report_browser import browser_available, inspect_report

NO_BROWSER = browser_available()
pytestmark = pytest.mark.skipif(NO_BROWSER is not None, reason=NO_BROWSER or "")

SNAKEMAKE = Path(sys.executable).parent / "snakemake"
PNG_SIZE = (37, 23)
TABLE = [["sample", "auc"], ["a", "0.91"], ["µ-b", "0.75"]]
TSV = "sample\tauc\na\t0.91\n"
CAPTION = "Receiver operating characteristic of the toy model."

SNAKEFILE = f"""
report: "workflow.rst"

rule all:
    input: "plot.png", "table.html", "values.tsv", "broken.png"

rule plot:
    output:
        report("plot.png", caption="cap.rst", category="A", subcategory="figures",
               labels={{"kind": "plot"}})
    run:
        from PIL import Image
        Image.new("RGB", {PNG_SIZE!r}, (200, 30, 30)).save(output[0])

rule tables:
    output:
        html=report("table.html", caption="cap.rst", category="B", subcategory="tables",
                    labels={{"kind": "html"}}),
        tsv=report("values.tsv", caption="cap.rst", category="B", subcategory="tables",
                   labels={{"kind": "tsv"}}),
    run:
        rows = "".join(
            "<tr>" + "".join(f"<td>{{cell}}</td>" for cell in row) + "</tr>" for row in {TABLE!r}
        )
        with open(output.html, "w", encoding="utf-8") as out:
            out.write(f"<html><body><table>{{rows}}</table></body></html>")
        with open(output.tsv, "w", encoding="utf-8") as out:
            out.write({TSV!r})

rule broken:
    output:
        report("broken.png", caption="cap.rst", category="C", labels={{"kind": "broken"}})
    run:
        with open(output[0], "wb") as out:
            out.write(b"these bytes are not a PNG")
"""


def _snakemake(workdir: Path, *args: str) -> None:
    """Run Snakemake in ``workdir``, failing with its output when it fails."""
    command = [str(SNAKEMAKE), "--cores", "1", *args]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy workflow, run, with its self-contained HTML report."""
    workdir = tmp_path_factory.mktemp("toy_report")
    (workdir / "Snakefile").write_text(SNAKEFILE)
    (workdir / "workflow.rst").write_text("A toy workflow for report inspection.\n")
    (workdir / "cap.rst").write_text(CAPTION + "\n")
    _snakemake(workdir)
    _snakemake(workdir, "--report", "report.html")
    return workdir / "report.html"


@pytest.fixture(scope="module")
def view(report: Path):
    """The report as headless Chromium sees it, with a screenshot."""
    return inspect_report(report, screenshot=report.parent / "shots" / "report.png")


def test_report_loads_without_severe_console_errors(view):
    assert view.title == "Snakemake Report"
    assert view.severe_console_errors == []


def test_categories_hold_their_results(view):
    assert {k: sorted(v) for k, v in view.categories.items()} == {
        "A": ["plot.png"],
        "B": ["table.html", "values.tsv"],
        "C": ["broken.png"],
    }
    plot = view.result_named("plot.png")
    assert (plot.category, plot.subcategory, plot.mime_type) == ("A", "figures", "image/png")
    assert plot.labels == {"kind": "plot"}


def test_png_decodes_with_the_size_written(view):
    assert view.image_sizes[view.result_named("plot.png").key] == PNG_SIZE


def test_broken_png_decodes_to_nothing(view):
    assert view.image_sizes[view.result_named("broken.png").key] == (0, 0)


def test_html_table_cells_equal_the_values_written(view):
    assert view.html_tables[view.result_named("table.html").key] == [TABLE]


def test_tsv_text_equals_the_file(view, report):
    key = view.result_named("values.tsv").key
    assert view.text_results[key] == TSV == (report.parent / key).read_text(encoding="utf-8")


def test_caption_is_plain_text(view):
    assert all(result.caption == CAPTION for result in view.results.values())


def test_screenshot_shows_the_first_category(view):
    assert view.navigation_error is None
    assert view.navigation == ["A", "view"]
    assert view.screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert view.screenshot.stat().st_size > 1000


def test_page_without_report_data_names_what_it_found(tmp_path):
    page = tmp_path / "page.html"
    page.write_text(
        "<html><body><div id='app'><nav></nav></div><script>var other = 1;</script></body></html>"
    )
    with pytest.raises(RuntimeError, match=r"\['categories', 'results'\].*'other'"):
        inspect_report(page, timeout_s=20)
