"""Open a Snakemake HTML report in headless Chromium and return what a reader's browser sees.

``snakemake --report report.html`` writes a self-contained single-page React app. The results
live in two global JS variables of that page:

* ``categories``: ``{category: {subcategory: [result key, ...]}}``
* ``results``: ``{result key: {"name", "filename", "labels", "size", "caption" (HTML),
  "mime_type", "job_properties", "data_uri"}}``, where the key is the output path relative to
  the working directory and ``data_uri`` is ``data:<mime>;charset=utf8;filename=<name>;base64,…``.

Reading the file as text would only show that the bytes were embedded; decoding them inside
the browser shows whether a reader can actually see them: images are decoded by Chromium,
HTML results are parsed with ``DOMParser`` and text results are decoded as UTF-8.

Selenium is imported lazily so that importing this module never needs a browser.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)
IMAGE_MIMES = frozenset({"image/png", "image/jpeg", "image/svg+xml", "image/gif"})
HTML_MIMES = frozenset({"text/html"})
TEXT_MIMES = frozenset({"application/json", "application/x-yaml", "application/yaml"})
# Mime types the app shows inside the page (the others are offered as downloads).
VIEWABLE_MIMES = IMAGE_MIMES | HTML_MIMES | {"application/pdf"}

# Decoding a data URI in the page, shared by the scripts below.
_DECODE_JS = """
function reportBytes(uri) {
    const comma = uri.indexOf(",");
    const head = uri.slice(0, comma);
    const body = uri.slice(comma + 1);
    if (head.endsWith(";base64")) {
        return Uint8Array.from(atob(body), c => c.charCodeAt(0));
    }
    return new TextEncoder().encode(decodeURIComponent(body));
}
function reportText(uri) {
    return new TextDecoder().decode(reportBytes(uri));
}
"""

# Names of the page's own globals (those a blank frame lacks), for error messages.
_GLOBALS_JS = """
const frame = document.createElement("iframe");
frame.style.display = "none";
document.body.appendChild(frame);
const builtin = new Set(Object.keys(frame.contentWindow));
frame.remove();
return Object.keys(window).filter(k => !builtin.has(k)).sort();
"""

# The app's data: categories, results (caption as plain text) and the first category shown.
_DATA_JS = """
const missing = ["categories", "results"].filter(n => typeof window[n] !== "object");
if (missing.length > 0) {
    return {missing: missing};
}
const order = (a, b) => a.localeCompare(b);
const plain = html => new DOMParser().parseFromString(html || "", "text/html").body.textContent;
const entries = [];
for (const category of Object.keys(categories)) {
    for (const subcategory of Object.keys(categories[category])) {
        for (const key of categories[category][subcategory]) {
            const r = results[key];
            entries.push(r === undefined ? {key: key, absent: true} : {
                key: key, name: r.name, category: category, subcategory: subcategory,
                mime_type: r.mime_type, caption: plain(r.caption).trim(),
                labels: r.labels || {}, data_uri: r.data_uri,
                fields: Object.keys(r),
            });
        }
    }
}
const first = Object.keys(categories).sort(order)[0];
return {
    entries: entries,
    first_category: first === undefined ? null : first,
    first_subcategory: first === undefined ? null : Object.keys(categories[first]).sort(order)[0],
    single_category: Object.keys(categories).length === 1,
};
"""

# Every table of an HTML result, as rows of cell texts.
_TABLES_JS = (
    _DECODE_JS
    + """
const doc = new DOMParser().parseFromString(reportText(arguments[0]), "text/html");
return Array.from(doc.querySelectorAll("table")).map(
    table => Array.from(table.rows).map(
        row => Array.from(row.cells).map(cell => cell.textContent.trim())));
"""
)

_TEXT_JS = _DECODE_JS + "return reportText(arguments[0]);"

# Decode one image as the browser would; 0x0 when it does not decode.
_IMAGE_JS = """
const done = arguments[arguments.length - 1];
const img = new Image();
img.onload = () => done([img.naturalWidth, img.naturalHeight]);
img.onerror = () => done([0, 0]);
img.src = arguments[0];
"""

# Resolves after the next two frames, i.e. once the page has painted its last change.
_PAINTED_JS = """
const done = arguments[arguments.length - 1];
requestAnimationFrame(() => requestAnimationFrame(() => done(true)));
"""

# True once the content pane (outside the navigation bar) shows an image or a frame.
_CONTENT_SHOWN_JS = """
const shown = Array.from(document.querySelectorAll("#app img, #app iframe"))
    .filter(el => !el.closest("nav"));
return shown.some(el => el.tagName === "IFRAME" || el.complete);
"""


@dataclass(frozen=True)
class ReportResult:
    """One result of the report, as the app's data describes it."""

    key: str
    name: str
    category: str
    subcategory: str
    mime_type: str
    caption: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ReportView:
    """What the browser saw in a report; per-result dicts are keyed by ``ReportResult.key``."""

    title: str
    severe_console_errors: list[str]
    categories: dict[str, list[str]]
    results: dict[str, ReportResult]
    image_sizes: dict[str, tuple[int, int]]
    html_tables: dict[str, list[list[list[str]]]]
    text_results: dict[str, str]
    screenshot: Path | None = None
    navigation: list[str] = field(default_factory=list)
    navigation_error: str | None = None

    def result_named(self, name: str) -> ReportResult:
        """The single result shown under ``name``; names are file names and may repeat."""
        found = [r for r in self.results.values() if r.name == name]
        if len(found) != 1:
            known = sorted(r.name for r in self.results.values())
            raise KeyError(f"{len(found)} results named {name!r}; the report has {known}")
        return found[0]


def _executable(default: Path, name: str) -> Path | None:
    """``default`` when it is executable, else ``name`` on the PATH, else None."""
    if default.is_file() and os.access(default, os.X_OK):
        return default
    found = shutil.which(name)
    return Path(found) if found else None


def browser_available() -> str | None:
    """None when selenium, Chromium and chromedriver are usable, else why not (for a skip)."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed"
    if _executable(CHROMIUM, "chromium") is None:
        return f"Chromium not found at {CHROMIUM} nor on the PATH"
    driver = _executable(CHROMEDRIVER, "chromedriver")
    if driver is None:
        return f"chromedriver not found at {CHROMEDRIVER} nor on the PATH"
    try:
        subprocess.run([driver, "--version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"chromedriver at {driver} does not run: {error}"
    return None


def _start_driver(timeout_s: float) -> WebDriver:
    """A headless Chromium that records every browser console message."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    reason = browser_available()
    if reason is not None:
        raise RuntimeError(f"cannot open a report in a browser: {reason}")
    options = webdriver.ChromeOptions()
    for argument in CHROME_ARGS:
        options.add_argument(argument)
    options.binary_location = str(_executable(CHROMIUM, "chromium"))
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(_executable(CHROMEDRIVER, "chromedriver")))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(timeout_s)
    driver.set_script_timeout(timeout_s)
    return driver


def _wait_rendered(driver: WebDriver, timeout_s: float) -> None:
    """Wait until React has rendered the app's navigation bar into ``#app``."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout_s).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#app nav"))
        )
    except TimeoutException:
        errors = _severe(driver)
        raise RuntimeError(
            f"the report app did not render within {timeout_s} s (title {driver.title!r}, "
            f"page globals {driver.execute_script(_GLOBALS_JS)}, severe console errors {errors})"
        ) from None


def _app_data(driver: WebDriver) -> dict[str, Any]:
    """The app's categories and results, with a clear error when they are not there."""
    data = driver.execute_script(_DATA_JS)
    if "missing" in data:
        found = driver.execute_script(_GLOBALS_JS)
        raise RuntimeError(
            f"not a Snakemake report: JS globals {data['missing']} are missing; "
            f"the page defines {found}"
        )
    absent = [e["key"] for e in data["entries"] if e.get("absent")]
    if absent:
        raise RuntimeError(f"`categories` lists results missing from `results`: {absent}")
    for entry in data["entries"]:
        _check_entry(entry)
    return data


def _check_entry(entry: dict[str, Any]) -> None:
    """Fail clearly on a result without an embedded data URI or a mime type."""
    needed = {"name", "mime_type", "data_uri"}
    lacking = sorted(needed - set(entry["fields"]))
    if lacking:
        raise RuntimeError(
            f"result {entry['key']!r} lacks fields {lacking}; it has {entry['fields']}"
        )
    if not str(entry["data_uri"]).startswith("data:"):
        raise RuntimeError(
            f"result {entry['key']!r} is not embedded (data_uri {entry['data_uri']!r}); "
            "build a self-contained report with `--report <name>.html`"
        )


def _result(entry: dict[str, Any]) -> ReportResult:
    """A ``ReportResult`` from one entry of the page's data."""
    return ReportResult(
        key=entry["key"],
        name=entry["name"],
        category=entry["category"],
        subcategory=entry["subcategory"],
        mime_type=entry["mime_type"],
        caption=entry["caption"],
        labels={str(k): str(v) for k, v in entry["labels"].items()},
    )


def _is_text(mime: str) -> bool:
    """Whether a result is text a reader would read as such (not HTML)."""
    return (mime.startswith("text/") and mime not in HTML_MIMES) or mime in TEXT_MIMES


def _severe(driver: WebDriver) -> list[str]:
    """Messages of the SEVERE browser log entries since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def _click(driver: WebDriver, xpath: str, timeout_s: float) -> None:
    """Click the element at ``xpath`` once it is clickable."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    locator = (By.XPATH, xpath)
    WebDriverWait(driver, timeout_s).until(ec.element_to_be_clickable(locator)).click()


def _menu_link(label: str) -> str:
    """XPath of the navigation bar's menu entry labelled ``label``."""
    return f"//nav//a[span[normalize-space()={_xpath_literal(label)}]]"


def _xpath_literal(text: str) -> str:
    r"""``text`` as an XPath string literal, whatever quotes it holds.

    >>> print(_xpath_literal("A"), _xpath_literal("it's"))
    'A' "it's"
    >>> print(_xpath_literal("it's \"x\""))
    concat('it', "'", 's "x"')
    """
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    parts = text.split("'")
    return "concat(" + ', "\'", '.join(f"'{p}'" for p in parts) + ")"


def _navigate(driver: WebDriver, data: dict[str, Any], timeout_s: float) -> list[str]:
    """Open the first category with the app's menu and view its first viewable result.

    Returns the labels clicked. A single category is labelled "Results" in the menu; a
    category with several subcategories first lists them.
    """
    category = data["first_category"]
    if category is None:
        return []
    label = "Results" if data["single_category"] else category
    _click(driver, _menu_link(label), timeout_s)
    clicked = [label]
    subcategories = {e["subcategory"] for e in data["entries"] if e["category"] == category}
    if len(subcategories) > 1:
        _click(driver, _menu_link(data["first_subcategory"]), timeout_s)
        clicked.append(data["first_subcategory"])
    _wait_xpath(driver, "//nav//table/tbody/tr", timeout_s)
    # The first action of each row views the result in the page ("#") or downloads it.
    view = "(//nav//table/tbody/tr/td[last()]//a[1][@href='#'])[1]"
    if driver.find_elements("xpath", view):
        _click(driver, view, timeout_s)
        clicked.append("view")
        _wait_content(driver, timeout_s)
    return clicked


def _wait_xpath(driver: WebDriver, xpath: str, timeout_s: float) -> None:
    """Wait until an element at ``xpath`` is present."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s).until(ec.presence_of_element_located((By.XPATH, xpath)))


def _wait_content(driver: WebDriver, timeout_s: float) -> None:
    """Wait until the viewed result is shown and painted."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s).until(lambda d: d.execute_script(_CONTENT_SHOWN_JS))
    driver.execute_async_script(_PAINTED_JS)


def _screenshot(
    driver: WebDriver, data: dict[str, Any], path: Path, timeout_s: float
) -> tuple[list[str], str | None]:
    """Save a screenshot of the first category's first result (or wherever navigation got)."""
    from selenium.common.exceptions import WebDriverException

    clicked: list[str] = []
    error = None
    try:
        clicked = _navigate(driver, data, timeout_s)
    except WebDriverException as exc:
        error = f"{type(exc).__name__}: {exc.msg or exc}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise RuntimeError(f"Chromium could not save a screenshot to {path}")
    return clicked, error


def _decode_results(
    driver: WebDriver, results: dict[str, ReportResult], uris: dict[str, str]
) -> tuple[dict[str, tuple[int, int]], dict[str, list[list[list[str]]]], dict[str, str]]:
    """Image sizes, HTML tables and texts of the results, decoded in the page."""
    images: dict[str, tuple[int, int]] = {}
    tables: dict[str, list[list[list[str]]]] = {}
    texts: dict[str, str] = {}
    for key, result in results.items():
        if result.mime_type in IMAGE_MIMES:
            width, height = driver.execute_async_script(_IMAGE_JS, uris[key])
            images[key] = (int(width), int(height))
        elif result.mime_type in HTML_MIMES:
            tables[key] = driver.execute_script(_TABLES_JS, uris[key])
        elif _is_text(result.mime_type):
            texts[key] = driver.execute_script(_TEXT_JS, uris[key])
    return images, tables, texts


def inspect_report(
    path: str | Path, *, screenshot: Path | None = None, timeout_s: float = 60
) -> ReportView:
    """Open the report at ``path`` in headless Chromium and collect what a reader sees.

    With ``screenshot``, the first category's first viewable result is opened through the
    app's own menu and the window is saved there as PNG. Console errors are those of loading
    the report and of that navigation; decoding the results afterwards does not add any.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no report at {path}")
    driver = _start_driver(timeout_s)
    try:
        driver.get(path.as_uri())
        _wait_rendered(driver, timeout_s)
        data = _app_data(driver)
        clicked, nav_error = [], None
        if screenshot is not None:
            clicked, nav_error = _screenshot(driver, data, Path(screenshot), timeout_s)
        severe = _severe(driver)
        results = {e["key"]: _result(e) for e in data["entries"]}
        uris = {e["key"]: e["data_uri"] for e in data["entries"]}
        images, tables, texts = _decode_results(driver, results, uris)
        return ReportView(
            title=driver.title,
            severe_console_errors=severe,
            categories=_category_names(results),
            results=results,
            image_sizes=images,
            html_tables=tables,
            text_results=texts,
            screenshot=Path(screenshot) if screenshot is not None else None,
            navigation=clicked,
            navigation_error=nav_error,
        )
    finally:
        driver.quit()


def _category_names(results: dict[str, ReportResult]) -> dict[str, list[str]]:
    """Category name -> names of its results, in the report's order."""
    names: dict[str, list[str]] = {}
    for result in results.values():
        names.setdefault(result.category, []).append(result.name)
    return names
