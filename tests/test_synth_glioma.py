"""The synthetic glioma cohort for KS-Fusion: a valid WSI manifest with a grade task, balanced
classes, expression read back per slide, the planted signal measured from the files (genes
strong, slides weaker, survival following T), byte-identical files for one seed, atomic
writes; and the feature-level toy: shapes, determinism, genes stronger than the grid."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmdiag.data import ManifestRules, build_manifest
from mmdiag.genes import read_expression, read_gmt
from mmdiag.stats import concordance_index
from mmdiag.synth import glioma
from mmdiag.synth.glioma import CLASSES, GRADES, GliomaSettings, write_glioma_cohort
from mmdiag.synth.ksfusion_toy import make_ksfusion_toy

SMALL = GliomaSettings(n_patients=8)
TINY = {"n_patients": 4, "slide_px": 256}
CHANCE = 1.0 / len(CLASSES)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Eight patients at the default slide size and gene design."""
    return write_glioma_cohort(tmp_path_factory.mktemp("glioma") / "cohort", SMALL)


@pytest.fixture(scope="module")
def provenance(cohort) -> dict:
    return json.loads((cohort / "cohort.json").read_text())


def _table(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / name, sep="\t", dtype={"patient_id": str})


def _slide_statistics(pixels: np.ndarray) -> dict[str, float]:
    """Per tissue pixel (pink, not neutral glass): the fraction of dark nuclear pixels (the
    tumour region's dense nuclei dominate), very dark lymphocyte pixels per 1000, and the
    fraction of pale nucleus-free necrosis."""
    red, green, blue = (pixels[..., k].astype(np.float32) for k in range(3))
    tissue = red - green > 12
    n_tissue = float(tissue.sum())
    mean = (red + green + blue) / 3
    return {
        "dark": float((tissue & (mean < 140)).sum() / n_tissue),
        "lymphocytes": float((tissue & (red < 70)).sum() / n_tissue * 1000),
        "necrosis": float((tissue & (green > 207)).sum() / n_tissue),
    }


def _grouped_accuracy(x, labels, groups) -> float:
    """Five-fold accuracy of a standardised logistic regression, folds by patient."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return float(cross_val_score(model, x, labels, groups=groups, cv=GroupKFold(5)).mean())


def _in_memory(settings: GliomaSettings):
    patients = glioma.plan_patients(settings)
    samples = glioma.plan_samples(settings, patients)
    expression = glioma.make_expression(settings, samples, glioma.draw_gene_design(settings))
    classes = np.array([patients[s["patient_index"]]["disease"] for s in samples])
    groups = np.array([s["patient_index"] for s in samples])
    return patients, samples, expression, classes, groups


def test_layout_passes_the_manifest(cohort, provenance):
    clinical, images = _table(cohort, "clinical.tsv"), _table(cohort, "images.tsv")
    pids = [f"P{i:03d}" for i in range(1, 9)]
    assert list(clinical.columns) == ["patient_id", "disease", "grade", "survival_months", "event"]
    assert clinical["patient_id"].tolist() == pids
    assert set(clinical["grade"]) <= set(GRADES) and set(clinical["event"]) <= {0, 1}
    assert list(images.columns) == ["patient_id", "modality", "path"]
    assert set(images["modality"]) == {"WSI"}
    samples = [s for p in provenance["patients"] for s in p["samples"]]
    assert images["path"].tolist() == [f"wsi/{s['sample_id']}.svs" for s in samples]
    for patient in provenance["patients"]:
        numbers = [s["sample_id"] for s in patient["samples"]]
        assert 1 <= len(numbers) <= 2
        assert numbers == [f"{patient['patient_id']}-{k}" for k in range(1, len(numbers) + 1)]
    assert len(images) > len(pids)  # some patient has two samples
    on_disk = {p.relative_to(cohort).as_posix() for p in cohort.rglob("*") if p.is_file()}
    assert on_disk == {
        *images["path"],
        "clinical.tsv",
        "images.tsv",
        "cohort.json",
        "genes/expression.tsv",
        "genes/gene_sets.gmt",
    }

    manifest = build_manifest(cohort_root=cohort, rules=glioma.manifest_rules())
    assert len(manifest) == len(images)
    assert set(manifest["width_px"]) == {1536} and set(manifest["height_px"]) == {1536}
    by_patient = clinical.set_index("patient_id")
    assert (manifest["grade"].to_numpy() == by_patient.loc[manifest["patient_id"], "grade"]).all()
    rules = ManifestRules.from_config(
        {
            "classes": list(CLASSES),
            "stages": [],
            "required_modalities": ["WSI"],
            "min_image_px": {"WSI": 1536},
            "tasks": {"grade": {"classes": list(GRADES), "ordinal": True, "required": True}},
        }
    )
    assert len(build_manifest(cohort_root=cohort, rules=rules)) == len(images)
    assert [t.name for t in glioma.manifest_rules().tasks] == ["grade"]


def test_classes_are_balanced_round_robin(cohort):
    assert Counter(_table(cohort, "clinical.tsv")["disease"]) == dict.fromkeys(CLASSES, 2)
    counts = Counter(glioma.plan_classes(GliomaSettings(n_patients=41)))
    assert set(counts) == set(CLASSES) and max(counts.values()) - min(counts.values()) == 1
    assert glioma.plan_classes(GliomaSettings(seed=1)) != glioma.plan_classes(
        GliomaSettings(seed=2)
    )
    # the class fixes which programs are high, and the programs vary within a class
    patients = glioma.plan_patients(GliomaSettings(n_patients=200))
    for disease in CLASSES:
        levels = glioma.CLASS_PROGRAMS[disease]
        for program in ("T", "E"):
            values = np.array([p[program] for p in patients if p["disease"] == disease])
            low, high = glioma.HIGH_RANGE if levels[program] == "high" else glioma.LOW_RANGE
            assert values.min() >= low and values.max() <= high
            assert values.std() > 0.1


def test_expression_reads_back_one_row_per_slide(cohort, provenance):
    expression = read_expression(cohort / "genes" / "expression.tsv")
    stems = [Path(p).stem for p in _table(cohort, "images.tsv")["path"]]
    assert expression.index.tolist() == stems
    assert expression.shape[1] == SMALL.n_genes
    sets = read_gmt(cohort / "genes" / "gene_sets.gmt")
    assert list(sets) == ["tumour", "microenvironment", *(f"pathway_{n}" for n in range(1, 5))]
    tumour, tme = set(sets["tumour"]), set(sets["microenvironment"])
    assert len(tumour) == SMALL.tumour_genes and len(tme) == SMALL.microenvironment_genes
    assert not tumour & tme
    assert set().union(*sets.values()) <= set(expression.columns)
    for n in range(1, 5):
        genes = set(sets[f"pathway_{n}"])
        assert len(genes) == SMALL.pathway_size
        assert len(genes & (tumour if n % 2 else tme)) >= SMALL.pathway_size // 2
    # the two samples of a patient share their programs, up to the jitter
    for patient in provenance["patients"]:
        for sample in patient["samples"]:
            for program in ("T", "E", "W"):
                assert abs(sample[program] - patient[program]) < 0.2


def test_gene_programs_carry_the_classes():
    patients, samples, expression, classes, groups = _in_memory(GliomaSettings(n_patients=60))
    values = expression.drop(columns="sample_id")
    accuracy = _grouped_accuracy(values.to_numpy(), classes, groups)
    assert accuracy > 0.75, accuracy
    sets = glioma.draw_gene_design(GliomaSettings(n_patients=60))["gene_sets"]
    background = sorted(set(values.columns) - set(sets["tumour"]) - set(sets["microenvironment"]))
    latent = pd.DataFrame(samples)

    def mean_abs_correlation(genes, program):
        return np.mean([abs(np.corrcoef(values[g], latent[program])[0, 1]) for g in genes])

    assert mean_abs_correlation(sets["tumour"], "T") > 0.5
    assert mean_abs_correlation(sets["microenvironment"], "E") > 0.5
    assert mean_abs_correlation(sets["tumour"], "E") < 0.2
    assert mean_abs_correlation(background, "T") < 0.2
    assert mean_abs_correlation(background, "W") < 0.2  # necrosis is on the slides only
    _, _, flat, classes, groups = _in_memory(GliomaSettings(n_patients=60, gene_signal=0.0))
    assert _grouped_accuracy(flat.drop(columns="sample_id").to_numpy(), classes, groups) < 0.45


def test_slides_show_tumour_immune_cells_and_necrosis_weaker_than_genes():
    settings = GliomaSettings(n_patients=48, slide_px=512, seed=3)
    _, samples, expression, classes, groups = _in_memory(settings)
    frame = pd.DataFrame(
        [_slide_statistics(glioma.render_sample_slide(settings, s)) for s in samples]
    )
    latent = pd.DataFrame(samples)
    assert stats.spearmanr(frame["dark"], latent["wsi_T"])[0] > 0.85
    assert stats.spearmanr(frame["lymphocytes"], latent["wsi_E"])[0] > 0.85
    assert stats.spearmanr(frame["necrosis"], latent["W"])[0] > 0.7
    assert abs(stats.spearmanr(frame["lymphocytes"], latent["T"])[0]) < 0.4
    assert stats.spearmanr(frame["dark"], latent["T"])[0] > 0.6  # through the slide's noise
    wsi = _grouped_accuracy(frame[["dark", "lymphocytes"]].to_numpy(), classes, groups)
    genes = _grouped_accuracy(expression.drop(columns="sample_id").to_numpy(), classes, groups)
    assert 0.4 <= wsi <= 0.85, wsi
    assert genes > wsi + 0.1, (genes, wsi)


def test_written_slides_follow_the_recorded_programs(cohort, provenance):
    samples = [s for p in provenance["patients"] for s in p["samples"]]
    dark = []
    for sample in samples:
        page = tifffile.TiffFile(cohort / "wsi" / f"{sample['sample_id']}.svs").pages[0]
        dark.append(_slide_statistics(page.asarray())["dark"])
    assert stats.spearmanr(dark, [s["wsi_T"] for s in samples])[0] > 0.8


def test_survival_follows_the_tumour_program_and_grade_cuts_it(cohort, provenance):
    patients = pd.DataFrame(glioma.plan_patients(GliomaSettings(n_patients=300)))
    assert (patients["survival_months"] > 0).all()
    assert 0.2 <= 1 - patients["event"].mean() <= 0.4
    c_index = float(
        concordance_index(patients["survival_months"], patients["event"], patients["T"])
    )
    assert c_index > 0.6, c_index
    grade = patients["grade"].map(GRADES.index)
    assert stats.spearmanr(grade, patients["T"])[0] > 0.8
    assert set(patients["grade"]) == set(GRADES)
    exact = glioma.plan_patients(GliomaSettings(n_patients=100, grade_noise=0.0))
    for patient in exact:
        assert patient["grade"] == GRADES[int(np.searchsorted(glioma.GRADE_CUTS, patient["T"]))]
    clinical = _table(cohort, "clinical.tsv")
    recorded = pd.DataFrame(provenance["patients"])
    for column in ("disease", "grade", "survival_months", "event"):
        assert clinical[column].tolist() == recorded[column].tolist()


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_gives_identical_bytes_another_seed_differs(tmp_path):
    first = _file_bytes(write_glioma_cohort(tmp_path / "a", GliomaSettings(seed=7, **TINY)))
    again = _file_bytes(write_glioma_cohort(tmp_path / "b", GliomaSettings(seed=7, **TINY)))
    other = _file_bytes(write_glioma_cohort(tmp_path / "c", GliomaSettings(seed=8, **TINY)))
    assert first == again
    assert {"clinical.tsv", "genes/expression.tsv", "wsi/P001-1.svs"} <= set(first)
    changed = [name for name in first if first[name] != other.get(name)]
    assert {"clinical.tsv", "genes/expression.tsv", "genes/gene_sets.gmt", "wsi/P001-1.svs"} <= set(
        changed
    )


def test_failed_write_leaves_the_old_cohort_in_place(tmp_path, monkeypatch):
    root = write_glioma_cohort(tmp_path / "cohort", GliomaSettings(**TINY))
    before = _file_bytes(root)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(glioma.wsi, "write_svs", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_glioma_cohort(root, GliomaSettings(seed=9, **TINY))
    assert _file_bytes(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


def test_settings_are_normalised_and_recorded(provenance):
    settings = GliomaSettings(samples_per_patient=[1, 3], gene_noise=1, mpp=1)
    assert settings.samples_per_patient == (1, 3) and isinstance(settings.gene_noise, float)
    assert provenance["settings"] == json.loads(json.dumps(dataclasses.asdict(SMALL)))
    assert provenance["classes"] == list(CLASSES) and provenance["grades"] == list(GRADES)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_patients": 3}, "n_patients"),
        ({"samples_per_patient": (2, 1)}, "samples_per_patient"),
        ({"samples_per_patient": (0, 2)}, "samples_per_patient"),
        ({"tumour_genes": 80}, "tumour_genes"),
        ({"pathway_size": 1}, "pathway_size"),
        ({"gene_noise": -0.1}, "gene_noise"),
        ({"wsi_noise": -1.0}, "wsi_noise"),
        ({"slide_px": 32}, "slide_px"),
    ],
)
def test_invalid_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        GliomaSettings(**changes)


# ----------------------------------------------------------------------- feature-level toy


def test_toy_shapes_views_and_labels():
    toy = make_ksfusion_toy(40, grid=(6, 8), feature_dim=12, n_genes=40, task="grading", seed=2)
    assert toy["grid"].shape == (40, 6, 8, 12) and toy["grid"].dtype == np.float32
    assert toy["mask"].shape == (40, 6, 8) and (toy["mask"].sum(axis=(1, 2)) == 43).all()
    assert toy["patches"].shape == (40, 43, 12) and toy["coords"].shape == (40, 43, 2)
    assert toy["genes"].shape == (40, 40)
    for i in (0, 17):
        rows, cols = toy["coords"][i].T
        assert toy["mask"][i, rows, cols].all()
        np.testing.assert_array_equal(toy["patches"][i], toy["grid"][i, rows, cols])
        assert not toy["grid"][i][~toy["mask"][i]].any()
    groups = toy["gene_groups"]
    assert len(groups["tumour"]) == 10 and len(groups["microenvironment"]) == 20
    assert not set(groups["tumour"]) & set(groups["microenvironment"])
    assert np.bincount(toy["diagnosis"]).tolist() == [10] * 4
    np.testing.assert_array_equal(toy["y"], toy["grade"])
    assert set(toy["grade"]) <= {0, 1, 2} and (toy["time"] > 0).all()
    assert set(toy["event"]) <= {0, 1}
    survival = make_ksfusion_toy(40, grid=(6, 8), feature_dim=12, n_genes=40, task="survival")
    np.testing.assert_array_equal(survival["y"], survival["time"])
    # tumour region grows with T
    size = toy["tumour_cells"].sum(axis=(1, 2))
    assert stats.spearmanr(size, toy["T"])[0] > 0.6
    with pytest.raises(ValueError, match="task"):
        make_ksfusion_toy(8, task="staging")


def test_toy_is_deterministic_per_seed():
    first, again, other = (make_ksfusion_toy(16, seed=s) for s in (3, 3, 4))
    for key in ("grid", "mask", "genes", "patches", "coords", "diagnosis", "time", "event"):
        np.testing.assert_array_equal(first[key], again[key])
    assert first["gene_groups"] == again["gene_groups"]
    assert not np.array_equal(first["grid"], other["grid"])
    assert not np.array_equal(first["genes"], other["genes"])


def test_toy_genes_separate_diagnosis_better_than_grid_means():
    toy = make_ksfusion_toy(240, seed=5)
    groups = np.arange(240)
    genes = _grouped_accuracy(toy["genes"], toy["diagnosis"], groups)
    grid_mean = toy["grid"].sum(axis=(1, 2)) / toy["mask"].sum(axis=(1, 2))[:, None]
    grid = _grouped_accuracy(grid_mean, toy["diagnosis"], groups)
    assert genes > 0.8, genes
    assert CHANCE + 0.1 < grid < genes - 0.15, (grid, genes)
    c_index = float(concordance_index(toy["time"], toy["event"], toy["T"]))
    assert c_index > 0.6, c_index
