"""Tests for gene-expression reading, GMT gene sets and fitted preprocessing (mmdiag.genes)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from mmdiag.genes import (
    ExpressionPreprocessor,
    GeneSetError,
    GeneTableError,
    read_expression,
    read_gmt,
    read_obs,
    select_gene_set,
    validate_expression,
    write_gmt,
)
from mmdiag.genes.tables import densify
from mmdiag.io import write_tsv
from mmdiag.synth import tables as synth_tables

PBMC = Path("/work/shared/data/real/genomics/10x_pbmc68k_reduced.h5ad")
needs_pbmc = pytest.mark.skipif(not PBMC.is_file(), reason="pbmc68k_reduced.h5ad not present")


def write_text(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- text tables

SMALL_TSV = "sample_id\tG1\tG2\n007\t1\t2.5\nS2\t3\t-4e-1\n"


def test_reads_tsv_as_float64_with_string_ids(tmp_path):
    table = read_expression(write_text(tmp_path / "x.tsv", SMALL_TSV))
    assert table.index.tolist() == ["007", "S2"]
    assert table.index.name == "sample_id"
    assert table.columns.tolist() == ["G1", "G2"]
    assert all(dtype == np.float64 for dtype in table.dtypes)
    assert table.to_numpy().tolist() == [[1.0, 2.5], [3.0, -0.4]]


@pytest.mark.parametrize("name", ["x.csv", "x.tsv.gz", "x.csv.gz", "x.txt"])
def test_suffix_selects_separator_and_compression(tmp_path, name):
    text = SMALL_TSV.replace("\t", ",") if ".csv" in name else SMALL_TSV
    table = read_expression(write_text(tmp_path / name, text))
    assert table.to_numpy().tolist() == [[1.0, 2.5], [3.0, -0.4]]


def test_sample_column_defaults_to_first_column_and_can_be_named(tmp_path):
    path = write_text(tmp_path / "x.tsv", "G1\tpatient\tG2\n1\tA\t2\n3\tB\t4\n")
    with pytest.raises(
        GeneTableError, match="non-numeric value 'A' for sample '1', gene 'patient'"
    ):
        read_expression(path)  # the first column, G1, taken as the sample ids
    named = read_expression(path, sample_column="patient")
    assert named.index.tolist() == ["A", "B"]
    assert named.to_numpy().tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(GeneTableError, match=r"x\.tsv: no sample column 'sample'"):
        read_expression(path, sample_column="sample")


def test_reads_the_synthetic_expression_table(tmp_path):
    rng = np.random.default_rng(3)
    sets = synth_tables.draw_gene_sets(rng, 12, 3, 4)
    frame = synth_tables.make_expression(rng, ["P01", "P02", "P03"], ["IgAN", "MN", "LN"], sets, 12)
    table = read_expression(write_tsv(frame, tmp_path / "expression.tsv"))
    assert table.index.name == "patient_id"
    assert table.shape == (3, 12)
    np.testing.assert_array_equal(table.to_numpy(), frame.iloc[:, 1:].to_numpy())


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("sample_id\tG1\tG2\nS1\t1\t2\nS1\t3\t4\n", r"x\.tsv: duplicate sample ids 'S1'"),
        ("sample_id\tG1\tG1\nS1\t1\t2\n", r"x\.tsv: duplicate gene names 'G1'"),
        ("sample_id\tG1\t\nS1\t1\t2\n", r"x\.tsv: empty gene name"),
        ("sample_id\tG1\tG2\nS1\t1\tabc\n", "non-numeric value 'abc' for sample 'S1', gene 'G2'"),
        (
            "sample_id\tG1\tG2\nS1\t1\t\nS2\tNA\t2\n",
            r"NaN or infinite values at \(sample 'S1', "
            r"gene 'G2': nan\), \(sample 'S2', gene 'G1': nan\)",
        ),
        ("sample_id\tG1\nS1\tinf\n", r"NaN or infinite .*gene 'G1': inf"),
        ("sample_id\tG1\tG2\n", r"x\.tsv: empty table \(0 samples x 2 genes\)"),
        ("sample_id\nS1\n", r"x\.tsv: empty table \(1 samples x 0 genes\)"),
        ("", r"x\.tsv: empty table \(no header line\)"),
        ("sample_id\tG1\n\t1\n", r"x\.tsv: empty sample id on line\(s\) 2"),
    ],
)
def test_text_table_errors_name_file_and_problem(tmp_path, text, pattern):
    with pytest.raises(GeneTableError, match=pattern):
        read_expression(write_text(tmp_path / "x.tsv", text))


def test_nan_error_lists_the_first_few_cells_and_the_count(tmp_path):
    rows = "".join(f"S{i}\tNaN\n" for i in range(8))
    with pytest.raises(GeneTableError, match=r"sample 'S4'.*\.\.\. \(8 cells in all\)") as info:
        read_expression(write_text(tmp_path / "x.tsv", "sample_id\tG1\n" + rows))
    assert "'S5'" not in str(info.value)


def test_validate_expression_checks_in_memory_tables():
    table = pd.DataFrame({"A": [1, 2], "B": [0.5, 1.5]}, index=["s1", "s2"])
    checked = validate_expression(table)
    assert (checked.dtypes == np.float64).all() and checked.to_numpy().tolist() == [
        [1.0, 0.5],
        [2.0, 1.5],
    ]
    with pytest.raises(GeneTableError, match="fold 1: non-numeric gene columns 'C'"):
        validate_expression(table.assign(C=["x", "y"]), source="fold 1")


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(GeneTableError, match=r"x\.parquet: unknown table format"):
        read_expression(write_text(tmp_path / "x.parquet", SMALL_TSV))
    with pytest.raises(FileNotFoundError, match="no such expression table"):
        read_expression(tmp_path / "absent.tsv")
    with pytest.raises(GeneTableError, match="layer and use_raw apply to .h5ad files only"):
        read_expression(write_text(tmp_path / "x.tsv", SMALL_TSV), use_raw=True)


# ------------------------------------------------------------------ h5ad: the real pbmc68k file


@needs_pbmc
def test_pbmc_x_shape_names_and_range():
    table = read_expression(PBMC)
    assert table.shape == (700, 765)
    assert table.index.is_unique and table.columns.is_unique
    assert table.index[:2].tolist() == ["AAAGCCTGGCTAAC-1", "AAATTCGATGCACA-1"]
    assert table.columns[:3].tolist() == ["HES4", "TNFRSF4", "SSU72"]
    assert (table.dtypes == np.float64).all()
    # normalised and scaled (float32 on disk): about -2.03 .. 28.4
    assert table.to_numpy().min() == pytest.approx(-2.032, abs=1e-5)
    assert table.to_numpy().max() == pytest.approx(28.408, abs=1e-5)
    with h5py.File(PBMC) as handle:
        np.testing.assert_array_equal(table.to_numpy(), handle["X"][()].astype(np.float64))


@needs_pbmc
def test_pbmc_raw_csr_equals_scipy_reconstruction():
    raw = read_expression(PBMC, use_raw=True)
    with h5py.File(PBMC) as handle:
        group = handle["raw.X"]  # pre-0.7 layout: raw stored beside X, sparse marked h5sparse
        assert group.attrs["h5sparse_format"] == "csr"
        expected = scipy.sparse.csr_matrix(
            (group["data"][()], group["indices"][()], group["indptr"][()]),
            shape=tuple(group.attrs["h5sparse_shape"]),
        ).toarray()
        raw_genes = [name.decode() for name in handle["raw.var"]["index"]]
    np.testing.assert_array_equal(raw.to_numpy(), expected.astype(np.float64))
    assert raw.columns.tolist() == raw_genes
    assert raw.shape == (700, 765)
    # log-normalised counts: 0 .. about 6.49
    assert raw.to_numpy().min() == 0.0
    assert raw.to_numpy().max() == pytest.approx(6.489, abs=1e-3)


@needs_pbmc
def test_pbmc_obs_categoricals_are_decoded():
    obs = read_obs(PBMC)
    assert obs.index.tolist() == read_expression(PBMC).index.tolist()
    assert {"bulk_labels", "louvain", "n_counts", "percent_mito", "phase"} <= set(obs.columns)
    labels = obs["bulk_labels"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert len(labels.cat.categories) == 10 and not labels.isna().any()
    assert labels.value_counts()["Dendritic"] == 240
    assert labels.value_counts()["CD14+ Monocyte"] == 129
    assert labels.iloc[0] == "CD14+ Monocyte"
    assert set(obs["phase"].cat.categories) == {"G1", "S", "G2M"}
    assert pd.api.types.is_float_dtype(obs["n_counts"])


# ----------------------------------------------------------- h5ad: the current on-disk encoding


def _strings(group, name, values, **attrs):
    dataset = group.create_dataset(
        name, data=np.array(values, dtype=object), dtype=h5py.string_dtype()
    )
    dataset.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0", **attrs})
    return dataset


def _frame(handle, name, index, columns=()):
    group = handle.create_group(name)
    group.attrs.update(
        {"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index"}
    )
    group.attrs.create("column-order", list(columns), dtype=h5py.string_dtype())
    _strings(group, "_index", index)
    return group


def _sparse(handle, name, matrix, layout):
    group = handle.create_group(name)
    group.attrs.update(
        {
            "encoding-type": f"{layout}_matrix",
            "encoding-version": "0.1.0",
            "shape": np.array(matrix.shape),
        }
    )
    for key in ("data", "indices", "indptr"):
        group.create_dataset(key, data=getattr(matrix, key))
    return group


@pytest.fixture
def modern_h5ad(tmp_path):
    """A small .h5ad in the anndata >= 0.8 encoding, written with h5py following the spec."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (4, 3)).astype(np.float32)
    path = tmp_path / "modern.h5ad"
    with h5py.File(path, "w") as handle:
        handle.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        _sparse(handle, "X", scipy.sparse.csc_matrix(np.log1p(counts)), "csc")
        obs = _frame(handle, "obs", ["c1", "c2", "c3", "c4"], ["cell_type", "donor", "n", "k"])
        cell_type = obs.create_group("cell_type")
        cell_type.attrs.update(
            {"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False}
        )
        _strings(cell_type, "categories", ["B", "T"])
        cell_type.create_dataset("codes", data=np.array([1, 0, -1, 1], dtype=np.int8))
        _strings(obs, "donor", ["d1", "d1", "d2", "d2"])
        obs.create_dataset("n", data=np.array([5.0, 6.0, 7.0, 8.0]))
        k = obs.create_group("k")
        k.attrs.update({"encoding-type": "nullable-integer", "encoding-version": "0.1.0"})
        k.create_dataset("values", data=np.array([1, 2, 3, 4]))
        k.create_dataset("mask", data=np.array([False, True, False, False]))
        _frame(handle, "var", ["GA", "GB", "GC"])
        handle.create_group("layers").create_dataset("counts", data=counts)
        raw = handle.create_group("raw")
        _sparse(raw, "X", scipy.sparse.csr_matrix(counts[:, :2]), "csr")
        _frame(raw, "var", ["GA", "GB"])
    return path, counts


def test_modern_h5ad_x_layer_and_raw(modern_h5ad):
    path, counts = modern_h5ad
    x = read_expression(path)
    assert x.index.tolist() == ["c1", "c2", "c3", "c4"] and x.columns.tolist() == ["GA", "GB", "GC"]
    np.testing.assert_array_equal(x.to_numpy(), np.log1p(counts).astype(np.float64))
    layer = read_expression(path, layer="counts")
    np.testing.assert_array_equal(layer.to_numpy(), counts)
    raw = read_expression(path, use_raw=True)
    assert raw.columns.tolist() == ["GA", "GB"]
    np.testing.assert_array_equal(raw.to_numpy(), counts[:, :2])
    with pytest.raises(GeneTableError, match=r"modern\.h5ad: no layer 'spliced'; layers: 'counts'"):
        read_expression(path, layer="spliced")
    with pytest.raises(GeneTableError, match="give layer or use_raw, not both"):
        read_expression(path, layer="counts", use_raw=True)


def test_modern_h5ad_obs_columns(modern_h5ad):
    obs = read_obs(modern_h5ad[0])
    assert obs.columns.tolist() == ["cell_type", "donor", "n", "k"]
    assert obs["cell_type"].tolist()[:2] == ["T", "B"] and pd.isna(obs["cell_type"].iloc[2])
    assert obs["cell_type"].cat.categories.tolist() == ["B", "T"]
    assert obs["donor"].tolist() == ["d1", "d1", "d2", "d2"]
    assert obs["n"].tolist() == [5.0, 6.0, 7.0, 8.0]
    assert obs["k"].isna().tolist() == [False, True, False, False]
    assert obs["k"].iloc[3] == 4


def test_anndata_07_categorical_reference(tmp_path):
    path = tmp_path / "v07.h5ad"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("X", data=np.eye(2))
        obs = _frame(handle, "obs", ["a", "b"], ["group"])
        categories = _strings(obs.create_group("__categories"), "group", ["x", "y"])
        codes = obs.create_dataset("group", data=np.array([1, 0], dtype=np.int8))
        codes.attrs["categories"] = categories.ref
        _frame(handle, "var", ["G1", "G2"])
    assert read_obs(path)["group"].tolist() == ["y", "x"]
    assert read_expression(path).to_numpy().tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_h5ad_errors_name_sample_gene_and_file(tmp_path):
    path = tmp_path / "bad.h5ad"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("X", data=np.array([[1.0, np.nan], [2.0, 3.0]]))
        _frame(handle, "obs", ["a", "a"])
        _frame(handle, "var", ["G1", "G2"])
    with pytest.raises(GeneTableError, match=r"bad\.h5ad: duplicate sample ids 'a'"):
        read_expression(path)
    with h5py.File(path, "r+") as handle:
        del handle["obs"]
        _frame(handle, "obs", ["a", "b"])
    with pytest.raises(GeneTableError, match=r"bad\.h5ad: NaN .*\(sample 'a', gene 'G2': nan\)"):
        read_expression(path)
    with h5py.File(path, "r+") as handle:
        del handle["var"]
        _frame(handle, "var", ["G1", "G2", "G3"])
    with pytest.raises(
        GeneTableError, match="matrix /X is 2 x 2 but obs has 2 samples and var 3 genes"
    ):
        read_expression(path)
    with pytest.raises(GeneTableError, match="no raw matrix"):
        read_expression(path, use_raw=True)
    with pytest.raises(GeneTableError, match="sample ids of an .h5ad are its obs index"):
        read_expression(path, sample_column="cell")


def test_densify_matches_scipy_and_rejects_inconsistent_arrays():
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(5, 7)) * (rng.random((5, 7)) < 0.3)
    for layout, build in (("csr", scipy.sparse.csr_matrix), ("csc", scipy.sparse.csc_matrix)):
        matrix = build(dense)
        got = densify(layout, matrix.data, matrix.indices, matrix.indptr, dense.shape)
        np.testing.assert_array_equal(got, dense)
    # repeated entries of one cell are summed, as scipy does
    got = densify("csr", [1.0, 2.0], [1, 1], [0, 2], (1, 2))
    assert got.tolist() == [[0.0, 3.0]]
    with pytest.raises(GeneTableError, match="m: inconsistent CSR arrays"):
        densify("csr", [1.0], [5], [0, 1], (1, 2), source="m")
    with pytest.raises(GeneTableError, match="inconsistent CSC arrays"):
        densify("csc", [1.0], [0], [0, 1], (1, 2))


# ------------------------------------------------------------------------------------ GMT


def test_reads_the_synthetic_gmt_and_round_trips(tmp_path):
    sets = synth_tables.draw_gene_sets(np.random.default_rng(2), 20, 4, 5)
    path = write_text(tmp_path / "sets.gmt", synth_tables.format_gmt(sets))
    assert read_gmt(path) == sets
    out = write_gmt(sets, tmp_path / "out.gmt", descriptions={"tumour": "risk genes"})
    assert read_gmt(out) == sets
    assert out.read_text().splitlines()[0].split("\t")[:2] == ["tumour", "risk genes"]
    assert out.read_text().splitlines()[1].split("\t")[:2] == ["microenvironment"] * 2


def test_gmt_tolerates_blank_lines_trailing_tabs_crlf_and_repeats(tmp_path):
    path = tmp_path / "sets.gmt"
    path.write_bytes(b"A\tdesc\tG1\tG2\tG1\t\t\r\n\r\nB\thttp://x\tG3\r\n")
    assert read_gmt(path) == {"A": ["G1", "G2"], "B": ["G3"]}


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("A\tdesc\tG1\nB\tonly-description\n", r"sets\.gmt:2: expected name<TAB>description"),
        ("A\tdesc\tG1\n\tdesc\tG2\n", r"sets\.gmt:2: empty gene set name"),
        ("A\tdesc\t\t\n", r"sets\.gmt:1: gene set 'A' has no genes"),
        ("A\td\tG1\n\nA\td\tG2\n", r"sets\.gmt:3: gene set 'A' repeats line 1"),
    ],
)
def test_gmt_errors_name_file_and_line(tmp_path, text, pattern):
    with pytest.raises(GeneSetError, match=pattern):
        read_gmt(write_text(tmp_path / "sets.gmt", text))


def test_write_gmt_rejects_fields_that_would_not_read_back(tmp_path):
    with pytest.raises(GeneSetError, match="'A'"):
        write_gmt({"A": ["G\t1"]}, tmp_path / "x.gmt")
    with pytest.raises(GeneSetError, match="'B'"):
        write_gmt({"B": []}, tmp_path / "x.gmt")
    assert not (tmp_path / "x.gmt").exists()


def test_select_gene_set():
    table = pd.DataFrame(np.arange(12.0).reshape(2, 6), columns=[f"G{i}" for i in range(6)])
    sets = {"s": ["G4", "G1"], "big": [f"G{i}" for i in range(3, 20)]}
    assert select_gene_set(table, sets, "s").columns.tolist() == ["G4", "G1"]
    assert select_gene_set(table, ["G2", "G0"], "mine").columns.tolist() == ["G2", "G0"]
    with pytest.raises(GeneSetError) as info:
        select_gene_set(table, sets, "big")
    message = str(info.value)
    assert message.startswith("gene set 'big': 14 of 17 genes are not in the table: G6, G7")
    assert "G15, ..." in message and "G16" not in message
    kept = select_gene_set(table, sets, "big", allow_missing=True)
    assert kept.columns.tolist() == ["G3", "G4", "G5"]
    with pytest.raises(GeneSetError, match="'none': 1 of 1 genes"):
        select_gene_set(table, ["X"], "none", allow_missing=True)
    with pytest.raises(GeneSetError, match="no gene set 'other'; sets: 's', 'big'"):
        select_gene_set(table, sets, "other")


# ---------------------------------------------------------------------------- preprocessing


def test_log1p_zscore_known_answer():
    e = math.e
    train = pd.DataFrame(
        {"A": [0.0, e - 1, e**2 - 1], "B": [2.0, 2.0, 2.0]}, index=["s1", "s2", "s3"]
    )
    pre = ExpressionPreprocessor(log1p=True, zscore=True).fit(train)
    # log1p(A) = 0, 1, 2: mean 1, population std sqrt(((0-1)^2 + 0 + (2-1)^2) / 3)
    std_a = math.sqrt(2 / 3)
    assert pre.mean_[0] == pytest.approx(1.0, abs=1e-15)
    assert pre.std_[0] == pytest.approx(std_a, rel=1e-15)
    # B is constant: std -> 1, mean -> its exact (log1p) value, so it maps to 0 on training
    assert pre.mean_[1] == np.log1p(2.0) and pre.std_[1] == 1.0
    out = pre.transform(train)
    np.testing.assert_allclose(out["A"], [-1 / std_a, 0.0, 1 / std_a], rtol=1e-14, atol=1e-15)
    assert out["B"].tolist() == [0.0, 0.0, 0.0]
    test = pd.DataFrame({"B": [e**3 - 1], "A": [e**4 - 1]}, index=["t1"])
    out = pre.transform(test)
    assert out.columns.tolist() == ["A", "B"]
    assert out["A"].iloc[0] == pytest.approx((4 - 1) / std_a, rel=1e-14)
    assert out["B"].iloc[0] == pytest.approx(3 - math.log1p(2.0), rel=1e-14)


def test_top_variable_genes_rank_after_log1p_ties_by_name():
    # variances raw: C 2500 > A 25 > Z = B 0.25; after log1p: A 1.44 > Z = B 0.12 > C 0.0023
    train = pd.DataFrame(
        {"C": [1000.0, 1100.0], "A": [0.0, 10.0], "Z": [0.0, 1.0], "B": [0.0, 1.0]},
        index=["s1", "s2"],
    )
    top = {}
    for log1p in (False, True):
        for n_top in (1, 2, 3):
            pre = ExpressionPreprocessor(log1p=log1p, zscore=False, n_top_variable=n_top)
            top[log1p, n_top] = pre.fit(train).genes_
    assert top[False, 1] == ["C"] and top[True, 1] == ["A"]
    assert top[False, 3] == ["C", "A", "B"]  # Z and B tie: B wins by name
    assert top[True, 2] == ["A", "B"]
    assert top[True, 3] == ["A", "Z", "B"]  # kept in the table's column order
    pre = ExpressionPreprocessor(log1p=True, zscore=False, n_top_variable=2).fit(train)
    assert pre.transform(train[["B", "Z", "A", "C"]]).columns.tolist() == ["A", "B"]
    with pytest.raises(GeneTableError, match="n_top_variable=5 exceeds the 4 genes"):
        ExpressionPreprocessor(n_top_variable=5).fit(train)


def test_fitted_statistics_come_from_training_samples_only():
    rng = np.random.default_rng(4)
    cohort = pd.DataFrame(
        rng.gamma(2.0, 3.0, (40, 30)),
        columns=[f"G{i:02d}" for i in range(30)],
        index=[f"S{i:02d}" for i in range(40)],
    )
    train, test = cohort.index[:25], cohort.index[25:]
    settings = {"log1p": True, "zscore": True, "n_top_variable": 10}
    fitted = ExpressionPreprocessor(**settings).fit(cohort.loc[train])
    state = fitted.state_dict()

    changed = cohort.copy()
    changed.loc[test] = changed.loc[test] * 1000.0 + rng.gamma(5.0, 50.0, (15, 30))
    refit = ExpressionPreprocessor(**settings).fit(changed.loc[train])
    assert refit.state_dict() == state  # same means, stds and genes, bit for bit
    # fitting on the whole cohort would see the test samples: then the parameters move
    assert ExpressionPreprocessor(**settings).fit(changed).state_dict() != state

    out = refit.transform(changed.loc[test])
    block = np.log1p(changed.loc[test, fitted.genes_].to_numpy())
    train_block = np.log1p(cohort.loc[train, fitted.genes_].to_numpy())
    expected = (block - train_block.mean(axis=0)) / train_block.std(axis=0)
    np.testing.assert_allclose(out.to_numpy(), expected, rtol=1e-12)
    variance = np.log1p(cohort.loc[train].to_numpy()).var(axis=0)
    top = sorted(np.argsort(-variance)[:10])
    assert fitted.genes_ == [cohort.columns[i] for i in top]


def test_state_dict_json_round_trip_is_exact():
    rng = np.random.default_rng(5)
    table = pd.DataFrame(rng.normal(size=(12, 6)), columns=list("ABCDEF"))
    pre = ExpressionPreprocessor(zscore=True, n_top_variable=4).fit(table)
    state = json.loads(json.dumps(pre.state_dict()))
    assert state["format"] == "mmdiag.genes.ExpressionPreprocessor" and state["version"] == 1
    assert state["n_train_samples"] == 12 and len(state["mean"]) == 4
    again = ExpressionPreprocessor.from_state(state)
    np.testing.assert_array_equal(again.transform(table), pre.transform(table))
    plain = ExpressionPreprocessor(zscore=False).fit(table).state_dict()
    assert plain["mean"] is None and plain["std"] is None
    assert ExpressionPreprocessor.from_state(plain).transform(table).equals(table)
    with pytest.raises(ValueError, match="not an ExpressionPreprocessor state"):
        ExpressionPreprocessor.from_state({"format": "other"})
    with pytest.raises(ValueError, match="state 'std' has length 3, expected 4"):
        ExpressionPreprocessor.from_state({**state, "std": state["std"][:3]})


def test_preprocessor_errors():
    table = pd.DataFrame({"A": [1.0, -2.0], "B": [0.0, 1.0]}, index=["s1", "s2"])
    with pytest.raises(RuntimeError, match="not fitted"):
        ExpressionPreprocessor().transform(table)
    with pytest.raises(
        GeneTableError,
        match=r"log1p needs values >= 0, got -2.0 for sample "
        r"'s2', gene 'A'",
    ):
        ExpressionPreprocessor(log1p=True).fit(table)
    pre = ExpressionPreprocessor().fit(table)
    with pytest.raises(GeneTableError, match="table lacks 1 of the 2 fitted genes: 'B'"):
        pre.transform(table[["A"]])
    with pytest.raises(GeneTableError, match=r"NaN .*sample 's1', gene 'B'"):
        pre.transform(table.assign(B=[np.nan, 1.0]))
    with pytest.raises(GeneTableError, match="gene names must be strings"):
        ExpressionPreprocessor().fit(pd.DataFrame({0: [1.0, 2.0]}))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_top_variable must be a positive integer"):
            ExpressionPreprocessor(n_top_variable=bad)
