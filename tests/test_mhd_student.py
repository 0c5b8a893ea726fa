"""MHD-Net's student and distillation: the CT-only deployed model, eqs. 10 and 12-14 against
explicit computations, which parts train, demo-scale shapes, and a learning signal of eq. 13."""

from __future__ import annotations

import copy
import inspect
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdiag.models.mhd import (
    BRANCHES,
    MHDDeployed,
    MHDDistiller,
    MHDStudent,
    MHDTeacher,
    MHDTeacherWithMemory,
    logit_distillation_loss,
    memory_item_dim,
)
from mmdiag.models.type_memory import TypeMemory

FRAMES, WIDTHS, KAPPAS = 8, (8, 16, 32, 64), (3, 3, 3)
DEMO = {"frames": FRAMES, "widths": WIDTHS, "kernel_sizes": KAPPAS, "gate_kernel": 3}
CAPACITIES = (16, 16, 4)  # stage 1 read on a 4 x 4 grid upsampled to 8 x 8 (Table V's scheme)


def _memory(n_classes: int, seed: int = 0, capacities=CAPACITIES) -> TypeMemory:
    dim = memory_item_dim(FRAMES, WIDTHS)
    return TypeMemory(dim, capacities, num_types=n_classes, seed=seed)


def _distiller(n_classes=4, seed=0, **kwargs) -> MHDDistiller:
    torch.manual_seed(seed)
    teacher = MHDTeacher(n_classes, backbone="resnet18", **DEMO)
    student = MHDStudent(n_classes, **DEMO)
    return MHDDistiller(teacher, _memory(n_classes, seed), student, **kwargs)


def _batch(n=4, n_classes=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "ct": torch.randn(n, 1, FRAMES, size, size, generator=g),
        "wsi": torch.randn(n, 3, FRAMES, size, size, generator=g),
        "label": torch.arange(n) % n_classes,
        "tumour": torch.ones(n, dtype=torch.bool),
    }


def _buffers(module: nn.Module) -> dict[str, bytes]:
    return {name: b.numpy().tobytes() for name, b in module.named_buffers()}


# --------------------------------------------------------------------------- deployed model


def test_deployed_forward_takes_ct_only_and_changes_no_buffer():
    distiller = _distiller()
    deployed = distiller.deploy()
    assert isinstance(deployed, MHDDeployed)
    assert list(inspect.signature(deployed.forward).parameters) == ["inputs"]
    batch = _batch()
    with pytest.raises(TypeError):
        deployed(batch["ct"], batch["wsi"])
    deployed.eval()
    before = _buffers(deployed)
    with torch.no_grad():
        logits = deployed(batch["ct"])
        # a batch is read for its CT only
        torch.testing.assert_close(deployed(batch), logits, rtol=0, atol=0)
    assert _buffers(deployed) == before
    assert logits.shape == (4, 4)
    # in training mode the frozen teacher B_R and memory still stay put (only the student moves)
    deployed.train()
    frozen = {**_buffers(deployed.radiology), **_buffers(deployed.memory)}
    with torch.no_grad():
        deployed(batch["ct"])
    assert {**_buffers(deployed.radiology), **_buffers(deployed.memory)} == frozen
    assert not deployed.radiology.training and not deployed.memory.training


def test_predictions_ignore_labels_and_wsi():
    distiller = _distiller().eval()
    batch = _batch()
    other = dict(batch, wsi=torch.randn_like(batch["wsi"]), label=batch["label"].flip(0))
    with torch.no_grad():
        reference = distiller.deploy()(batch["ct"])
        torch.testing.assert_close(distiller(batch), reference, rtol=0, atol=0)
        torch.testing.assert_close(distiller(other), reference, rtol=0, atol=0)
        torch.testing.assert_close(distiller({"ct": batch["ct"]}), reference, rtol=0, atol=0)
        # the CT does matter
        assert not torch.allclose(distiller(batch["ct"] + 1.0), reference)


def test_memory_maps_follow_teacher_radiology_softmax():
    distiller = _distiller().eval()
    ct = _batch()["ct"]
    with torch.no_grad():
        out = distiller.deploy().forward_features(ct)
        expected = torch.softmax(
            distiller.teacher(ct, torch.zeros(4, 3, 8, 32, 32))["logits_radiology"], dim=1
        )
    torch.testing.assert_close(out["type_weights"], expected)
    # eq. 11 with other banks changes the student's prediction: the memory is used
    with torch.no_grad():
        for bank in distiller.memory.stages:
            bank.items.mul_(-1.0)
        assert not torch.allclose(distiller(ct), out["logits"])


# --------------------------------------------------------------------------- eqs. 12-14


@pytest.mark.parametrize("temperature, scale", [(1.0, True), (20.0, True), (20.0, False)])
def test_distillation_terms_match_explicit_computation(temperature, scale):
    distiller = _distiller(temperature=temperature, scale_kl_by_t2=scale)
    distiller.train()
    batch = _batch()
    loss, logits, terms = distiller.student_loss(batch)
    with torch.no_grad():
        teacher = distiller.teacher(batch["ct"], batch["wsi"])
        student = distiller.forward_student(batch["ct"])
    torch.testing.assert_close(logits, student["logits"])
    mse = 0.0
    for f_t, f_s, con in zip(
        teacher["features_fusion"],
        student["features_fusion"],
        distiller.student.compress,
        strict=True,
    ):
        mse = mse + ((f_t - con(f_s)) ** 2).sum() / f_t.numel()  # eq. 12, mean of squares
    # in float64: at T = 20 the two distributions are close to uniform and float32 cancels
    p_t = torch.softmax(teacher["logits_fusion"].double() / temperature, dim=1)
    p_s = torch.softmax(student["logits"].double() / temperature, dim=1)
    kl = (p_t * (p_t.log() - p_s.log())).sum() / len(p_t)  # eq. 13
    kl = kl * temperature**2 if scale else kl
    ce = -torch.log_softmax(student["logits"], dim=1)[torch.arange(4), batch["label"]].mean()
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(terms["kl"].double(), kl, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(terms["ce"], ce)
    weighted = terms["ce"] + 0.1 * terms["mse"] + 0.5 * terms["kl"]
    torch.testing.assert_close(loss, weighted, rtol=0, atol=0)  # eq. 14
    torch.testing.assert_close(loss.double(), ce + 0.1 * mse + 0.5 * kl, rtol=1e-4, atol=1e-6)
    assert terms["mse"] > 0 and terms["kl"] > 0


def test_eq14_weights_are_arguments():
    batch = _batch()
    _, _, terms = _distiller().student_loss(batch)
    loss, _, _ = _distiller(alpha_mse=0.7, alpha_kl=2.0).student_loss(batch)
    torch.testing.assert_close(loss, terms["ce"] + 0.7 * terms["mse"] + 2.0 * terms["kl"])


def test_kl_is_zero_for_equal_logits_and_scales_with_t2():
    logits = torch.randn(5, 3)
    torch.testing.assert_close(logit_distillation_loss(logits, logits), torch.tensor(0.0))
    other = torch.randn(5, 3)
    plain = logit_distillation_loss(logits, other, temperature=4.0, scale_by_t2=False)
    scaled = logit_distillation_loss(logits, other, temperature=4.0)
    torch.testing.assert_close(scaled, 16.0 * plain)


# --------------------------------------------------------------------------- gradients, shapes


def test_only_the_student_trains_at_demo_scale():
    distiller = _distiller()
    distiller.train()
    batch = _batch()
    start = time.perf_counter()
    loss, logits, _ = distiller.student_loss(batch)
    loss.backward()
    elapsed = time.perf_counter() - start
    assert logits.shape == (4, 4)
    student = dict(distiller.student.named_parameters())
    missing = [n for n, p in student.items() if p.grad is None or not p.grad.any()]
    assert missing == []
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert all(not b.requires_grad for b in distiller.memory.buffers())
    trainable = {id(p) for p in distiller.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in student.values()}
    assert not distiller.teacher.training and distiller.student.training
    assert elapsed < 5.0, elapsed


def test_student_stage_shapes_at_demo_scale():
    distiller = _distiller().eval()
    with torch.no_grad():
        out = distiller.forward_student(_batch()["ct"])
    demo = [(8, 4, 8, 8), (16, 2, 4, 4), (32, 1, 2, 2)]
    assert [tuple(f.shape[1:]) for f in out["features_fusion"]] == demo
    assert out["logits"].shape == (4, 4)
    assert memory_item_dim(FRAMES, WIDTHS) == 32
    with pytest.raises(ValueError, match="c_s"):
        memory_item_dim(8, (8, 8, 32, 64))


def test_fused_features_enter_the_next_stage_as_a_residual():
    distiller = _distiller().eval()
    ct, student = _batch()["ct"], distiller.student
    with torch.no_grad():
        plain = student.head(student.backbone(ct))  # the ResNet-18 without any fusion
        assert not torch.allclose(distiller(ct), plain)
        for shfm in student.fuse:  # f_F'^s = 0: stage s + 1 reads f_R'^s alone
            shfm.project.weight.zero_()
            shfm.project.bias.zero_()
        torch.testing.assert_close(distiller(ct), plain)


# --------------------------------------------------------------------------- learning signal


def _planted(n, n_classes, seed):
    """CT and WSI both carry the class as a mean shift; the teacher learns it quickly."""
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % n_classes
    shift = (label.float() - (n_classes - 1) / 2)[:, None, None, None, None]
    wsi = torch.randn(n, 3, FRAMES, 16, 16, generator=g)
    wsi[torch.arange(n), label] += 1.5
    ct = torch.randn(n, 1, FRAMES, 16, 16, generator=g) + shift
    return {"ct": ct, "wsi": wsi, "label": label, "tumour": torch.ones(n, dtype=torch.bool)}


def _settle_batch_norm(module: nn.Module, run) -> None:
    """Running statistics = the exact batch statistics of ``run()``'s data (cumulative)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        run()


def _agreement(distiller, teacher_logits, ct):
    with torch.no_grad():
        return (distiller(ct).argmax(1) == teacher_logits.argmax(1)).float().mean().item()


def test_kl_term_pulls_the_student_towards_the_teacher():
    torch.manual_seed(0)
    n_classes = 3
    train, test = _planted(24, n_classes, seed=1), _planted(48, n_classes, seed=2)
    teacher = MHDTeacher(n_classes, backbone="resnet18", **DEMO)
    optimiser = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(10):
        optimiser.zero_grad()
        teacher.loss(train)[0].backward()
        optimiser.step()
    teacher.train()
    _settle_batch_norm(teacher, lambda: teacher(train["ct"], train["wsi"]))
    student = MHDStudent(n_classes, **DEMO)  # 16² input: stage maps 4², 2², 1²
    distiller = MHDDistiller(teacher, _memory(n_classes, capacities=(16, 4, 1)), student)
    with torch.no_grad():
        teacher_test = teacher(test["ct"], test["wsi"])["logits_fusion"]
    assert (teacher_test.argmax(1) == test["label"]).float().mean() > 0.8
    distiller.eval()
    before = _agreement(distiller, teacher_test, test["ct"])
    distiller.train()
    optimiser = torch.optim.Adam(distiller.student.parameters(), lr=3e-3)
    for _ in range(12):  # the KL term alone: no labels, no features
        optimiser.zero_grad()
        distiller.student_loss(train)[2]["kl"].backward()
        optimiser.step()
    _settle_batch_norm(distiller.student, lambda: distiller(train["ct"]))
    distiller.eval()
    after = _agreement(distiller, teacher_test, test["ct"])
    assert after > 0.8 and after > before + 0.2, (before, after)


# --------------------------------------------------------------------------- eq. 10


def test_teacher_with_memory_is_eq4_plus_conmb_and_updates_tumour_banks_only():
    torch.manual_seed(0)
    model = MHDTeacherWithMemory(MHDTeacher(4, backbone="resnet18", **DEMO), _memory(4))
    model.train()
    batch = dict(_batch(), tumour=torch.tensor([True, False, True, False]))
    reference = copy.deepcopy(model)
    before = [bank.items.clone() for bank in model.memory.stages]
    loss, logits, terms = model.loss(batch)
    out = reference.teacher(batch["ct"], batch["wsi"])
    reference.memory.update(out["features_pathology"], batch["label"], batch["tumour"])
    conmb = reference.memory.conmb_loss(out["features_pathology"])
    eq4 = sum(F.cross_entropy(out[f"logits_{b}"], batch["label"]) for b in BRANCHES)
    torch.testing.assert_close(terms["conmb"], conmb)
    torch.testing.assert_close(loss, eq4 + 0.3 * conmb)  # eq. 10
    torch.testing.assert_close(logits, out["logits_fusion"])
    for bank, old, ref in zip(model.memory.stages, before, reference.memory.stages, strict=True):
        torch.testing.assert_close(bank.items, ref.items, rtol=0, atol=0)  # pathology features
        changed = (bank.items != old).flatten(1).any(1).tolist()
        assert changed == [True, False, True, False]  # labels 0..3, tumour at 0 and 2
    pathology = list(model.teacher.pathology.parameters())
    conmb_grads = torch.autograd.grad(terms["conmb"], pathology, allow_unused=True)
    assert any(g is not None and g.any() for g in conmb_grads)  # ConMB trains B_P


def test_teacher_with_memory_leaves_banks_alone_in_eval_and_without_tumours():
    torch.manual_seed(0)
    model = MHDTeacherWithMemory(MHDTeacher(4, backbone="resnet18", **DEMO), _memory(4))
    before = _buffers(model.memory)
    model.train()
    model.loss(dict(_batch(), tumour=torch.zeros(4, dtype=torch.bool)))
    assert _buffers(model.memory) == before
    model.eval()
    with torch.no_grad():
        _, _, terms = model.loss(_batch())
    assert _buffers(model.memory) == before and terms["conmb"] > 0
    with pytest.raises(ValueError, match="tumour"):
        model.loss({k: v for k, v in _batch().items() if k != "tumour"})
