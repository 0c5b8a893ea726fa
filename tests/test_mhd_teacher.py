"""MHD-Net's teacher: SHFM against a slow transcription of eqs. 1-3, the gate groups, stage
shapes at paper and demo scale, gradients, eq. 4, and a learning signal on planted data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdiag.models.mhd import BRANCHES, MHDTeacher, stage_frames
from mmdiag.models.shfm import SHFM, ConcatFusion

DEMO = {"frames": 8, "widths": (8, 16, 32, 64), "kernel_sizes": (3, 3, 3), "gate_kernel": 3}


def _pointwise(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1³ convolution written out: ``y[o] = Σ_c W[o, c] x[c] + bias[o]``."""
    weight = conv.weight[:, :, 0, 0, 0]
    return torch.einsum("oc,bcthw->bothw", weight, x) + conv.bias[None, :, None, None, None]


def reference_shfm(m: SHFM, f_r: torch.Tensor, f_p: torch.Tensor) -> torch.Tensor:
    """Eqs. 1-3 straight from the paper, with loops over frames, groups and offsets."""
    b, c, t, h, w = f_r.shape
    k = m.kernel_size
    # eq. 1: GAP of the embedded WSI feature to t × κ × κ (h, w divisible by κ here)
    wsi = _pointwise(m.embed_wsi, f_p)
    pooled = wsi.reshape(b, c, t, k, h // k, k, w // k).mean(dim=(4, 6))  # (B, c, t, κ, κ)
    ct = _pointwise(m.embed_ct, f_r)
    corr = torch.zeros(b, t * k * k, t, h, w, dtype=f_r.dtype)
    for frame in range(t):
        ct_frame = ct[:, :, frame].reshape(b, c, h * w)  # f̂_R(t): c × hw
        product = torch.einsum("bcv,bcj->bjv", ct_frame, pooled.reshape(b, c, t * k * k))
        corr[:, :, frame] = product.reshape(b, t * k * k, h, w)
    kernel = _pointwise(m.to_kernel, corr)  # Ik: (B, κ², t, h, w)
    # eq. 2: t + 1 gates; group 1 is the CT feature, group s + 1 WSI frame s
    conv = m.to_gate
    gate = torch.sigmoid(F.conv3d(corr, conv.weight, conv.bias, padding=conv.padding))
    reduced = _pointwise(m.reduce_wsi, f_p)  # (B, c/r, t, h, w)
    frames = []
    for frame in range(t):
        groups = [f_r[:, :, frame] * gate[:, 0:1, frame]]
        groups += [reduced[:, :, s] * gate[:, s + 1 : s + 2, frame] for s in range(t)]
        frames.append(torch.cat(groups, dim=1))
    gated = torch.stack(frames, dim=2)
    # eq. 3: Σ_{u, v} f̄(t, c, h + u, w + v) · Ik(t, u + κ//2, v + κ//2, h, w), zero padded
    padded = F.pad(gated, (k // 2,) * 4)
    fused = torch.zeros_like(gated)
    for u in range(k):
        for v in range(k):
            tap = kernel[:, u * k + v][:, None]
            fused += padded[:, :, :, u : u + h, v : v + w] * tap
    return _pointwise(m.project, fused)


@pytest.mark.parametrize("kappa, gate_kernel", [(3, 3), (3, 5), (5, 7)])
def test_shfm_matches_slow_reference(kappa, gate_kernel):
    torch.manual_seed(0)
    c, t, size = 8, 3, 3 * kappa
    m = SHFM(c, t, kernel_size=kappa, gate_kernel=gate_kernel, norm_layer=nn.Identity)
    m = m.double()
    f_r, f_p = torch.randn(2, 2, c, t, size, size, dtype=torch.float64)
    expected = reference_shfm(m, f_r, f_p)
    got = m(f_r, f_p)
    assert got.shape == (2, c, t, size, size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shfm_gate_has_t_plus_one_groups_on_the_right_slices():
    torch.manual_seed(0)
    c, t, reduction = 8, 3, 4
    m = SHFM(c, t, kernel_size=3, reduction=reduction, norm_layer=nn.Identity)
    assert m.to_gate.out_channels == t + 1
    f_r, f_p = torch.randn(2, 2, c, t, 6, 6)
    # a distinct constant gate per group: 2 for CT, 10 + s for WSI frame s
    gate = torch.empty(2, t + 1, t, 6, 6)
    gate[:, 0] = 2.0
    for s in range(t):
        gate[:, s + 1] = 10.0 + s
    gated = m.gated(f_r, f_p, gate)
    reduced = m.reduce_wsi(f_p)
    cr = c // reduction
    assert gated.shape == (2, c + t * cr, t, 6, 6)
    torch.testing.assert_close(gated[:, :c], 2.0 * f_r)
    for s in range(t):
        block = gated[:, c + s * cr : c + (s + 1) * cr]  # the same WSI frame at every CT frame
        expected = (10.0 + s) * reduced[:, :, s : s + 1].expand(-1, -1, t, -1, -1)
        torch.testing.assert_close(block, expected)


def test_shfm_rejects_mismatched_inputs():
    m = SHFM(8, 3, kernel_size=3)
    with pytest.raises(ValueError, match="SHFM expects"):
        m(torch.randn(1, 8, 3, 6, 6), torch.randn(1, 8, 2, 6, 6))
    with pytest.raises(ValueError, match="kernel_size"):
        SHFM(8, 3, kernel_size=4)


def test_concat_fusion_keeps_shape_and_uses_both_inputs():
    torch.manual_seed(0)
    m = ConcatFusion(8, 3)
    f_r, f_p = torch.randn(2, 1, 8, 3, 5, 5)
    out = m(f_r, f_p)
    assert out.shape == f_r.shape
    assert not torch.allclose(m(f_r, torch.zeros_like(f_p)), out)


def test_stage_shapes_at_paper_scale_on_meta():
    with torch.device("meta"):
        model = MHDTeacher(8)
        ct, wsi = torch.empty(1, 1, 24, 224, 224), torch.empty(1, 3, 24, 224, 224)
        stages = model.radiology.forward_stages(ct)
        out = model(ct, wsi)
    paper = [(64, 12, 56, 56), (128, 6, 28, 28), (256, 3, 14, 14), (512, 2, 7, 7)]
    assert [tuple(s.shape[1:]) for s in stages[1:]] == paper
    for branch in BRANCHES:
        assert [tuple(f.shape[1:]) for f in out[f"features_{branch}"]] == paper[:3]
        assert out[f"logits_{branch}"].shape == (1, 8)
    assert stage_frames(24) == (12, 6, 3, 2)


def _demo_batch(n=4, n_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "ct": torch.randn(n, 1, 8, 32, 32, generator=g),
        "wsi": torch.randn(n, 3, 8, 32, 32, generator=g),
        "label": torch.arange(n) % n_classes,
    }


def test_demo_shapes_gradients_and_eq4():
    torch.manual_seed(0)
    model = MHDTeacher(4, **DEMO)
    batch = _demo_batch()
    out = model(batch["ct"], batch["wsi"])
    demo = [(8, 4, 8, 8), (16, 2, 4, 4), (32, 1, 2, 2)]
    for branch in BRANCHES:
        assert [tuple(f.shape[1:]) for f in out[f"features_{branch}"]] == demo
    loss, logits, terms = model.loss(batch)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    torch.testing.assert_close(logits, out["logits_fusion"])
    separate = {b: F.cross_entropy(out[f"logits_{b}"], batch["label"]) for b in BRANCHES}
    for branch in BRANCHES:
        torch.testing.assert_close(terms[f"ce_{branch}"], separate[branch])
    torch.testing.assert_close(loss, sum(separate.values()))


def test_concat_ablation_runs_at_demo_scale():
    model = MHDTeacher(4, fusion="concat", **DEMO)
    loss, logits, _ = model.loss(_demo_batch())
    assert logits.shape == (4, 4) and torch.isfinite(loss)


def _planted(n, n_classes, seed):
    """WSI channel ``y`` carries the class (a mean shift); CT is pure noise."""
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % n_classes
    wsi = torch.randn(n, 3, 8, 16, 16, generator=g)
    wsi[torch.arange(n), label] += 1.5
    return {"ct": torch.randn(n, 1, 8, 16, 16, generator=g), "wsi": wsi, "label": label}


def test_learning_signal_from_pathology_only():
    torch.manual_seed(0)
    n_classes = 3
    model = MHDTeacher(n_classes, **DEMO)
    train, test = _planted(24, n_classes, seed=1), _planted(60, n_classes, seed=2)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        optimiser.zero_grad()
        model.loss(train)[0].backward()
        optimiser.step()
    with torch.no_grad():  # batch statistics: the running ones lag after 12 steps
        out = model(test["ct"], test["wsi"])
    accuracy = {
        b: (out[f"logits_{b}"].argmax(1) == test["label"]).float().mean().item() for b in BRANCHES
    }
    assert accuracy["pathology"] > 0.8, accuracy
    assert accuracy["fusion"] > 0.6, accuracy
    assert accuracy["radiology"] < 0.55, accuracy  # chance is 1/3
