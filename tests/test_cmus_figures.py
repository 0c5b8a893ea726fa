"""Which variants feed the paper's Figs. 5 and 6, read from the paper config."""

from mmdiag.config import load_config
from mmdiag.methods.cmus.figures import batch_size_series, loss_weight_variants

from .test_config import DEMO, ROOT


def test_paper_config_feeds_fig5_and_fig6():
    config = load_config([*DEMO, ROOT / "config/paper/cmus.yaml"])
    cmus = config["methods"]["cmus"]
    series = batch_size_series(cmus)
    by_label: dict[str, set[float]] = {}
    for label, size in series.values():
        by_label.setdefault(label, set()).add(size)
    # Fig. 5: CMUS-Net and the late vote of unimodal models at batch sizes 2, 4, 8, 16
    assert by_label == {"CMUS-Net": {2, 4, 8, 16}, "late fusion (vote)": {2, 4, 8, 16}}
    assert series["late_vote_bs8"] == ("late fusion (vote)", 8.0)
    assert "smil" not in series and "om" not in series  # ablations and unimodal rows stay out
    weights = loss_weight_variants(cmus)
    assert len(weights) == 36
    assert weights["wl_a3_b5_g2"] == (0.3, 0.5, 0.2)
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0.1 - 1e-9 for w in weights.values())


def test_demo_config_has_no_batch_size_or_weight_figures():
    cmus = load_config(DEMO)["methods"]["cmus"]
    assert len({size for _, size in batch_size_series(cmus).values()}) == 1
    assert loss_weight_variants(cmus) == {}
