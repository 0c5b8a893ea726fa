"""The comparison methods of MHD-Net's Tables III and IV (mmFormer, ModDrop++, SCKD, PCCT):
CT-only testing, modality masking, the dynamic filter scales, SCKD's gradient weight, PCCT's
triplet losses against hand-computed values, a learning signal, and their settings."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from torch.nn import functional as F

from mmdiag.cli_support import default_config_files
from mmdiag.config import load_config, validate_config
from mmdiag.methods.mhd import workflow as mhd_workflow
from mmdiag.methods.mhd.fold import WSI_PARTS, _fold_model
from mmdiag.methods.mhd.settings import build_model, config_problems, model_arguments
from mmdiag.models.mhd import CTResNet, create_frame_resnet, tiny_example
from mmdiag.models.mhd_baselines import (
    MMFormer,
    ModDropPlusPlus,
    PCCTNet,
    SCKDDistiller,
    class_balanced_triplet_loss,
    class_centre_triplet_loss,
    ct_only_code,
    gradient_cosine,
    sckd,
    stage4_size,
)

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (8, 16, 32, 64)
NEW_KINDS = ("mmformer", "moddrop", "sckd", "pcct")


def _batch(n: int = 4, seed: int = 0, frames: int = 8, size: int = 32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "ct": torch.randn(n, 1, frames, size, size, generator=generator),
        "wsi": torch.rand(n, 3, frames, size, size, generator=generator),
        "label": torch.arange(n) % 3,
        "tumour": torch.ones(n, dtype=torch.bool),
    }


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    teacher_arguments, _ = tiny_example()
    return {
        "mmformer": MMFormer(3, frames=8, size=32, widths=WIDTHS, num_heads=2),
        "moddrop": ModDropPlusPlus(3, widths=WIDTHS),
        "sckd": sckd(**teacher_arguments),
        "pcct": PCCTNet(3, widths=WIDTHS),
    }


@pytest.fixture(scope="module")
def models():
    return _models()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state_bytes(model):
    return {k: v.numpy().tobytes() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- every baseline


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_test_time_prediction_reads_ct_alone_and_changes_no_state(models, kind):
    model = models[kind].eval()
    batch = _batch()
    before = _state_bytes(model)
    with torch.no_grad():
        reference = model(batch)
        other_slides = dict(batch, wsi=torch.randn_like(batch["wsi"]) * 5, label=batch["label"] * 0)
        assert reference.shape == (4, 3) and torch.isfinite(reference).all()
        torch.testing.assert_close(model(other_slides), reference, rtol=0, atol=0)
        torch.testing.assert_close(model({"ct": batch["ct"]}), reference, rtol=0, atol=0)
        torch.testing.assert_close(model(batch["ct"]), reference, rtol=0, atol=0)
        assert not torch.allclose(model(dict(batch, ct=batch["ct"] + 1)), reference)
        model.loss(batch)  # a loss evaluated in evaluation mode updates nothing either
    assert _state_bytes(model) == before


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_each_baseline_learns_a_separable_problem(kind):
    """Two classes told apart by the CT intensity: a few steps lower the CT-only loss."""
    torch.manual_seed(0)
    teacher_arguments, _ = tiny_example()
    model = {  # the same tiny networks, SCKD's teacher a ResNet-18 to keep the test short
        "mmformer": lambda: MMFormer(3, frames=8, size=32, widths=WIDTHS, num_heads=2),
        "moddrop": lambda: ModDropPlusPlus(3, widths=WIDTHS),
        "sckd": lambda: sckd(**teacher_arguments, backbone="resnet18"),
        "pcct": lambda: PCCTNet(3, widths=WIDTHS),
    }[kind]().train()
    batch = _batch(n=4, seed=1)
    batch["label"] = torch.tensor([0, 1, 0, 1])
    sign = (2 * batch["label"] - 1).float()[:, None, None, None, None]
    batch["ct"] = batch["ct"] * 0.1 + sign  # the slides are noise: only CT tells the classes
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def ct_only_loss():
        with torch.no_grad():
            return F.cross_entropy(model(batch), batch["label"]).item()

    before = ct_only_loss()
    for _ in range(10):
        optimiser.zero_grad()
        model.loss(batch)[0].backward()
        optimiser.step()
    assert ct_only_loss() < 0.8 * before


# --------------------------------------------------------------------------- mmFormer


def test_mmformer_token_count_is_the_stage_4_map():
    for frames, size in ((8, 32), (24, 224), (10, 48)):
        net = create_frame_resnet("resnet18", in_channels=1, widths=WIDTHS).eval()
        with torch.no_grad():
            shape = net.forward_stages(torch.zeros(1, 1, frames, size, size))[-1].shape
        assert stage4_size(frames, size) == (shape[2], shape[3]) and shape[3] == shape[4]


def test_mmformer_masks_a_missing_modality():
    torch.manual_seed(0)
    model = MMFormer(3, frames=8, size=48, widths=WIDTHS, num_heads=2).train()  # 4 tokens each
    batch = _batch(n=3, size=48)
    changed = torch.randn_like(batch["wsi"])
    both = torch.ones(3, 2, dtype=torch.bool)

    def fused(wsi, code):
        with torch.no_grad():
            return model.forward_features(batch["ct"], wsi, code)["fused"]

    # WSI masked for every sample: its content cannot reach the fused features
    ct_only = ct_only_code(3)
    torch.testing.assert_close(fused(batch["wsi"], ct_only), fused(changed, ct_only))
    torch.testing.assert_close(fused(batch["wsi"], ct_only), fused(None, ct_only))
    # WSI present: it does
    assert not torch.allclose(fused(batch["wsi"], both), fused(changed, both))
    # CT masked: CT content no longer reaches them
    wsi_only = ~ct_only
    with torch.no_grad():
        a = model.forward_features(batch["ct"], batch["wsi"], wsi_only)["fused"]
        b = model.forward_features(batch["ct"] * 3, batch["wsi"], wsi_only)["fused"]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="no wsi was given"):
        model.forward_features(batch["ct"], None, both)


def test_mmformer_draws_every_non_empty_subset_in_training(monkeypatch):
    import mmdiag.models.mhd_baselines as baselines

    drawn = []
    original = baselines.draw_availability

    def spy(n, subsets, device="cpu"):
        code = original(n, subsets, device)
        drawn.append(code)
        return code

    monkeypatch.setattr(baselines, "draw_availability", spy)
    torch.manual_seed(0)
    model = MMFormer(3, frames=8, size=32, widths=WIDTHS, num_heads=2)
    for seed in range(6):
        loss, logits, terms = model.loss(_batch(n=4, seed=seed))
        assert set(terms) == {"ce_fusion", "aux_ct", "aux_wsi"} and logits.shape == (4, 3)
    codes = {tuple(c.tolist()) for c in torch.cat(drawn)}
    assert codes == {(True, False), (False, True), (True, True)}


# --------------------------------------------------------------------------- ModDrop++


def test_moddrop_filter_scales_follow_the_availability_code():
    torch.manual_seed(0)
    model = ModDropPlusPlus(3, widths=WIDTHS).eval()
    codes = torch.tensor([[True, False], [False, True], [True, True]])
    scales = model.dynamic_head.scales(codes)
    assert scales.shape == (3, WIDTHS[0], 4)  # one scale per output and input channel
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(scales[i], scales[j])
    # the per-sample convolution is each sample's own convolution with W ⊙ S
    x = torch.randn(3, 4, 8, 32, 32)
    weight = model.backbone.conv1.weight
    got = model.dynamic_head(x, weight, codes)
    for i in range(3):
        expected = F.conv3d(
            x[i : i + 1],
            weight * scales[i][..., None, None, None],
            stride=model.backbone.conv1.stride,
            padding=model.backbone.conv1.padding,
        )
        torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-4, atol=1e-5)


def test_moddrop_zeroes_a_missing_modality_and_co_trains_both_passes():
    torch.manual_seed(0)
    model = ModDropPlusPlus(3, widths=WIDTHS).eval()
    batch = _batch(n=2)
    code = ct_only_code(2)
    with torch.no_grad():
        with_slides = model.forward_features(batch["ct"], batch["wsi"], code)
        without = model.forward_features(batch["ct"], None, code)
        full = model.forward_features(batch["ct"], batch["wsi"], torch.ones(2, 2, dtype=bool))
    torch.testing.assert_close(with_slides["logits"], without["logits"])
    torch.testing.assert_close(model(batch), without["logits"])
    assert not torch.allclose(full["features"], without["features"])
    loss, logits, terms = model.train().loss(batch)
    assert set(terms) == {"ce_full", "ce_missing", "similarity"} and terms["similarity"] > 0
    expected = terms["ce_full"] + terms["ce_missing"] + 0.2 * terms["similarity"]
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------- SCKD


def test_gradient_cosine_matches_the_gradients_by_hand():
    """For L1 = w·a + v·c and L2 = w·b + v·e the gradients are (a, c) and (b, e)."""
    w = torch.randn(3, requires_grad=True)
    v = torch.randn(2, requires_grad=True)
    a, c = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 0.0])
    b, e = torch.tensor([-2.0, 1.0, 3.0]), torch.tensor([1.0, 4.0])
    first, second = w @ a + v @ c, w @ b + v @ e
    g1, g2 = torch.cat([a, c]), torch.cat([b, e])
    expected = (g1 @ g2) / (g1.norm() * g2.norm())
    torch.testing.assert_close(gradient_cosine(first, second, [w, v]), expected)
    # a parameter one loss does not use counts as a zero gradient
    u = torch.randn(2, requires_grad=True)
    torch.testing.assert_close(gradient_cosine(first, second + 0 * u.sum(), [w, v, u]), expected)


def test_sckd_weights_the_kd_term_by_the_gradient_cosine():
    arguments, batch = tiny_example()
    torch.manual_seed(0)
    model = sckd(**arguments, temperature=2.0).train()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    loss, logits, terms = model.loss(batch)
    # the cosine of the two gradients, each taken on its own
    parameters = [p for p in model.student.parameters() if p.requires_grad]
    student_logits = model.student(batch["ct"])
    with torch.no_grad():
        teacher_logits = model.teacher(batch["ct"], batch["wsi"])["logits_fusion"]
    ce = F.cross_entropy(student_logits, batch["label"])
    kd = F.kl_div(
        F.log_softmax(student_logits / 2, 1), F.softmax(teacher_logits / 2, 1), reduction="sum"
    ) * (4 / len(student_logits))
    g_ce = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(ce, parameters, retain_graph=True)]
    )
    g_kd = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kd, parameters)])
    cosine = (g_ce @ g_kd) / (g_ce.norm() * g_kd.norm())
    torch.testing.assert_close(terms["gradient_cosine"], cosine, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["kd"], kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ce + cosine.clamp_min(0) * kd, rtol=1e-5, atol=1e-6)
    # the weight is a constant of the step: the total gradient is g_ce + w * g_kd
    loss.backward()
    total = torch.cat([p.grad.reshape(-1) for p in parameters])
    torch.testing.assert_close(total, g_ce + cosine.clamp_min(0) * g_kd, rtol=1e-4, atol=1e-6)
    # the teacher is frozen: no gradient, evaluation mode, unchanged
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not model.teacher.training
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())
    assert isinstance(model.deploy(), CTResNet) and model.deploy() is model.student


def test_sckd_drops_a_conflicting_kd_term_unless_told_to_keep_it(monkeypatch):
    import mmdiag.models.mhd_baselines as baselines

    monkeypatch.setattr(baselines, "gradient_cosine", lambda *args: torch.tensor(-0.5))
    arguments, batch = tiny_example()
    torch.manual_seed(0)
    model = sckd(**arguments)
    loss, _, terms = model.loss(batch)
    torch.testing.assert_close(loss, terms["ce"])  # conflicting gradients: no distillation
    model.clip_negative = False
    loss, _, terms = model.loss(batch)
    torch.testing.assert_close(loss, terms["ce"] - 0.5 * terms["kd"])


# --------------------------------------------------------------------------- PCCT


def test_class_balanced_triplet_loss_known_value():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    r2 = math.sqrt(2)
    # class 0: anchor 0 -> (0.5 + 0) / 2, anchor 1 -> (1.5 - √2 + 0) / 2; class 1: anchor 2 ->
    # (1.5 + 2.5 - √2) / 2, anchor 3 -> 0; the mean of the two class means
    class_0 = (0.25 + (1.5 - r2) / 2) / 2
    class_1 = ((4 - r2) / 2 + 0) / 2
    got = class_balanced_triplet_loss(z, labels, margin=0.5)
    assert got.item() == pytest.approx((class_0 + class_1) / 2, abs=1e-6)
    # a slow reference on random embeddings: every triplet, averaged per anchor and class
    generator = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(9, 4, generator=generator), dim=1)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2])
    class_means = []
    for c in range(3):
        anchors = []
        for a in (labels == c).nonzero().flatten().tolist():
            values = [
                max(0.0, (z[a] - z[p]).norm().item() - (z[a] - z[n]).norm().item() + 0.3)
                for p in range(9)
                if labels[p] == c and p != a
                for n in range(9)
                if labels[n] != c
            ]
            anchors.append(sum(values) / len(values))
        class_means.append(sum(anchors) / len(anchors))
    got = class_balanced_triplet_loss(z, labels, margin=0.3)
    assert got.item() == pytest.approx(sum(class_means) / 3, abs=1e-5)
    # no anchor with a positive and a negative: zero, with a gradient
    single = torch.randn(3, 2, requires_grad=True)
    loss = class_balanced_triplet_loss(single, torch.tensor([0, 1, 2]), margin=0.5)
    assert loss.item() == 0.0 and loss.requires_grad


def test_class_centre_triplet_loss_known_value():
    z = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    centres = torch.tensor([[0.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    seen = torch.tensor([True, True, False])  # class 2 has no centre yet: not a negative
    # anchor 0 (class 0): max(0, 1 - 1 + 0.5); anchor 1 (class 1): max(0, √5 - 1 + 0.5)
    got = class_centre_triplet_loss(z, torch.tensor([0, 1]), centres, seen, margin=0.5)
    assert got.item() == pytest.approx((0.5 + math.sqrt(5) - 0.5) / 2, abs=1e-6)


def test_pcct_switches_stage_after_its_fraction_of_the_steps():
    torch.manual_seed(0)
    model = PCCTNet(3, widths=WIDTHS, stage_one_fraction=0.5)
    model.set_total_steps(4)
    batch = _batch(n=6)
    stages = []
    for _ in range(4):
        stages.append(model.stage)
        model.train().loss(batch)
    assert stages == [1, 1, 2, 2] and int(model.step) == 4
    assert model.centre_seen.all()
    # the centres are each class's moving mean of the normalised embeddings
    with torch.no_grad():
        embedding = model.forward_features(batch["ct"])["embedding"]
    before = model.centres.clone()
    model.update_centres(embedding, batch["label"])
    for c in range(3):
        mean = embedding[batch["label"] == c].mean(0)
        torch.testing.assert_close(model.centres[c], 0.9 * before[c] + 0.1 * mean)


# --------------------------------------------------------------------------- settings


def _config() -> dict:
    config = load_config(default_config_files(ROOT))
    variants = config["methods"]["mhd"]["variants"]
    variants["mmformer"] = {"model": "mmformer", "options": {"num_heads": 2}}
    variants["moddrop"] = {"model": "moddrop", "options": {}}
    variants["sckd"] = {"model": "sckd", "teacher": "teacher", "options": {"alpha_kd": 0.5}}
    variants["pcct"] = {"model": "pcct", "options": {"margin": 0.2}}
    return validate_config(config)


def test_each_kind_is_built_from_the_method_settings():
    settings = _config()["methods"]["mhd"]
    expected = {"mmformer": MMFormer, "moddrop": ModDropPlusPlus, "sckd": SCKDDistiller}
    expected["pcct"] = PCCTNet
    for kind, cls in expected.items():
        assert isinstance(build_model(settings, kind, 8), cls)
    assert model_arguments(settings, "mmformer", 8) == {
        "n_classes": 8,
        "widths": [8, 16, 32, 64],
        "frames": 8,
        "size": 32,
        "num_heads": 2,
    }
    # sckd is built around its teacher's network, like a student
    arguments = model_arguments(settings, "sckd", 8)
    teacher = model_arguments(settings, "teacher", 8)
    assert arguments == teacher | {"student_widths": None, "alpha_kd": 0.5}
    assert build_model(settings, "pcct", 8).margin == 0.2
    assert list(config_problems("mhd", settings, _config())) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v["sckd"].update(teacher=None), r"sckd.teacher: None is not a teacher variant"),
        (lambda v: v["sckd"].update(teacher="mhd_net"), "is not a teacher variant"),
        (lambda v: v["pcct"].update(teacher="teacher"), "only a student or an sckd"),
        (lambda v: v["moddrop"]["options"].update(memory=True), r"\['memory'\] are not options"),
        (lambda v: v["mmformer"]["options"].update(num_heads=3), "3 heads do not divide"),
        (lambda v: v["sckd"]["options"].update(margin=0.1), r"\['margin'\] are not options"),
    ],
)
def test_baseline_config_problems_name_the_key(change, message):
    config = _config()
    settings = config["methods"]["mhd"]
    change(settings["variants"])
    problems = list(config_problems("mhd", settings, config))
    assert any(re.search(message, p) for p in problems), problems


def test_every_kind_has_a_constructor_a_schema_entry_and_its_slides():
    import yaml

    from mmdiag.methods.mhd.kinds import KINDS
    from mmdiag.methods.mhd.settings import CONSTRUCTORS

    schema = yaml.safe_load((ROOT / "config/schema.yaml").read_text())
    variant = schema["$defs"]["mhd"]["properties"]["variants"]["additionalProperties"]
    assert tuple(variant["properties"]["model"]["enum"]) == KINDS
    assert tuple(CONSTRUCTORS) == tuple(WSI_PARTS) == KINDS


def test_slides_and_teacher_checkpoints_per_kind():
    config = _config()
    assert WSI_PARTS["mmformer"] == WSI_PARTS["moddrop"] == WSI_PARTS["sckd"] == ("train",)
    assert WSI_PARTS["pcct"] == ()
    reads = {v: mhd_workflow.reads_slides(config, "mhd", v) for v in NEW_KINDS}
    assert reads == {"mmformer": True, "moddrop": True, "sckd": True, "pcct": False}
    inputs = mhd_workflow.fold_inputs(config, "mhd", "sckd", "0")
    assert inputs["teacher"] == "results/mhd/teacher/fold_0/model.safetensors"
    assert "teacher" not in mhd_workflow.fold_inputs(config, "mhd", "mmformer", "0")


def test_sckd_fold_model_loads_and_freezes_the_teachers_checkpoint(tmp_path):
    settings = _config()["methods"]["mhd"]
    torch.manual_seed(1)
    trained = build_model(settings, "teacher", 8)
    save_model(trained, str(tmp_path / "model.safetensors"))
    model = _fold_model(settings, "sckd", 8, tmp_path / "model.safetensors")
    for key, value in trained.teacher.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[key], value)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
