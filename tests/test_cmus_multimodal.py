"""The multi-modal rows of CMUS-Net Tables 4 and 6: mmFormer, MSAN and AGGN on OM, IM and a
TEM bag (mmdiag.models.mmformer, .msan, .aggn), at tiny sizes."""

import pytest
import torch
from torch.nn import functional as F

from mmdiag.models import create_model, registered_model
from mmdiag.models.mmformer import draw_availability, non_empty_subsets

MODELS = ("cmus_mmformer", "cmus_msan", "cmus_aggn")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(n_patients=2, tem_counts=(2, 3), size=32, seed=0, labels=None):
    generator = torch.Generator().manual_seed(seed)
    return {
        "om": torch.randn(n_patients, 3, size, size, generator=generator),
        "im": torch.randn(n_patients, 3, size, size, generator=generator),
        "tem": torch.randn(sum(tem_counts), 3, size, size, generator=generator),
        "tem_patient": torch.repeat_interleave(torch.arange(n_patients), torch.tensor(tem_counts)),
        "label": torch.arange(n_patients) % 3 if labels is None else labels,
    }


def _model(name, **overrides):
    arguments, _ = registered_model(name).example()
    torch.manual_seed(0)
    return create_model(name, **(arguments | overrides))


def _evaluated(name, **overrides):
    """A fresh model in evaluation mode whose batch norms hold the statistics of a few random
    batches (at initialisation they would pass the deep, untrained maps through unscaled)."""
    model = _model(name, **overrides)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average of the batches seen
    with torch.no_grad():
        for seed in range(3):
            model(_batch(seed=10 + seed))
    return model.eval()


def _shifted(batch, key, patients=None, by=2.0):
    """``batch`` with modality ``key``'s images shifted (for the TEM bag: those of ``patients``)."""
    changed = dict(batch, **{key: batch[key].clone()})
    if key == "tem" and patients is not None:
        rows = torch.isin(batch["tem_patient"], torch.tensor(patients))
        changed["tem"][rows] += by
    elif patients is not None:
        changed[key][patients] += by
    else:
        changed[key] += by
    return changed


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_every_modality_reaches_the_logits(name):
    model = _evaluated(name)
    batch = _batch()
    with torch.no_grad():
        logits = model(batch)
        assert logits.shape == (2, 3) and torch.isfinite(logits).all()
        for key in ("om", "im", "tem"):
            assert not torch.allclose(model(_shifted(batch, key)), logits, atol=1e-6), key


@pytest.mark.parametrize("name", MODELS)
def test_each_patient_sees_only_its_own_tem_images(name):
    model = _evaluated(name)
    batch = _batch()
    with torch.no_grad():
        before, after = model(batch), model(_shifted(batch, "tem", patients=[1]))
    torch.testing.assert_close(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


@pytest.mark.parametrize("modalities", [("OM",), ("IM", "TEM"), ("OM", "IM", "TEM")])
@pytest.mark.parametrize("name", MODELS)
def test_modality_subsets_build_and_train(name, modalities):
    model = _model(name, modalities=modalities)
    batch = _batch()
    loss = (
        model.loss(batch)[0]
        if hasattr(model, "loss")
        else F.cross_entropy(model(batch), batch["label"])
    )
    loss.backward()
    assert set(model.encoders) == set(modalities) and torch.isfinite(loss)


# --------------------------------------------------------------------------- mmFormer


def test_mmformer_masking_removes_a_modality():
    model = _evaluated("cmus_mmformer")
    batch = _batch()
    # patient 0 lacks OM, patient 1 lacks TEM (the order is OM, IM, TEM)
    available = torch.tensor([[False, True, True], [True, True, False]])
    with torch.no_grad():
        fused = model.forward_features(batch, available)["fused"]
        masked_om = model.forward_features(_shifted(batch, "om", patients=[0]), available)
        masked_tem = model.forward_features(_shifted(batch, "tem", patients=[1]), available)
        torch.testing.assert_close(masked_om["fused"], fused)
        torch.testing.assert_close(masked_tem["fused"], fused)
        # the same changes reach the patients that have the modality
        seen_om = model.forward_features(_shifted(batch, "om", patients=[1]), available)
        seen_tem = model.forward_features(_shifted(batch, "tem", patients=[0]), available)
    assert not torch.allclose(seen_om["fused"][1], fused[1])
    assert not torch.allclose(seen_tem["fused"][0], fused[0])
    torch.testing.assert_close(seen_om["fused"][0], fused[0])  # no leak across patients


def test_mmformer_trains_under_every_non_empty_mask(monkeypatch):
    import mmdiag.models.mmformer as mmformer

    assert non_empty_subsets(3) == (
        (False, False, True), (False, True, False), (False, True, True), (True, False, False),
        (True, False, True), (True, True, False), (True, True, True),
    )  # fmt: skip
    drawn = []

    def spy(n, subsets, device="cpu"):
        drawn.append(draw_availability(n, subsets, device))
        return drawn[-1]

    monkeypatch.setattr(mmformer, "draw_availability", spy)
    model = _model("cmus_mmformer")
    torch.manual_seed(0)
    for seed in range(8):
        loss, logits, terms = model.loss(_batch(n_patients=3, tem_counts=(1, 1, 2), seed=seed))
        assert set(terms) == {"ce_fusion", "aux_OM", "aux_IM", "aux_TEM"} and torch.isfinite(loss)
    codes = {tuple(code.tolist()) for code in torch.cat(drawn)}
    assert len(codes) >= 5 and (False, False, False) not in codes
    model.eval()  # evaluation: every modality present, no draw
    model.loss(_batch())
    assert len(drawn) == 8


def test_mmformer_resamples_its_positions_for_another_input_size():
    model = _evaluated("cmus_mmformer", image_size_px=64)  # a 2 x 2 grid learnt
    with torch.no_grad():
        assert model(_batch(size=32)).shape == (2, 3)  # a 1 x 1 grid given
    assert model.encoders["OM"].position.shape[1] == 4


# --------------------------------------------------------------------------- MSAN, AGGN


def test_msan_attends_at_every_scale():
    model = _evaluated("cmus_msan")
    batch = _batch()
    attention = model.encoders["OM"].attention
    assert len(attention) == 4  # after each of the four stages (strides 4 to 32)
    with torch.no_grad():
        logits = model(batch)
        for name, module in attention.items():
            gamma = module.gamma.clone()
            module.gamma.zero_()  # this scale's attention off
            assert not torch.allclose(model(batch), logits, atol=1e-6), name
            module.gamma.copy_(gamma)


def test_msan_starts_as_its_backbone_with_gamma_zero():
    model = _evaluated("cmus_msan", gamma_init=0.0)
    subnet = model.encoders["IM"]
    images = _batch()["im"]
    with torch.no_grad():
        plain = subnet.encoder(images)[-1].mean(dim=(2, 3))
        torch.testing.assert_close(subnet(images), plain)


def _gradient_reaches(module: torch.nn.Module) -> bool:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return bool(grads) and any(g.abs().sum() > 0 for g in grads)


def test_aggn_multi_scale_parts_all_reach_the_output():
    model = _model("cmus_aggn")
    batch = _batch()
    model(batch).sum().backward()
    branch = model.encoders["TEM"]
    parts = {
        f"multi-branch conv {i} branch {j}": b
        for i in (1, 3)
        for j, b in enumerate(branch.multi_branch[i].branches)
    }
    pooling = branch.pool
    parts |= {
        "pooling deep": pooling.deep,
        "pooling grid": pooling.grid,
        "pooling plain": pooling.plain,
    }
    for s, fusion in enumerate(model.stage_fusion):
        parts |= {f"stage {s} attention": fusion.attention, f"stage {s} merge": fusion.merge}
        parts |= {f"stage {s} fusion branch {j}": b for j, b in enumerate(fusion.branches)}
    parts["vector fusion"] = model.vector_fusion
    for name, part in parts.items():
        assert _gradient_reaches(part), name


def test_aggn_every_stage_fusion_reaches_the_logits():
    model = _evaluated("cmus_aggn")
    batch = _batch()
    with torch.no_grad():
        logits = model(batch)
        for s, fusion in enumerate(model.stage_fusion):
            handle = fusion.register_forward_hook(lambda module, inputs, output: output * 0)
            assert not torch.allclose(model(batch), logits, atol=1e-6), s
            handle.remove()


def test_aggn_fusion_mixes_the_modalities_at_each_stage():
    model = _evaluated("cmus_aggn")
    batch = _batch()
    with torch.no_grad():
        before = model.forward_features(batch)
        after = model.forward_features(_shifted(batch, "im"))
    for s in range(3):  # a change of IM alone changes every stage's fused feature
        assert not torch.allclose(before[f"stage_{s}"], after[f"stage_{s}"], atol=1e-6), s
    torch.testing.assert_close(before["OM"], after["OM"])  # the OM branch is its own


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("name", MODELS)
def test_learns_a_tiny_separable_problem(name):
    model = _model(name, dropout=0.0)
    labels = torch.tensor([0, 1, 0, 1])
    batch = _batch(n_patients=4, tem_counts=(1, 1, 1, 1), labels=labels)
    sign = (labels * 2.0 - 1.0)[:, None, None, None]
    for key in ("om", "im", "tem"):  # every modality carries the class as a brightness shift
        batch[key] = 0.2 * batch[key] + sign
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = (
            model.loss(batch)[0]
            if hasattr(model, "loss")
            else F.cross_entropy(model(batch), labels)
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


# --------------------------------------------------------------------------- paper config


def test_paper_rows_build_as_configured():
    import inspect
    from pathlib import Path

    from mmdiag.config import load_config
    from mmdiag.models.aggn import CMUSAGGN
    from mmdiag.models.mmformer import CMUSMMFormer
    from mmdiag.models.msan import CMUSMSAN

    root = Path(__file__).resolve().parents[1]
    demo = [root / "config/config.yaml", *sorted((root / "config/methods").glob("*.yaml"))]
    config = load_config([*demo, root / "config/paper/cmus.yaml"])
    disease, staging = (config["methods"][m] for m in ("cmus", "cmus_staging"))
    # Table 4 and the multi-modal rows of Table 6, in the paper's order
    assert disease["tables"]["table4"]["rows"] == [
        "mmgl", "mmformer", "mdl_iia", "msan", "aggn", "cmus_net",
    ]  # fmt: skip
    rows6 = staging["tables"]["table6"]["rows"]
    assert rows6[-6:] == ["mmgl", "mmformer", "mdl_iia", "msan", "aggn", "cmus_net"]
    classes = {"mmformer": CMUSMMFormer, "msan": CMUSMSAN, "aggn": CMUSAGGN}
    for row, cls in classes.items():
        spec = disease["variants"][row]
        assert staging["variants"][row] == spec, row  # Table 6 trains the same models
        accepted = inspect.signature(cls.__init__).parameters
        arguments = {k: v for k, v in spec.items() if k in accepted and k != "num_classes"}
        model = create_model(spec["model"], num_classes=3, **arguments)
        assert isinstance(model, cls), row
    mmformer = disease["variants"]["mmformer"]
    assert (mmformer["encoder"], mmformer["num_heads"]) == ("resnet18", 8)  # mmFormer: 8 heads
    assert disease["variants"]["msan"]["loss_weights"] == {"OM": 0.3, "IM": 0.5, "TEM": 0.2}
    aggn = disease["variants"]["aggn"]
    assert (aggn["encoder"], aggn["dropout"]) == ("aggn", 0.4)  # AGGN's own branch, dropout
