"""Figures from result tables and Grad-CAM / embedding explanations."""

import warnings

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, roc_auc_score
from torch import nn

from mmdiag.evaluation.explain import grad_cam, last_feature_module
from mmdiag.reporting import figures
from mmdiag.reporting.figures import (
    confusion_counts,
    plot_confusion,
    plot_grad_cam,
    plot_loss_weight_simplex,
    plot_metric_by_setting,
    plot_roc_per_class,
    plot_tsne,
    roc_curves,
    tsne_embedding,
    upsample_cam,
)

CLASSES = ["IgAN", "MN", "LN"]


def _predictions(seed=0, n_folds=5, n_per_fold=30, signal=1.5):
    """Random predictions with some signal, every class in every fold."""
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(n_folds):
        y = np.resize(np.arange(len(CLASSES)), n_per_fold)
        logits = rng.normal(size=(n_per_fold, len(CLASSES)))
        logits[np.arange(n_per_fold), y] += signal
        prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        for i in range(n_per_fold):
            rows.append(
                {
                    "patient_id": f"P{fold}_{i}",
                    "fold": fold,
                    "variant": "concat",
                    "y_true": int(y[i]),
                    "y_pred": int(prob[i].argmax()),
                    **{f"prob_{c}": prob[i, k] for k, c in enumerate(CLASSES)},
                }
            )
    return pd.DataFrame(rows)


def _fold_all(variants, seed=0, n_folds=5):
    rng = np.random.default_rng(seed)
    rows = []
    for j, variant in enumerate(variants):
        for fold in range(n_folds):
            for metric in ("ACC", "AUC", "F1"):
                value = float(np.clip(0.6 + 0.02 * j + rng.normal(0, 0.03), 0, 1))
                rows.append(("cmus", variant, fold, metric, value))
    return pd.DataFrame(rows, columns=["method", "variant", "fold", "metric", "value"])


def _check_png(path, min_px=(300, 200), max_px=(4000, 3000)):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert min_px[0] <= width <= max_px[0] and min_px[1] <= height <= max_px[1], image.size
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, "the image is (nearly) one colour"
    assert not list(path.parent.glob(f".{path.name}.*")), "temporary file left behind"


# ----------------------------------------------------------------------------- ROC


def test_roc_auc_equals_sklearn_fold_mean_and_mean_curve_is_a_roc_curve():
    predictions = _predictions()
    rocs = roc_curves(predictions)
    assert list(rocs) == CLASSES
    for k, name in enumerate(CLASSES):
        fold_auc = [
            roc_auc_score(rows["y_true"] == k, rows[f"prob_{name}"])
            for _, rows in predictions.groupby("fold")
        ]
        roc = rocs[name]
        assert roc.auc_mean == pytest.approx(np.mean(fold_auc), abs=1e-12)
        assert roc.auc_sd == pytest.approx(np.std(fold_auc, ddof=1), abs=1e-12)
        assert roc.fpr_grid.shape == (101,)
        assert roc.mean_tpr[0] == 0.0 and roc.mean_tpr[-1] == pytest.approx(1.0)
        assert np.all(np.diff(roc.mean_tpr) >= -1e-12)
        assert np.all((roc.sd_tpr >= 0) & np.isfinite(roc.sd_tpr))
        # the area under the vertically averaged curve is close to the mean fold AUC
        area = np.sum(np.diff(roc.fpr_grid) * (roc.mean_tpr[1:] + roc.mean_tpr[:-1]) / 2)
        assert area == pytest.approx(roc.auc_mean, abs=0.02)


def test_tpr_on_grid_matches_a_slow_reference():
    """Linear between points, upper value at vertical steps, 0 at FPR 0."""
    rng = np.random.default_rng(3)
    from sklearn.metrics import roc_curve

    grid = np.linspace(0, 1, 101)
    for _ in range(20):
        y = rng.integers(0, 2, 25)
        y[:2] = [0, 1]
        score = rng.integers(0, 6, 25).astype(float)  # ties make diagonal segments
        fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
        expected = []
        for x in grid:
            if x == 0:
                expected.append(0.0)
                continue
            at = tpr[fpr == x]
            if at.size:
                expected.append(at.max())
                continue
            left = np.flatnonzero(fpr < x)[-1]
            right = np.flatnonzero(fpr > x)[0]
            t = (x - fpr[left]) / (fpr[right] - fpr[left])
            expected.append(tpr[left] + t * (tpr[right] - tpr[left]))
        assert np.allclose(figures._tpr_on_grid(fpr, tpr, grid), expected)


def test_perfect_classifier_mean_curve_is_one_after_zero():
    predictions = _predictions(signal=50.0)
    roc = roc_curves(predictions)["MN"]
    assert roc.auc_mean == 1.0
    assert np.all(roc.mean_tpr[1:] == 1.0)


def test_roc_skips_folds_without_positives(tmp_path):
    predictions = _predictions()
    drop = (predictions["fold"] == 2) & (predictions["y_true"] == 1)
    predictions = predictions[~drop]
    with pytest.warns(UserWarning, match="no positives"):
        rocs = roc_curves(predictions)
    assert sorted(rocs["MN"].fold_auc) == [0, 1, 3, 4]
    assert sorted(rocs["IgAN"].fold_auc) == [0, 1, 2, 3, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_png(plot_roc_per_class(predictions, tmp_path / "roc.png", title="ROC"))


def test_plot_roc_writes_png(tmp_path):
    path = plot_roc_per_class(_predictions(), tmp_path / "sub" / "roc.png", title="concat")
    assert path == tmp_path / "sub" / "roc.png"
    _check_png(path, min_px=(1200, 400))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.drop(columns="y_true"), "lacks columns"),
        (lambda p: p.iloc[:0], "empty"),
        (lambda p: p.drop(columns=["prob_MN", "prob_LN"]), "prob_"),
        (lambda p: p.assign(y_pred=p["y_pred"] + 3), "y_pred must lie"),
        (lambda p: p.assign(y_true=p["y_true"].astype(float)), "integer"),
    ],
)
def test_bad_predictions_raise(tmp_path, change, message):
    bad = change(_predictions())
    with pytest.raises(ValueError, match=message):
        plot_roc_per_class(bad, tmp_path / "roc.png", title="x")
    with pytest.raises(ValueError, match=message):
        plot_confusion(bad, tmp_path / "cm.png", title="x")
    assert not (tmp_path / "roc.png").exists()


# ----------------------------------------------------------------------------- confusion


def test_confusion_counts_equal_sklearn(tmp_path):
    predictions = _predictions(seed=4)
    counts, classes = confusion_counts(predictions)
    assert classes == CLASSES
    expected = confusion_matrix(predictions["y_true"], predictions["y_pred"], labels=[0, 1, 2])
    np.testing.assert_array_equal(counts, expected)
    for normalise in (False, True):
        path = plot_confusion(
            predictions, tmp_path / f"cm_{normalise}.png", title="cm", normalise=normalise
        )
        _check_png(path)


def test_confusion_keeps_absent_classes():
    predictions = _predictions()
    predictions = predictions[predictions["y_true"] != 2].assign(y_pred=0)
    counts, _ = confusion_counts(predictions)
    assert (
        counts.shape == (3, 3) and counts[2].sum() == 0 and counts[:, 0].sum() == len(predictions)
    )


# ----------------------------------------------------------------------------- fold metrics


def test_metric_by_setting(tmp_path):
    settings = {}
    for bs in (1, 2, 4, 8):
        settings[f"cmus_net_bs{bs}"] = ("CMUS-Net", bs)
        settings[f"late_vote_bs{bs}"] = ("late fusion (vote)", bs)
    fold_all = _fold_all(list(settings))
    path = plot_metric_by_setting(
        fold_all, settings, tmp_path / "fig5.png", title="Batch size", xlabel="batch size"
    )
    _check_png(path, min_px=(1000, 400))
    with pytest.raises(ValueError, match="not in fold_all"):
        plot_metric_by_setting(
            fold_all, {"nope": ("x", 1)}, tmp_path / "bad.png", title="t", xlabel="x"
        )
    with pytest.raises(ValueError, match="metrics"):
        plot_metric_by_setting(
            fold_all, settings, tmp_path / "bad.png", metrics=("SPE",), title="t", xlabel="x"
        )
    twice = pd.concat([fold_all, fold_all.assign(method="other")])
    with pytest.raises(ValueError, match="one method"):
        plot_metric_by_setting(twice, settings, tmp_path / "bad.png", title="t", xlabel="x")


def test_fold_summary_uses_sample_sd():
    fold_all = _fold_all(["a", "b"])
    summary = figures._fold_summary(fold_all, ["b", "a"], "AUC")
    values = fold_all.query("variant == 'b' and metric == 'AUC'")["value"]
    assert list(summary.index) == ["b", "a"]
    assert summary.loc["b", "mean"] == pytest.approx(values.mean())
    assert summary.loc["b", "sd"] == pytest.approx(np.std(values, ddof=1))


# ----------------------------------------------------------------------------- loss weights


def _simplex_weights(step=0.2):
    weights = {}
    ticks = np.round(np.arange(0, 1 + 1e-9, step), 6)
    for alpha in ticks:
        for beta in ticks:
            if alpha + beta <= 1 + 1e-9:
                weights[f"w_{alpha:g}_{beta:g}"] = (alpha, beta, 1 - alpha - beta)
    return weights


def test_loss_weight_simplex(tmp_path):
    weights = _simplex_weights()
    fold_all = _fold_all(list(weights))
    path = plot_loss_weight_simplex(fold_all, weights, tmp_path / "fig6.png", title="Loss weights")
    _check_png(path, min_px=(900, 400))


@pytest.mark.parametrize(
    "triple, message",
    [((0.5, 0.3, 0.3), "sums to"), ((0.5, 0.5), "three"), ((1.2, -0.2, 0.0), "non-negative")],
)
def test_loss_weight_simplex_rejects_bad_weights(tmp_path, triple, message):
    weights = {"a": (0.2, 0.3, 0.5), "b": triple}
    with pytest.raises(ValueError, match=message):
        plot_loss_weight_simplex(_fold_all(["a", "b"]), weights, tmp_path / "x.png", title="t")
    assert not (tmp_path / "x.png").exists()


def test_loss_weight_simplex_accepts_rounding_and_rejects_shared_cells(tmp_path):
    weights = {"a": (0.1, 0.2, 0.7 + 5e-7), "b": (0.1, 0.2, 0.7)}
    with pytest.raises(ValueError, match="share one"):
        plot_loss_weight_simplex(_fold_all(["a", "b"]), weights, tmp_path / "x.png", title="t")


# ----------------------------------------------------------------------------- t-SNE


def _clusters(n_per_class=15, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(3, dim))
    labels = np.repeat(np.arange(3), n_per_class)
    return centres[labels] + rng.normal(size=(labels.size, dim)), labels


def test_tsne_keeps_separated_clusters_apart():
    features, labels = _clusters()
    embedding = tsne_embedding(features, seed=0)
    assert embedding.shape == (45, 2)
    distances = np.linalg.norm(embedding[:, None] - embedding[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    nearest_label = labels[distances.argmin(axis=1)]
    assert np.mean(nearest_label == labels) >= 0.95
    np.testing.assert_allclose(tsne_embedding(features, seed=0), embedding)


def test_plot_tsne(tmp_path):
    features, labels = _clusters()
    panels = {"OM": features, "fusion": features[:, ::-1]}
    path = plot_tsne(panels, labels, CLASSES, tmp_path / "fig4.png", title="t-SNE")
    _check_png(path, min_px=(900, 400))
    with pytest.raises(ValueError, match="same n"):
        plot_tsne(
            {"OM": features, "IM": features[:10]}, labels, CLASSES, tmp_path / "x.png", title="t"
        )
    with pytest.raises(ValueError, match="labels must lie"):
        plot_tsne({"OM": features}, labels + 1, CLASSES, tmp_path / "x.png", title="t")


# ----------------------------------------------------------------------------- Grad-CAM


class TwoColourNet(nn.Module):
    """conv 1x1 (identity) -> ReLU -> global average pool -> linear, weights set by hand.

    Class 1's logit is the mean of input channel 0, class 0's the mean of channel 1: on an
    image whose channel 0 is bright only in the top-left quadrant, class 1 depends only on it.
    """

    def __init__(self, channels_last=False):
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(2, 2, kernel_size=1)
        self.act = nn.ReLU(inplace=True)  # in place right after the target
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2)[:, :, None, None])
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
            self.fc.bias.zero_()
        self.features = Permute() if channels_last else nn.Identity()

    def forward(self, batch):
        x = self.features(self.conv(batch["image"]))
        x = self.act(x)
        pooled = x.mean(dim=(1, 2)) if self.channels_last else x.mean(dim=(2, 3))
        return self.fc(pooled)


class Permute(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def _two_colour_batch(height=8, width=8, n=2):
    image = torch.zeros(n, 2, height, width)
    image[:, 0, : height // 2, : width // 2] = 1.0  # channel 0: top-left quadrant
    image[:, 1, height // 2 :, width // 2 :] = 1.0  # channel 1: bottom-right quadrant
    return {"image": image}


def _peak_quadrant(cam):
    height, width = cam.shape
    row, col = np.unravel_index(cam.argmax(), cam.shape)
    return ("top" if row < height // 2 else "bottom") + ("-left" if col < width // 2 else "-right")


def test_grad_cam_localises_the_class_evidence():
    model = TwoColourNet()
    batch = _two_colour_batch()
    cams = grad_cam(model, batch, model.conv, class_index=1)
    assert cams.shape == (2, 8, 8)
    assert cams.min() >= 0 and cams.max() == pytest.approx(1.0)
    for cam in cams:
        assert _peak_quadrant(cam) == "top-left"
        assert cam[:4, :4].min() == pytest.approx(1.0) and cam[4:, :].max() == 0.0
    assert _peak_quadrant(grad_cam(model, batch, model.conv, class_index=0)[0]) == "bottom-right"
    per_row = grad_cam(model, batch, model.conv, class_index=[1, 0])
    assert _peak_quadrant(per_row[0]) == "top-left" and _peak_quadrant(per_row[1]) == "bottom-right"


def test_grad_cam_sample_index_explains_one_row():
    model = TwoColourNet()
    cams = grad_cam(model, _two_colour_batch(n=3), model.conv, class_index=1, sample_index=1)
    assert cams.shape == (3, 8, 8)
    assert cams[1].max() == pytest.approx(1.0)
    assert cams[0].max() == 0.0 and cams[2].max() == 0.0


def test_grad_cam_channels_last_matches_channels_first():
    batch = _two_colour_batch(height=8, width=6)
    nchw, nhwc = TwoColourNet(), TwoColourNet(channels_last=True)
    expected = grad_cam(nchw, batch, nchw.conv, class_index=1, channels_last=False)
    assert expected.shape == (2, 8, 6)
    got = grad_cam(nhwc, batch, nhwc.features, class_index=1, channels_last=True)
    np.testing.assert_allclose(got, expected)
    with pytest.raises(ValueError, match="channels_last"):  # 8 x 6 maps with 2 channels: no cue
        grad_cam(nhwc, batch, nhwc.features, class_index=1)
    square = _two_colour_batch(height=8, width=8)
    assert grad_cam(nhwc, square, nhwc.features, class_index=1).shape == (2, 8, 8)


def test_grad_cam_leaves_no_hooks_grads_or_mode_changes():
    model = TwoColourNet()
    model.train()
    model.fc.eval()
    grad_cam(model, _two_colour_batch(), model.conv, class_index=1)
    assert not model.conv._forward_hooks and not model.conv._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.conv.training and not model.fc.training
    with pytest.raises(ValueError, match="class_index"):
        grad_cam(model, _two_colour_batch(), model.conv, class_index=5)
    assert not model.conv._forward_hooks
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="not a submodule"):
        grad_cam(model, _two_colour_batch(), nn.Conv2d(1, 1, 1), class_index=1)


def test_grad_cam_works_on_frozen_models_under_no_grad():
    model = TwoColourNet().requires_grad_(False)
    with torch.no_grad():
        cams = grad_cam(model, _two_colour_batch(), model.conv, class_index=1)
    assert _peak_quadrant(cams[0]) == "top-left"


def test_grad_cam_gives_a_map_per_bag_image():
    """A TEM-like bag: N images for B patients, averaged per patient before the head."""

    class BagNet(TwoColourNet):
        def forward(self, batch):
            x = self.act(self.conv(batch["tem"])).mean(dim=(2, 3))
            bag = batch["tem_patient"]
            sums = x.new_zeros(2, x.shape[1]).index_add_(0, bag, x)
            return self.fc(sums / torch.bincount(bag, minlength=2)[:, None])

    model = BagNet()
    images = _two_colour_batch(n=5)["image"]
    batch = {"tem": images, "tem_patient": torch.tensor([0, 0, 1, 1, 1])}
    cams = grad_cam(model, batch, model.conv, class_index=1, sample_index=0)
    assert cams.shape == (5, 8, 8)
    assert all(_peak_quadrant(c) == "top-left" for c in cams[:2])
    assert cams[2:].max() == 0.0


def test_last_feature_module_and_grad_cam_on_a_timm_encoder():
    encoder = timm.create_model("test_resnet", num_classes=0)
    module = last_feature_module(encoder)
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("shape", o.shape))
    try:
        encoder(torch.zeros(1, 3, 64, 64))
    finally:
        handle.remove()
    assert seen["shape"][1] == encoder.feature_info[-1]["num_chs"]
    with pytest.raises(ValueError, match="Sequential"):
        last_feature_module(nn.Sequential(nn.Conv2d(3, 3, 1)))

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.head = nn.Linear(encoder.num_features, 3)

        def forward(self, batch):
            return self.head(self.encoder(batch["om"]))

    model = Classifier()
    cams = grad_cam(model, {"om": torch.randn(2, 3, 96, 96)}, module, class_index=2)
    assert cams.shape == (2, 3, 3) and np.all((cams >= 0) & (cams <= 1))


def test_plot_grad_cam(tmp_path):
    rng = np.random.default_rng(0)
    images = {m: rng.integers(0, 255, (64, 80, 3), dtype=np.uint8) for m in ("OM", "IM", "TEM")}
    cams = {m: rng.random((4, 5)) for m in images}
    _check_png(plot_grad_cam(images, cams, tmp_path / "fig8.png", title="Grad-CAM"))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        plot_grad_cam(images, {m: c * 2 for m, c in cams.items()}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="same modalities"):
        plot_grad_cam(images, {"OM": cams["OM"]}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="uint8"):
        plot_grad_cam({"OM": images["OM"] / 255}, {"OM": cams["OM"]}, tmp_path / "x.png", title="t")


def test_upsample_cam_is_bilinear_and_bounded():
    cam = np.array([[0.0, 1.0], [1.0, 0.0]])
    up = upsample_cam(cam, (20, 30))
    assert up.shape == (20, 30) and up.min() >= 0 and up.max() <= 1
    assert up[0, 0] < 0.1 and up[0, -1] > 0.9 and 0.4 < up[10, 15] < 0.6
