"""Fold summaries, comparisons against the reference row, and the rendered tables."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from mmdiag.reporting import compare_to_reference, render_latex, render_markdown, summarise_folds
from mmdiag.reporting.report import write_method_tables

FOLD_VALUES = {  # variant -> fold AUCs
    "ref": [0.90, 0.92, 0.95, 0.91, 0.93],
    "weak": [0.70, 0.75, 0.72, 0.71, 0.74],
    "close": [0.91, 0.90, 0.96, 0.90, 0.94],
}


def _fold_all() -> pd.DataFrame:
    rows = []
    for variant, values in FOLD_VALUES.items():
        for fold, value in enumerate(values):
            rows.append(("m", variant, fold, "AUC", value))
            rows.append(("m", variant, fold, "ACC", value - 0.1))
    return pd.DataFrame(rows, columns=["method", "variant", "fold", "metric", "value"])


def _options(**changes):
    options = dict(
        metrics=["ACC", "AUC"],
        reference="ref",
        test="paired_ttest",
        scale=100,
        digits=2,
        labels={"ref": "Reference_net"},
    )
    return options | changes


def test_summary_uses_sample_standard_deviation():
    summary = summarise_folds(_fold_all())
    row = summary[(summary["variant"] == "weak") & (summary["metric"] == "AUC")].iloc[0]
    values = FOLD_VALUES["weak"]
    assert row["mean"] == pytest.approx(np.mean(values))
    assert row["std"] == pytest.approx(np.std(values, ddof=1))
    assert row["n_folds"] == 5


def test_paired_ttest_against_the_reference_matches_scipy():
    table = compare_to_reference(_fold_all(), None, reference="ref", tests=["paired_ttest"])
    assert list(table["variant"]) == ["weak", "close"]
    for variant in ("weak", "close"):
        expected = scipy_stats.ttest_rel(FOLD_VALUES[variant], FOLD_VALUES["ref"])
        row = table[table["variant"] == variant].iloc[0]
        assert row["statistic"] == pytest.approx(expected.statistic, rel=1e-12)
        assert row["p_value"] == pytest.approx(expected.pvalue, rel=1e-12)
    marks = dict(zip(table["variant"], table["mark"], strict=True))
    assert marks == {"weak": "*", "close": "N.S."}


def _binary_predictions(n=80, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    frames = []
    for variant, noise in (("ref", 0.5), ("weak", 3.0)):
        score = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, noise, n))))
        frames.append(
            pd.DataFrame(
                {
                    "patient_id": [f"p{i}" for i in range(n)],
                    "fold": np.arange(n) % 4,
                    "variant": variant,
                    "y_true": y,
                    "y_pred": (score > 0.5).astype(int),
                    "prob_neg": 1 - score,
                    "prob_pos": score,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def test_prediction_level_tests_use_pooled_predictions():
    predictions = _binary_predictions()
    fold_all = _fold_all()
    fold_all = fold_all[fold_all["variant"] != "close"]
    table = compare_to_reference(
        fold_all,
        predictions,
        reference="ref",
        tests=["delong", "bootstrap", "mcnemar"],
        n_boot=500,
    )
    assert list(table["test"]) == ["delong", "bootstrap", "mcnemar"]
    assert (table["n"] == 80).all()
    assert (table["p_value"].between(0, 1)).all()
    delong = table[table["test"] == "delong"].iloc[0]
    assert delong["statistic"] < 0 and delong["mark"] == "*"  # the weak variant is worse


def test_a_patient_tested_in_several_splits_counts_once():
    """Repeated random splits test a patient several times: duplicating every patient over
    three splits must not shrink the p-values (each appearance is not a new case)."""
    once = _binary_predictions()
    fold_all = _fold_all()[lambda t: t["variant"] != "close"]
    thrice = pd.concat([once.assign(fold=k) for k in range(3)], ignore_index=True)
    tests = ["delong", "bootstrap", "mcnemar"]
    single = compare_to_reference(fold_all, once, reference="ref", tests=tests, n_boot=300)
    repeated = compare_to_reference(fold_all, thrice, reference="ref", tests=tests, n_boot=300)
    assert (repeated["n"] == 80).all()
    np.testing.assert_allclose(repeated["p_value"], single["p_value"], rtol=1e-12)
    np.testing.assert_allclose(repeated["statistic"], single["statistic"], rtol=1e-12)
    # pooling every appearance as a case, as before, gives a far smaller DeLong p
    from mmdiag.stats import delong_test

    a, b = (
        thrice[thrice["variant"] == v].sort_values(["patient_id", "fold"]) for v in ("weak", "ref")
    )
    pooled = delong_test(a["y_true"].to_numpy(), a["prob_pos"].to_numpy(), b["prob_pos"].to_numpy())
    assert pooled.p_value < single["p_value"].iloc[0] / 10


def test_per_patient_predictions_average_over_splits():
    from mmdiag.reporting.compare import per_patient_predictions

    rows = pd.DataFrame(
        {
            "patient_id": ["a", "a", "a", "b"],
            "fold": [0, 1, 2, 1],
            "variant": "v",
            "y_true": [1, 1, 1, 0],
            "y_pred": [1, 0, 0, 0],
            "prob_neg": [0.2, 0.6, 0.7, 0.9],
            "prob_pos": [0.8, 0.4, 0.3, 0.1],
        }
    )
    table = per_patient_predictions(rows).set_index("patient_id")
    assert table.loc["a", "prob_pos"] == pytest.approx(0.5) and table.loc["a", "n_tests"] == 3
    assert table.loc["a", "y_pred"] == 0  # predicted 0 in two of three splits
    assert table.loc["b", "n_tests"] == 1 and table.loc["b", "y_pred"] == 0
    with pytest.raises(ValueError, match="change label"):
        per_patient_predictions(rows.assign(y_true=[1, 0, 1, 0]))


def test_prediction_tests_refuse_mismatched_or_multiclass_predictions():
    predictions = _binary_predictions()
    fold_all = _fold_all()[lambda t: t["variant"] != "close"]
    with pytest.raises(ValueError, match="same patients"):
        compare_to_reference(fold_all, predictions.iloc[:-1], reference="ref", tests=["mcnemar"])
    three = predictions.assign(prob_other=0.0)
    with pytest.raises(ValueError, match="binary"):
        compare_to_reference(fold_all, three, reference="ref", tests=["delong"])
    with pytest.raises(ValueError, match="unknown test"):
        compare_to_reference(fold_all, predictions, reference="ref", tests=["anova"])


def test_markdown_table_is_paper_shaped():
    fold_all = _fold_all()
    stats = compare_to_reference(fold_all, None, reference="ref", tests=["paired_ttest"])
    text = render_markdown(summarise_folds(fold_all), stats, title="Table", **_options())
    lines = text.splitlines()
    assert lines[2] == "| Variant | ACC | AUC | p-value (paired_ttest) |"
    reference_row = next(line for line in lines if line.startswith("| Reference_net"))
    close_row = next(line for line in lines if line.startswith("| close"))
    weak_row = next(line for line in lines if line.startswith("| weak"))
    # ref has the best ACC and AUC means: bold, and Ref. in the p-value column
    mean, std = np.mean(FOLD_VALUES["ref"]) * 100, np.std(FOLD_VALUES["ref"], ddof=1) * 100
    assert f"**{mean:.2f} ± {std:.2f}**" in reference_row and reference_row.endswith("Ref. |")
    assert "**" not in weak_row and weak_row.endswith("<0.001 * |")
    assert close_row.endswith("N.S. |")
    assert "sample standard deviation (ddof = 1) over 5 folds in %" in text


def test_latex_table_escapes_and_bolds():
    fold_all = _fold_all()
    stats = compare_to_reference(fold_all, None, reference="ref", tests=["paired_ttest"])
    text = render_latex(summarise_folds(fold_all), stats, title="Table 5", **_options())
    assert r"\begin{tabular}{lccc}" in text and r"\toprule" in text
    assert r"Reference\_net & \textbf{" in text
    assert r"$\pm$" in text and "±" not in text
    assert r"$<$0.001 *" in text


def test_write_method_tables_writes_each_configured_table(tmp_path):
    fold_all_path = tmp_path / "fold_all.tsv"
    _fold_all().to_csv(fold_all_path, sep="\t", index=False)
    settings = {
        "reference": "ref",
        "variants": {"close": {}, "ref": {}, "weak": {}},
        "stats": {"tests": ["paired_ttest", "wilcoxon"], "metric": "AUC", "n_boot": 10, "seed": 0},
        "tables": {
            "main": {"title": "T", "rows": ["weak", "close", "ref"], "metrics": ["AUC"]},
            "pair": {
                "title": "P",
                "rows": ["close", "weak"],
                "reference": "close",
                "metrics": ["ACC"],
            },
        },
    }
    paths = write_method_tables(fold_all_path, [], settings, out_dir=tmp_path / "out")
    names = [p.relative_to(tmp_path / "out").as_posix() for p in paths]
    assert names == [
        "summary.tsv",
        "stats.tsv",
        "tables/main.md",
        "tables/main.tex",
        "tables/main.html",
        "tables/pair.md",
        "tables/pair.tex",
        "tables/pair.html",
    ]
    lines = paths[2].read_text().splitlines()
    rows = [line.split(" | ")[0] for line in lines if line.startswith("| ") and "±" in line]
    assert rows == ["| weak", "| close", "| ref"]  # the table's row order
    stats = pd.read_csv(paths[1], sep="\t")
    main = stats[stats["table"] == "main"]
    assert sorted(main["test"]) == ["paired_ttest", "paired_ttest", "wilcoxon", "wilcoxon"]
    pair = stats[stats["table"] == "pair"]
    assert set(pair["variant"]) == {"weak"} and set(pair["reference"]) == {"close"}
    assert "Ref." in paths[5].read_text() and "| ref |" not in paths[5].read_text()
    settings["stats"]["tests"] = ["delong"]
    with pytest.raises(ValueError, match="predictions.tsv"):
        write_method_tables(fold_all_path, [], settings, out_dir=tmp_path / "out2")
    settings["stats"]["tests"] = ["paired_ttest"]
    settings["tables"]["main"]["rows"].append("ghost")
    with pytest.raises(ValueError, match="ghost"):
        write_method_tables(fold_all_path, [], settings, out_dir=tmp_path / "out3")


def test_html_table_holds_the_markdown_table_cells():
    """The report's HTML rendering shows the same cells as the Markdown one, escaped."""
    import re
    from html.parser import HTMLParser

    from mmdiag.reporting.tables import render_html

    summary = summarise_folds(_fold_all())
    stats = compare_to_reference(_fold_all(), None, reference="ref", tests=["paired_ttest"])
    options = dict(
        metrics=["AUC"],
        reference="ref",
        test="paired_ttest",
        scale=100,
        digits=2,
        labels={"weak": "A & <B>"},
    )
    markdown = render_markdown(summary, stats, title="T <1>", **options)
    page = render_html(summary, stats, title="T <1>", **options)

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.inside = [], False

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            self.inside = tag in ("td", "th") or (self.inside and tag == "b")

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.inside = False

        def handle_data(self, data):
            if self.inside:
                self.rows[-1].append(data)

    parser = Cells()
    parser.feed(page)
    markdown_rows = [
        [re.sub(r"^\*\*(.*)\*\*$", r"\1", c.strip()) for c in line.strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("| ")
    ]
    assert parser.rows == markdown_rows
    assert "A &amp; &lt;B&gt;" in page and "<caption>T &lt;1&gt;</caption>" in page
    assert "<b>" in page  # the best value of the column


def test_overview_sets_each_headline_row_against_the_paper(tmp_path):
    from mmdiag.reporting.overview import (
        cohort_rows,
        method_rows,
        parse_named_paths,
        write_overview,
    )

    manifest = tmp_path / "manifest.tsv"
    pd.DataFrame({"patient_id": ["P1", "P1", "P2"], "modality": ["OM", "TEM", "OM"]}).to_csv(
        manifest, sep="\t", index=False
    )
    summary = tmp_path / "summary.tsv"
    pd.DataFrame(
        {
            "method": "m",
            "variant": ["best", "best", "other"],
            "metric": ["AUC", "ACC", "AUC"],
            "mean": [0.91234, 0.8, 0.5],
            "std": [0.01, 0.02, 0.03],
            "n_folds": 5,
        }
    ).to_csv(summary, sep="\t", index=False)
    headline = {"variant": "best", "metric": "AUC", "paper": 0.9905, "source": "Table 2"}
    config = {
        "splits": {"schemes": {"k5": {"type": "kfold"}}},
        "methods": {
            "m": {
                "family": "cmus",
                "cohort": "c",
                "split": "k5",
                "variants": {"best": {}, "other": {}},
                "headline": headline,
            },
            "n": {
                "family": "csmil",
                "cohort": "c",
                "split": "k5",
                "variants": {"best": {}},
                "headline": headline,
            },
        },
    }
    assert cohort_rows({"c": manifest}) == [["c", 2, 3, "OM 2, TEM 1"]]
    rows = method_rows(config, {"m": summary})
    assert rows[0] == [
        "m",
        "cmus",
        "c",
        "k5 (kfold)",
        2,
        "best",
        "AUC",
        "0.9123 ± 0.0100 (5 folds)",
        "0.9905 (Table 2)",
    ]
    assert rows[1][7] == "not run"  # no summary for method n yet
    page = write_overview(tmp_path / "o.html", config, {"c": manifest}, {"m": summary}).read_text()
    assert "<td>0.9123 ± 0.0100 (5 folds)</td>" in page and "<td>snakemake</td>" in page
    assert parse_named_paths(["a_b=x/y.tsv"], "--summary") == {"a_b": Path("x/y.tsv")}
    with pytest.raises(ValueError, match="name=path"):
        parse_named_paths(["nopath"], "--summary")
