"""MMGL and MDL-IIA, the multi-modal rows of CMUS-Net Tables 4 and 6, on OM + IM + TEM bags."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mmdiag.config import load_config
from mmdiag.data.manifest import ManifestRules, build_manifest, read_manifest, write_manifest
from mmdiag.data.splits import make_splits, write_splits
from mmdiag.methods.cmus.fold import run_cmus_fold
from mmdiag.methods.cmus.settings import model_arguments
from mmdiag.models import create_model
from mmdiag.models.mdl_iia import ChannelSpatialAttention, SelfAttention2d, attend_side_by_side
from mmdiag.models.mmgl import graph_regulariser, normalised_adjacency

ROOT = Path(__file__).resolve().parents[1]
DEMO = [
    ROOT / "config/config.yaml",
    ROOT / "config/methods/cmus.yaml",
    ROOT / "config/methods/csmil.yaml",
    ROOT / "config/methods/mhd.yaml",
]
TINY_MMGL = {
    "pixel_grid_px": 4,
    "head_dim": 4,
    "num_heads": 2,
    "hidden_dim": 8,
    "population_size": 6,
    "graph_threshold": 0.0,
}
TINY_MDL_IIA = {"encoder": "test_convnext", "hidden_dim": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(n_patients=3, tem_counts=(2, 1, 3), size=32, seed=0, labels=None):
    generator = torch.Generator().manual_seed(seed)
    return {
        "om": torch.randn(n_patients, 3, size, size, generator=generator),
        "im": torch.randn(n_patients, 3, size, size, generator=generator),
        "tem": torch.randn(sum(tem_counts), 3, size, size, generator=generator),
        "tem_patient": torch.repeat_interleave(torch.arange(n_patients), torch.tensor(tem_counts)),
        "label": torch.arange(n_patients) % 3 if labels is None else torch.as_tensor(labels),
    }


def patient(batch, index):
    """The batch of patient ``index`` alone."""
    tem = batch["tem_patient"] == index
    return {
        "om": batch["om"][index : index + 1],
        "im": batch["im"][index : index + 1],
        "tem": batch["tem"][tem],
        "tem_patient": torch.zeros(int(tem.sum()), dtype=torch.long),
        "label": batch["label"][index : index + 1],
    }


def mmgl(**kwargs):
    torch.manual_seed(0)
    return create_model("mmgl", num_classes=3, **(TINY_MMGL | kwargs))


def mdl_iia(**kwargs):
    torch.manual_seed(0)
    return create_model("mdl_iia", num_classes=3, **(TINY_MDL_IIA | kwargs))


def fill_population(model, steps=3):
    """A few training steps, so the population bank holds training features."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        loss, _ = model.loss(make_batch(seed=100 + step))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


# --------------------------------------------------------------------------- both models


@pytest.mark.parametrize("build", [mmgl, mdl_iia], ids=["mmgl", "mdl_iia"])
@pytest.mark.parametrize("training", [True, False])
def test_output_shape_and_every_modality_reaches_the_logits(build, training):
    model = build().train(training)
    batch = make_batch()
    for key in ("om", "im", "tem"):
        batch[key].requires_grad_(True)
    logits = model(batch)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    for key in ("om", "im", "tem"):
        assert batch[key].grad.abs().sum() > 0, key


def separable_batch(n_per_class=4, size=32, seed=0):
    """Three classes told apart by a per-class shift of every modality's pixels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    n = len(labels)
    shift = (labels.float() - 1.0)[:, None, None, None]
    tem_patient = torch.arange(n).repeat_interleave(2)
    return {
        "om": 0.3 * torch.randn(n, 3, size, size, generator=generator) + shift,
        "im": 0.3 * torch.randn(n, 3, size, size, generator=generator) - shift,
        "tem": 0.3 * torch.randn(2 * n, 3, size, size, generator=generator) + shift[tem_patient],
        "tem_patient": tem_patient,
        "label": labels,
    }


# MMGL at its own graph cut (0.9) and without the degree reward: on twelve patients that term
# links every patient to every other, which averages the classes away
SEPARABLE_SETTINGS = [
    (mmgl, {"graph_threshold": 0.9, "degree": 0.0}, 60),
    (mdl_iia, {}, 25),
]


@pytest.mark.parametrize(("build", "settings", "steps"), SEPARABLE_SETTINGS, ids=["mmgl", "mdl"])
def test_a_separable_problem_is_learnt(build, settings, steps):
    model = build(dropout=0.0, **settings)
    batch = separable_batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        model.train()
        loss = model.loss(batch)[0] if hasattr(model, "loss") else None
        if loss is None:
            loss = F.cross_entropy(model(batch), batch["label"])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        predicted = model.eval()(separable_batch(seed=1)).argmax(dim=1)
    assert (predicted == batch["label"]).float().mean() >= 0.9


# --------------------------------------------------------------------------- MMGL


def test_mmgl_learnt_graph_is_symmetric_thresholded_and_normalised():
    model = mmgl(graph_threshold=0.2)
    z = torch.randn(7, model.num_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adjacency = model.graph(z)
        projected = F.normalize(model.graph_projection(z), dim=1).numpy()
    cosine = projected @ projected.T
    expected = np.where(cosine > 0.2, cosine, 0.0)  # weighted cosine, cut at the threshold
    np.testing.assert_allclose(adjacency.numpy(), expected, atol=1e-6)
    assert torch.allclose(adjacency, adjacency.T)
    np.testing.assert_allclose(np.diag(adjacency.numpy()), 1.0, atol=1e-6)
    propagation = normalised_adjacency(adjacency).numpy()
    with_self = expected + np.eye(7)
    inverse_sqrt = np.diag(1.0 / np.sqrt(with_self.sum(axis=1)))
    np.testing.assert_allclose(propagation, inverse_sqrt @ with_self @ inverse_sqrt, atol=1e-6)
    np.testing.assert_allclose(propagation, propagation.T, atol=1e-7)
    assert np.linalg.eigvalsh(propagation).max() <= 1.0 + 1e-6  # D^-1/2 (A + I) D^-1/2


def test_mmgl_graph_regulariser_matches_its_formula():
    adjacency = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.25], [0.0, 0.25, 1.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # tr(Z^T L Z) = sum_ij A_ij |z_i - z_j|^2 / 2 = 0.5 * 2 + 0.25 * 1 = 1.25
    smoothness = 1.25 / 9
    degrees = np.array([1.5, 1.75, 1.25])
    connectivity = np.log(degrees + 1e-5).sum() / 3
    sparsity = (1 + 1 + 1 + 2 * 0.25 + 2 * 0.0625) / 9
    value = graph_regulariser(z, adjacency, 1.0, 0.5, 0.1)
    assert math.isclose(
        value.item(), smoothness - 0.5 * connectivity + 0.1 * sparsity, rel_tol=1e-5
    )


def test_mmgl_prediction_reads_no_label_and_no_other_patient():
    model = fill_population(mmgl())
    batch = make_batch(seed=7)
    relabelled = batch | {"label": torch.tensor([2, 2, 1])}
    other_patients = make_batch(seed=8)
    for key in ("om", "im"):
        other_patients[key][0] = batch[key][0]
    other_patients["tem"][other_patients["tem_patient"] == 0] = batch["tem"][
        batch["tem_patient"] == 0
    ]
    with torch.no_grad():
        logits = model(batch)
        assert torch.equal(logits, model(relabelled))
        assert torch.allclose(logits[0], model(patient(batch, 0))[0], atol=1e-6)
        assert torch.allclose(logits[0], model(other_patients)[0], atol=1e-6)
        unlabelled = {k: v for k, v in batch.items() if k != "label"}
        assert torch.equal(logits, model(unlabelled))  # the forward pass never reads labels


def test_mmgl_inductive_evaluation_is_deterministic_and_updates_no_state():
    model = fill_population(mmgl())
    assert int(model.population_filled) == 6  # 3 steps x 3 patients into a bank of 6
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = make_batch(seed=9)
    with torch.no_grad():
        first, second = model(batch), model(batch)
    assert torch.equal(first, second)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_mmgl_test_patients_join_the_banked_training_features():
    model = fill_population(mmgl())
    batch = make_batch(seed=5)
    with torch.no_grad():
        with_population = model(batch)
        model.population_filled.zero_()  # no training patients: each graph is one node
        alone = model(batch)
    assert not torch.allclose(with_population, alone)


def test_mmgl_bank_is_a_ring_written_in_training_only():
    model = mmgl(population_size=4)
    z = torch.arange(6.0)[:, None].repeat(1, model.num_features)  # row i is all i
    model.remember(z[:3])
    model.remember(z[3:])  # 6 rows into 4 places: the last 4 remain, in ring order
    assert int(model.population_filled) == 4 and int(model.population_next) == 2
    assert torch.equal(model.population[[2, 3, 0, 1]], z[2:])
    before = model.population.clone()
    with torch.no_grad():
        model.eval()(make_batch())
    assert torch.equal(model.population, before)


# --------------------------------------------------------------------------- MDL-IIA


def test_mdl_iia_self_attention_matches_a_hand_computation():
    torch.manual_seed(1)
    attention = SelfAttention2d(8)  # f, g: 8 -> 1 channel; h: 8 -> 8
    with torch.no_grad():
        attention.gamma.fill_(0.7)
    x = torch.randn(1, 8, 1, 3)  # three positions
    out, beta = attention.attention(x)
    tokens = x[0, :, 0, :].T.double()  # (3 positions, 8 channels)

    def conv(layer):
        weight = layer.weight[:, :, 0, 0].detach().double()
        return tokens @ weight.T + layer.bias.detach().double()

    f, g, h = conv(attention.f), conv(attention.g), conv(attention.h)
    expected_beta = torch.zeros(3, 3, dtype=torch.double)
    for i in range(3):
        scores = [float(g[i] @ f[j]) for j in range(3)]
        total = sum(math.exp(s) for s in scores)
        for j in range(3):
            expected_beta[i, j] = math.exp(scores[j]) / total
    expected = 0.7 * (expected_beta @ h) + tokens
    torch.testing.assert_close(beta[0].double(), expected_beta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0, :, 0, :].T.double(), expected, rtol=1e-5, atol=1e-6)


def test_mdl_iia_inter_modality_attention_spans_every_modality_side_by_side():
    torch.manual_seed(2)
    attention = SelfAttention2d(8)
    with torch.no_grad():
        attention.gamma.fill_(1.0)
    maps = [torch.randn(1, 8, 2, 2) for _ in range(3)]
    parts = attend_side_by_side(attention, maps)
    assert [p.shape for p in parts] == [m.shape for m in maps]
    # the joint map has 2 x 6 positions; each attends to all 12 (every modality's)
    _, beta = attention.attention(torch.cat(maps, dim=-1))
    assert beta.shape == (1, 12, 12) and (beta > 0).all()
    torch.testing.assert_close(beta.sum(dim=-1), torch.ones(1, 12))
    changed = [maps[0], maps[1], maps[2] + 1.0]
    assert not torch.allclose(attend_side_by_side(attention, changed)[0], parts[0])


def test_mdl_iia_channel_spatial_attention_matches_a_hand_computation():
    torch.manual_seed(3)
    csa = ChannelSpatialAttention(4)  # shared MLP 4 -> 2 -> 4, both ReLU
    x = torch.randn(1, 4, 3, 3)
    out = csa(x)[0].double()
    xd = x[0].double()

    def mlp(v):
        first, second = csa.mlp[0], csa.mlp[2]
        hidden = torch.relu(first.weight.double() @ v + first.bias.double())
        return torch.relu(second.weight.double() @ hidden + second.bias.double())

    channel = torch.sigmoid(mlp(xd.amax(dim=(1, 2))) + mlp(xd.mean(dim=(1, 2)))).detach()
    refined = xd * channel[:, None, None]
    pooled = torch.stack([refined.amax(dim=0), refined.mean(dim=0)])  # (2, 3, 3)
    padded = F.pad(pooled, (1, 1, 1, 1))
    kernel = csa.spatial.weight[0].detach().double()  # (2, 3, 3)
    spatial = torch.zeros(3, 3, dtype=torch.double)
    for r in range(3):
        for c in range(3):
            spatial[r, c] = torch.sigmoid((kernel * padded[:, r : r + 3, c : c + 3]).sum())
    expected = refined * spatial[None] + xd
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)


def test_mdl_iia_tem_bag_is_the_mean_of_its_images_feature_maps():
    model = mdl_iia().eval()
    batch = make_batch()
    with torch.no_grad():
        maps = model.encode(batch)
        single = model.encode(patient(batch, 2))
    torch.testing.assert_close(maps["TEM"][2:3], single["TEM"], rtol=1e-5, atol=1e-6)
    assert maps["OM"].shape == maps["IM"].shape == maps["TEM"].shape


# --------------------------------------------------------------------------- paper rows


def test_paper_rows_build_the_papers_networks():
    config = load_config([*DEMO, ROOT / "config/paper/cmus.yaml"])
    variants = config["methods"]["cmus"]["variants"]
    mmgl_arguments = model_arguments("mmgl", variants["mmgl"])
    expected = {"encoder": "pixels", "num_heads": 4, "hidden_dim": 96, "dropout": 0.0}
    assert {k: mmgl_arguments[k] for k in expected} == expected
    mdl_arguments = model_arguments("mdl_iia", variants["mdl_iia"])
    expected = {"encoder": "resnet50", "hidden_dim": 512, "dropout": 0.3}
    assert {k: mdl_arguments[k] for k in expected} == expected
    staging = config["methods"]["cmus_staging"]["variants"]
    assert staging["mmgl"] == variants["mmgl"] and staging["mdl_iia"] == variants["mdl_iia"]


# --------------------------------------------------------------------------- fold trainer

FOLD_VARIANTS = {
    "mmgl": {"model": "mmgl", "encoder": "pixels", "hidden_dim": 16, "dropout": 0.0},
    "mdl_iia": {"model": "mdl_iia", "encoder": "test_convnext", "hidden_dim": 16},
    "mmformer": {"model": "cmus_mmformer", "image_size_px": 32, "token_dim": 16, "num_heads": 2},
    "msan": {"model": "cmus_msan"},
    "aggn": {"model": "cmus_aggn", "encoder": "aggn", "widths": (8, 16, 16), "features": 16},
}


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """Twelve synthetic patients, their manifest and a 3-fold split."""
    from mmdiag.synth import write_synthetic_cohort

    config = load_config(DEMO)
    root = tmp_path_factory.mktemp("multimodal")
    synth = copy.deepcopy(config["synth"]) | {
        "n_patients": 12,
        "om_size_px": [96, 64],
        "im_size_px": [96, 64],
        "tem_size_px": 48,
        "tem_legend_px": 6,
        "tem_per_patient": [2, 3],
    }
    synth["wsi"]["n_patients"] = synth["ct"]["n_patients"] = 0
    cohort = write_synthetic_cohort(root / "raw", synth, progress=False)
    rules = ManifestRules(
        classes=("IgAN", "MN", "LN"),
        stages=("I", "II", "III"),
        required_modalities=("OM", "IM", "TEM"),
    )
    manifest = write_manifest(
        build_manifest(cohort_root=cohort, rules=rules), root / "manifest.tsv"
    )
    scheme = {"type": "kfold", "n_folds": 3, "label": "disease"}
    splits = write_splits(
        make_splits(read_manifest(manifest), "k3", scheme, seed=1), root / "k3.json"
    )
    return config, root, manifest, splits


@pytest.mark.parametrize("variant", sorted(FOLD_VARIANTS))
def test_the_cmus_fold_trainer_trains_and_evaluates_each_model(tiny_cohort, variant):
    config, root, manifest, splits = tiny_cohort
    settings = copy.deepcopy(config["methods"]["cmus"])
    settings["preprocess"] |= {"image_size_px": 32, "tem_legend_px": 6}
    settings["train"] |= {"epochs": 1}
    settings["variants"][variant] = FOLD_VARIANTS[variant]
    out = root / variant / "fold_0"
    metrics = run_cmus_fold(
        manifest_path=manifest,
        splits_path=splits,
        fold=0,
        variant=variant,
        method_settings=settings,
        manifest_rules=config["manifest"],
        out_dir=out,
    )
    assert all(math.isfinite(value) for value in metrics.values())
    written = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "predictions.tsv", "metrics.tsv"} <= written
