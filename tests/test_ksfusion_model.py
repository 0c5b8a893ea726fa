"""KS-Fusion (Zhang et al., MICCAI 2024): deformable sampling, attention, Ge-Con, CG-Coord,
the losses of eqs. 6-8 and a short learning signal."""

import math

import pytest
import torch
from torch.nn import functional as F

from mmdiag.models import create_model
from mmdiag.models.ksfusion import (
    SUBSPACES,
    GradientCoordination,
    KSFusion,
    batch_gram,
    branch_confidences,
    coordinate_gradient,
    deformable_sample,
    explicit_attention,
    fused_attention,
    gecon_loss,
    reference_points,
)
from mmdiag.training.survival import nll_survival_loss

GROUPS = {"tumour": [0, 1, 2, 3, 4], "microenvironment": [5, 6, 7, 8, 9, 10, 11]}
TINY = {
    "heads": 2,
    "head_dim": 4,
    "offset_groups": 2,
    "offset_kernel": 3,
    "gene_hidden": (8,),
    "gene_dim": 8,
    "embed_dim": 8,
}


def _model(task="classification", n_outputs=3, grid_size=(4, 4), **kwargs) -> KSFusion:
    torch.manual_seed(0)
    options = TINY | kwargs
    return KSFusion(8, 12, GROUPS, n_outputs, task=task, grid_size=grid_size, **options)


def _batch(batch_size=4, height=4, width=4, seed=0, n_outputs=3):
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch_size, 1, height, width, generator=generator) > 0.25).float()
    mask[:, :, 0, 0] = 1.0
    grid = torch.randn(batch_size, 8, height, width, generator=generator) * mask
    return {
        "patches": grid.flatten(2).transpose(1, 2),
        "grid": grid,
        "grid_mask": mask,
        "genes": torch.randn(batch_size, 12, generator=generator),
        "label": torch.randint(n_outputs, (batch_size,), generator=generator),
        "event": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0][:batch_size]),
        "time": torch.tensor([3.0, 5.0, 1.0, 2.0, 4.0, 6.0, 0.5, 7.0][:batch_size]),
    }


# --------------------------------------------------------------------------- sampling


def _bilinear_by_hand(features, x, y):
    """torch's align_corners=False bilinear read of (C, H, W) at normalised (x, y), zero outside."""
    _, height, width = features.shape
    px, py = ((x + 1) * width - 1) / 2, ((y + 1) * height - 1) / 2
    x0, y0 = math.floor(px), math.floor(py)
    value = torch.zeros(features.shape[0], dtype=features.dtype)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
        if 0 <= xi < width and 0 <= yi < height:
            value += weight * features[:, yi, xi]
    return value


def test_deformable_sampling_matches_a_hand_bilinear_read_per_group():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 6, 5, 7, generator=generator, dtype=torch.float64)
    points = torch.rand(2, 3, 9, 2, generator=generator, dtype=torch.float64) * 2.4 - 1.2
    sampled = deformable_sample(features, points)  # (B, P, D)
    assert sampled.shape == (2, 9, 6)
    for b in range(2):
        for group in range(3):
            channels = slice(2 * group, 2 * group + 2)  # group j reads its own channel block
            for n in range(9):
                x, y = points[b, group, n].tolist()
                expected = _bilinear_by_hand(features[b, channels], x, y)
                torch.testing.assert_close(sampled[b, n, channels], expected)


def test_reference_points_read_the_cells_themselves():
    features = torch.randn(2, 4, 3, 5)
    points = reference_points(3, 5).expand(2, 2, -1, -1)
    sampled = deformable_sample(features, points)
    torch.testing.assert_close(sampled, features.flatten(2).transpose(1, 2))


def test_offsets_are_bounded_by_the_scale_in_reference_cells():
    model = _model(grid_size=(3, 5), offset_scale=1.5)
    stream = model.streams["tumour"]
    with torch.no_grad():
        stream.offsets.pointwise.weight.mul_(1e3)  # saturate tanh
    out = stream(_batch()["grid"], _batch()["grid_mask"], torch.randn(4, 5))
    offsets = out["points"] - reference_points(3, 5)
    assert out["points"].shape == (4, 2, 15, 2)
    assert offsets[..., 0].abs().max() <= 1.5 * 2 / 5 + 1e-6
    assert offsets[..., 1].abs().max() <= 1.5 * 2 / 3 + 1e-6
    assert offsets[..., 0].abs().max() > 1.4 * 2 / 5  # the bound is reached, not just kept


# --------------------------------------------------------------------------- attention


def test_fused_attention_equals_explicit_softmax_per_head():
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(2, 3, 7, 5, generator=generator, dtype=torch.float64)
    key = torch.randn(2, 3, 11, 5, generator=generator, dtype=torch.float64)
    value = torch.randn(2, 3, 11, 5, generator=generator, dtype=torch.float64)
    expected = torch.empty_like(query)
    for b in range(2):
        for head in range(3):
            scores = query[b, head] @ key[b, head].T / math.sqrt(5)
            expected[b, head] = torch.softmax(scores, dim=1) @ value[b, head]
    torch.testing.assert_close(fused_attention(query, key, value), expected)
    torch.testing.assert_close(explicit_attention(query, key, value), expected)


def test_stream_uses_fused_attention_and_matches_the_explicit_reference():
    model = _model(grid_size=(3, 3)).eval()
    stream = model.streams["microenvironment"]
    assert stream.attend is fused_attention
    batch = _batch()
    genes = batch["genes"][:, GROUPS["microenvironment"]]
    fused = stream(batch["grid"], batch["grid_mask"], genes)["z"]
    stream.attend = explicit_attention
    explicit = stream(batch["grid"], batch["grid_mask"], genes)["z"]
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)


def test_empty_cells_are_left_out_of_the_pooled_embedding():
    model = _model().eval()
    stream = model.streams["tumour"]
    batch = _batch()
    genes = batch["genes"][:, GROUPS["tumour"]]
    tokens = {}
    # the tokens that are pooled: layer-normalised teacher + attention output
    stream.out_norm.register_forward_hook(lambda _m, _i, output: tokens.setdefault("t", output))
    z = stream(batch["grid"], batch["grid_mask"], genes)["z"]
    mask = batch["grid_mask"].flatten(1)
    for b in range(4):
        expected = tokens["t"][b][mask[b] > 0].mean(0)
        torch.testing.assert_close(z[b], expected)
    assert (mask < 1).any()


@pytest.mark.parametrize("residual", [True, False])
def test_the_residual_carries_the_genes_past_the_attention(residual):
    model = _model(residual=residual).eval()
    stream = model.streams["tumour"]
    with torch.no_grad():  # the attention reads nothing: its values are zero
        stream.to_v.weight.zero_()
        stream.to_v.bias.zero_()
    batch = _batch()
    genes = batch["genes"][:, GROUPS["tumour"]]
    z = stream(batch["grid"], batch["grid_mask"], genes)["z"]
    other = stream(batch["grid"], batch["grid_mask"], genes + 1.0)["z"]
    # with the residual the teacher (patch features and genes) still reaches z; without it
    # z is the layer norm of W_o's bias alone
    assert torch.allclose(z, other) is not residual


# --------------------------------------------------------------------------- Ge-Con


def _explicit_gram(rows):
    """Cosine similarities of sample b's own values (all its groups and points), by loops."""
    vectors = [rows[b].flatten().double() for b in range(len(rows))]
    return torch.tensor(
        [[float(F.cosine_similarity(u, v, dim=0)) for v in vectors] for u in vectors],
        dtype=torch.float64,
    )


def test_gram_matrix_is_per_sample_and_follows_a_permutation():
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(3, 2, 4, 2, generator=generator, dtype=torch.float64)
    gram = batch_gram(points)
    torch.testing.assert_close(gram, _explicit_gram(points))
    # the group-major reading of the authors' code mixes samples: another matrix
    mixed = batch_gram(points.transpose(0, 1).reshape(3, -1))
    assert not torch.allclose(gram, mixed, atol=1e-3)
    permutation = torch.tensor([2, 0, 1])
    torch.testing.assert_close(batch_gram(points[permutation]), gram[permutation][:, permutation])
    moved = points.clone()
    moved[1, 1] += 1.0  # sample 1's second group only
    changed = batch_gram(moved) != gram
    assert changed[1].any() and not changed[[0, 2]][:, [0, 2]].any()


def test_gecon_is_the_frobenius_distance_over_the_batch():
    generator = torch.Generator().manual_seed(4)
    genes, points = torch.randn(5, 6, generator=generator), torch.randn(5, 2, 3, 2)
    difference = batch_gram(genes) - batch_gram(points)
    torch.testing.assert_close(gecon_loss(genes, points), difference.pow(2).sum().sqrt() / 5)
    # one sample: both Gram matrices are [[1]]; the value and its gradient stay finite
    single = torch.randn(1, 6, requires_grad=True)
    loss = gecon_loss(single, torch.randn(1, 2, 3, 2))
    loss.backward()
    assert (
        float(loss.detach()) == pytest.approx(0.0, abs=1e-6) and torch.isfinite(single.grad).all()
    )


def test_model_gecon_uses_each_samples_points_and_permutes_with_the_batch():
    model = _model(grid_size=(3, 3)).eval()
    batch = _batch()
    with torch.no_grad():
        out = model.forward_outputs(batch)
        permutation = torch.tensor([3, 1, 0, 2])
        permuted = model.forward_outputs({k: v[permutation] for k, v in batch.items()})
    for subspace in SUBSPACES:
        genes, points = out["gene_embedding"][subspace], out["points"][subspace]
        assert points.shape == (4, 2, 9, 2)
        distance = torch.linalg.matrix_norm(_explicit_gram(genes) - _explicit_gram(points))
        torch.testing.assert_close(out["gecon"][subspace].double(), distance / 4)
        torch.testing.assert_close(permuted["gecon"][subspace], out["gecon"][subspace])
        torch.testing.assert_close(
            batch_gram(permuted["points"][subspace]),
            batch_gram(points)[permutation][:, permutation],
        )


def _grads(loss, modules):
    parameters = [p for module in modules for p in module.parameters()]
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]


def test_gecon_gradient_reaches_gene_encoder_and_offsets_of_its_own_stream():
    model = _model(grid_size=(3, 3)).eval()
    out = model.forward_outputs(_batch())
    tumour, micro = model.streams["tumour"], model.streams["microenvironment"]
    loss = out["gecon"]["tumour"]
    assert all(g.abs().sum() > 0 for g in _grads(loss, [tumour.gene_encoder]))
    assert all(g.abs().sum() > 0 for g in _grads(loss, [tumour.offsets]))
    assert all(g.abs().sum() > 0 for g in _grads(loss, [tumour.teacher]))
    assert all(g.abs().sum() == 0 for g in _grads(loss, [micro, model.classifier]))


def test_loss_adds_weighted_gecon_terms_and_nothing_without_gecon():
    batch = _batch()
    model = _model(alpha=0.3).eval()
    loss, logits, terms = model.loss(batch)
    expected = (
        F.cross_entropy(logits, batch["label"])
        + 0.3 * terms["gecon_tumour"]
        + 0.7 * terms["gecon_microenvironment"]
    )
    torch.testing.assert_close(loss, expected)
    assert float(terms["gecon_tumour"].detach()) > 0
    assert float(terms["gecon_microenvironment"].detach()) > 0

    ablated = _model(alpha=0.3, use_gecon=False).eval()
    loss, logits, terms = ablated.loss(batch)
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["label"]))
    assert not terms["gecon_tumour"].requires_grad  # logged, not trained
    loss.backward()
    with_task_only = [p.grad.clone() for p in ablated.streams["tumour"].offsets.parameters()]
    ablated.zero_grad()
    F.cross_entropy(ablated(batch), batch["label"]).backward()
    for grad, p in zip(with_task_only, ablated.streams["tumour"].offsets.parameters(), strict=True):
        torch.testing.assert_close(grad, p.grad)


def test_survival_loss_is_the_nll_plus_weighted_gecon():
    batch = _batch(n_outputs=4)
    model = _model(task="survival", n_outputs=4, alpha=0.25).eval()
    loss, logits, terms = model.loss(batch)
    assert logits.shape == (4, 4)
    nll = nll_survival_loss(logits, batch["label"], batch["event"], alpha=0.0)
    expected = nll + 0.25 * terms["gecon_tumour"] + 0.75 * terms["gecon_microenvironment"]
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(terms["task"], nll)


def test_branch_logits_split_the_classifier_and_are_detached_in_terms():
    model = _model().eval()
    batch = _batch()
    loss, logits, terms = model.loss(batch)
    out = model.forward_outputs(batch)
    z = torch.cat([out["z"][u] for u in SUBSPACES], dim=1)
    weight, bias = model.classifier.weight, model.classifier.bias
    torch.testing.assert_close(terms["branch_logits_tumour"], z[:, :8] @ weight[:, :8].T + bias / 2)
    torch.testing.assert_close(
        terms["branch_logits_microenvironment"], z[:, 8:] @ weight[:, 8:].T + bias / 2
    )
    torch.testing.assert_close(
        terms["branch_logits_tumour"] + terms["branch_logits_microenvironment"], logits
    )
    assert not terms["branch_logits_tumour"].requires_grad
    torch.testing.assert_close(model(batch), logits)


def test_registered_constructor_builds_the_model():
    model = create_model("ksfusion", in_dim=16, grid_size=(4, 4), heads=2, head_dim=8)
    assert isinstance(model, KSFusion) and model.streams["tumour"].gene_encoder[0].in_features == 59
    assert model.streams["microenvironment"].gene_encoder[0].in_features == 361


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="gene_groups"):
        KSFusion(8, 12, {"tumour": [0]}, 3)
    with pytest.raises(ValueError, match="divisible"):
        KSFusion(6, 12, GROUPS, 3, offset_groups=4)
    with pytest.raises(ValueError, match="indices"):
        KSFusion(8, 12, {"tumour": [0], "microenvironment": [12]}, 3)


# --------------------------------------------------------------------------- CG-Coord


def _conflicting_grad():
    """Rows 0, 2 conflict (negative cosine), row 1 agrees, row 3 has a zero branch."""
    tumour = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, -1.0], [0.0, 0.0]])
    micro = torch.tensor([[-1.0, 1.0], [1.0, 0.0], [-1.0, 3.0], [-1.0, 0.0]])
    return torch.cat([tumour, micro], dim=1), tumour, micro


def test_projection_of_the_less_confident_branch_is_orthogonal_and_applied_once():
    grad, tumour, micro = _conflicting_grad()
    new, projected = coordinate_gradient(grad, 2, 1.0, 2.0)  # tumour is less confident
    assert projected.tolist() == [True, False, True, False]
    new_tumour, new_micro = new[:, :2], new[:, 2:]
    torch.testing.assert_close(new_micro, micro)  # the more confident branch is kept
    for row in (0, 2):
        h = micro[row]
        closed_form = tumour[row] - (tumour[row] @ h) / (h @ h) * h
        torch.testing.assert_close(new_tumour[row], closed_form)
        assert abs(float(new_tumour[row] @ h)) < 1e-6
    torch.testing.assert_close(new_tumour[0], torch.tensor([0.5, 0.5]))  # once, not rescaled
    torch.testing.assert_close(new[[1, 3]], grad[[1, 3]])  # cos >= 0 or zero norm: unchanged


def test_only_the_lower_confidence_branch_moves_and_ties_move_nothing():
    grad, tumour, micro = _conflicting_grad()
    new, projected = coordinate_gradient(grad, 2, 3.0, 0.5)  # microenvironment less confident
    torch.testing.assert_close(new[:, :2], tumour)
    h = tumour[0]
    torch.testing.assert_close(new[0, 2:], micro[0] - (micro[0] @ h) / (h @ h) * h)
    assert projected.tolist() == [True, False, True, False]
    tied, none = coordinate_gradient(grad, 2, 1.5, 1.5)
    torch.testing.assert_close(tied, grad)
    assert not none.any()
    agreeing = torch.cat([tumour.abs(), micro.abs()], dim=1)
    same, none = coordinate_gradient(agreeing, 2, 1.0, 2.0)
    torch.testing.assert_close(same, agreeing)
    assert not none.any()


def test_hook_uses_true_class_confidences_for_classification():
    model = _model().eval()
    batch = _batch(batch_size=6, seed=1)  # a batch whose branch gradients conflict in a row
    loss, _, terms = model.loss(batch)
    loss.backward(retain_graph=True)
    before = model.classifier.weight.grad.clone()
    label = batch["label"].unsqueeze(1)
    sums = [
        float(torch.softmax(terms[f"branch_logits_{u}"], 1).gather(1, label).sum())
        for u in SUBSPACES
    ]
    assert branch_confidences(
        {u: terms[f"branch_logits_{u}"] for u in SUBSPACES}, batch, "classification"
    ) == pytest.approx(sums)
    expected, projected = coordinate_gradient(before, 8, *sums)
    assert projected.any() and not torch.equal(expected, before)
    hook = GradientCoordination("classification")
    hook(model, batch, terms)
    torch.testing.assert_close(model.classifier.weight.grad, expected)
    assert hook.steps == 1 and hook.projected_rows == int(projected.sum())


def _survival_terms(batch):
    """Tumour risk orders the events correctly (C = 1), microenvironment reversed (C = 0)."""
    order = -batch["time"]  # earlier time, higher risk
    tumour = order[:, None].expand(-1, 4) / 4  # higher hazard logits: higher risk
    return {
        "branch_logits_tumour": tumour.clone(),
        "branch_logits_microenvironment": -tumour.clone(),
    }


def test_survival_hook_projects_the_lower_c_index_branch_and_skips_batches_without_events():
    model = _model(task="survival", n_outputs=4)
    grad, _, _ = _conflicting_grad()
    weight_grad = torch.zeros(4, 16)
    weight_grad[:, :2], weight_grad[:, 8:10] = grad[:, :2], grad[:, 2:]
    batch = _batch(batch_size=6, n_outputs=4)
    terms = _survival_terms(batch)
    hook = GradientCoordination("survival")

    model.classifier.weight.grad = weight_grad.clone()
    no_event = dict(batch, event=torch.zeros(6))
    hook(model, no_event, terms)
    torch.testing.assert_close(model.classifier.weight.grad, weight_grad)
    assert hook.skipped == 1 and hook.projected_rows == 0

    hook(model, batch, terms)
    expected, _ = coordinate_gradient(weight_grad, 8, 1.0, 0.0)  # microenvironment is projected
    torch.testing.assert_close(model.classifier.weight.grad, expected)
    assert not torch.equal(expected[:, 8:], weight_grad[:, 8:])
    assert hook.steps == 2 and hook.projected_steps == 1 and hook.projected_rows == 2


# --------------------------------------------------------------------------- learning signal


def _planted_problem(n=48, seed=0):
    """Class 1 has a raised tumour gene program and a raised top-left region in the slide."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % 2
    sign = (2 * label - 1).float()
    genes = torch.randn(n, 12, generator=generator)
    genes[:, :2] += 1.0 * sign[:, None]
    mask = (torch.rand(n, 1, 4, 4, generator=generator) > 0.2).float()
    mask[:, :, :2, :2] = 1.0
    grid = torch.randn(n, 8, 4, 4, generator=generator)
    grid[:, :2, :2, :2] += 1.0 * sign[:, None, None, None]
    grid = grid * mask
    return {
        "patches": grid.flatten(2).transpose(1, 2),
        "grid": grid,
        "grid_mask": mask,
        "genes": genes,
        "label": label,
    }


def test_training_loss_falls_on_a_planted_problem():
    torch.manual_seed(0)
    model = KSFusion(8, 12, GROUPS, 2, grid_size=(4, 4), dropout=0.0, **(TINY | {"head_dim": 8}))
    batch = _planted_problem()
    hook = GradientCoordination("classification")
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, logits, terms = model.loss(batch)
        optimiser.zero_grad()
        loss.backward(retain_graph=True)
        hook(model, batch, terms)
        optimiser.step()
        losses.append(float(terms["task"].detach()))
    model.eval()
    held_out = _planted_problem(seed=1)
    with torch.no_grad():
        accuracy = (model(held_out).argmax(1) == held_out["label"]).float().mean()
    assert losses[-1] < 0.5 * losses[0]
    assert accuracy >= 0.8
    assert hook.steps == 40


# --------------------------------------------------------------------------- data parallel


def _two_process_worker(rank, port, out):
    """One of two gloo processes holding half of a batch of 4: Ge-Con, its gradient and the
    CG-Coord confidences; rank 0 saves them to ``out``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model(task="survival", n_outputs=3, grid_size=(3, 3)).double().eval()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _batch().items()}
    share = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    out_share = model.forward_outputs(share)
    loss = out_share["gecon"]["tumour"]
    weight = model.streams["tumour"].gene_encoder[0].weight
    (grad,) = torch.autograd.grad(loss, [weight])
    dist.all_reduce(grad)  # DDP's average, times the 2 processes
    survival = branch_confidences(out_share["branch_logits"], share, "survival")
    classes = branch_confidences(out_share["branch_logits"], share, "classification")
    if rank == 0:
        torch.save(
            {"gecon": loss.detach(), "grad": grad / 2, "survival": survival, "classes": classes},
            out,
        )
    dist.destroy_process_group()


def test_two_processes_give_the_global_batch_gecon_gradient_and_confidences(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "two.pt"
    # fork: the children inherit the imported modules (a spawned child imports them again)
    mp.start_processes(
        _two_process_worker, args=(port, str(out)), nprocs=2, join=True, start_method="fork"
    )
    two = torch.load(out)

    model = _model(task="survival", n_outputs=3, grid_size=(3, 3)).double().eval()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _batch().items()}
    whole = model.forward_outputs(batch)
    loss = whole["gecon"]["tumour"]
    (grad,) = torch.autograd.grad(loss, [model.streams["tumour"].gene_encoder[0].weight])
    torch.testing.assert_close(two["gecon"], loss.detach())
    torch.testing.assert_close(two["grad"], grad)
    survival = branch_confidences(whole["branch_logits"], batch, "survival")
    classes = branch_confidences(whole["branch_logits"], batch, "classification")
    assert two["survival"] == pytest.approx(survival)
    assert two["classes"] == pytest.approx(classes)
