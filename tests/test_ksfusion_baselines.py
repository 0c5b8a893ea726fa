"""The comparison methods of the subspace-fusion paper: Nyström attention, PPEG, gated
attention, bilinear fusion, MCAT's co-attention, CMTA's loss, survival losses and a learning
signal for every model."""

import math

import pytest
import torch
from torch.nn import functional as F

from mmdiag.models import create_model, list_models, registered_model
from mmdiag.models.genomic import task_loss
from mmdiag.models.ksfusion_baselines import (
    CMTA,
    MCAT,
    PPEG,
    AttMIL,
    BilinearFusion,
    GatedAttentionPool,
    NystromAttention,
    TransMIL,
    TransMILEncoder,
    iterative_pinv,
    kronecker_fusion,
    nystrom_attention,
    square_pad,
)
from mmdiag.training.survival import nll_survival_loss

NAMES = [
    "attmil",
    "transmil",
    "snn",
    "concat_fusion",
    "add_fusion",
    "bilinear_fusion",
    "mcat",
    "cmta",
]
GROUPS = {"a": [0, 1, 2], "b": [3, 4, 5, 6], "c": [7, 8, 9, 10, 11]}


def test_every_table_row_is_registered():
    assert set(NAMES) <= set(list_models("ksfusion"))


# ------------------------------------------------------------------------- Nyström


def _smooth_tokens(n, seed=0):
    """q, k, v (2, 2, n, 8) that vary smoothly along the sequence (as neighbouring patches)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, n)[:, None]
    freqs = torch.randn(3, 2, 2, 1, 8, generator=generator) * 2
    phase = torch.rand(3, 2, 2, 1, 8, generator=generator) * 6
    noise = 0.05 * torch.randn(3, 2, 2, n, 8, generator=generator)
    return (2 * torch.sin(3 * freqs * t + phase) + noise).unbind(0)


def test_iterative_pinv_matches_the_pseudo_inverse():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.softmax(2 * torch.randn(3, 6, 6, generator=generator), -1)
    matrix = matrix.double()
    assert torch.allclose(iterative_pinv(matrix, 30), torch.linalg.pinv(matrix), atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 16, 33])
def test_nystrom_with_a_landmark_per_token_is_softmax_attention(n):
    q, k, v = torch.randn(3, 2, 2, n, 8, generator=torch.Generator().manual_seed(n)).unbind(0)
    exact = F.scaled_dot_product_attention(q, k, v)
    approx = nystrom_attention(q, k, v, n_landmarks=n, pinv_iterations=20)
    assert torch.allclose(approx, exact, atol=1e-3)
    # more landmarks than tokens: one per token, still exact (no zero tokens enter the softmax)
    assert torch.allclose(nystrom_attention(q, k, v, 4 * n, 20), exact, atol=1e-3)


def test_nystrom_is_exact_when_every_segment_repeats_one_token():
    q, k, v = torch.randn(3, 2, 2, 16, 8, generator=torch.Generator().manual_seed(1)).unbind(0)
    q, k, v = (t.repeat_interleave(2, dim=-2) for t in (q, k, v))  # 32 tokens, pairs
    exact = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(nystrom_attention(q, k, v, 16, pinv_iterations=20), exact, atol=1e-3)
    # but not with fewer landmarks than distinct tokens
    assert not torch.allclose(nystrom_attention(q, k, v, 4, pinv_iterations=20), exact, atol=1e-2)


def test_nystrom_approximates_attention_and_improves_with_landmarks():
    n = 61  # not a multiple of the segment length: front padding is masked
    q, k, v = _smooth_tokens(n)
    exact = F.scaled_dot_product_attention(q, k, v)
    uniform = (exact - v.mean(-2, keepdim=True)).norm() / exact.norm()
    errors = [
        ((nystrom_attention(q, k, v, m, 6) - exact).norm() / exact.norm()).item()
        for m in (4, 8, 16)
    ]
    assert uniform > 0.3
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.1 and errors[2] < 0.03
    assert nystrom_attention(q, k, v, 8, 6).shape == q.shape


def test_nystrom_module_without_residual_is_multi_head_softmax_attention():
    torch.manual_seed(0)
    layer = NystromAttention(16, heads=2, n_landmarks=32, pinv_iterations=20, residual=False)
    layer.eval()
    x = torch.randn(3, 10, 16)
    q, k, v = layer.qkv(x).reshape(3, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
    reference = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 10, 16)
    assert torch.allclose(layer(x), layer.proj(reference), atol=1e-4)
    with_residual = NystromAttention(16, heads=2, n_landmarks=4)
    assert with_residual(x).shape == x.shape


# ---------------------------------------------------------------------------- PPEG


def test_square_pad_repeats_the_first_tokens():
    tokens = torch.randn(2, 7, 5)
    padded, side = square_pad(tokens)
    assert side == 3 and padded.shape == (2, 9, 5)
    assert torch.equal(padded[:, :7], tokens) and torch.equal(padded[:, 7:], tokens[:, :2])
    tiny, side = square_pad(torch.randn(1, 2, 5))  # fewer tokens than the padding
    assert side == 2 and tiny.shape == (1, 4, 5)


def test_ppeg_keeps_the_class_token_and_the_shape_and_acts_locally():
    torch.manual_seed(0)
    ppeg = PPEG(4)
    tokens, side = square_pad(torch.randn(2, 7, 4))  # non-square N = 7 -> 3 x 3
    x = torch.cat([torch.randn(2, 1, 4), tokens], dim=1)
    out = ppeg(x, side, side)
    assert out.shape == x.shape and torch.equal(out[:, 0], x[:, 0])
    assert not torch.allclose(out[:, 1:], x[:, 1:])
    # a 5 x 5 grid, row-major: changing the token at (0, 0) moves only tokens within 3 cells
    x = torch.randn(1, 26, 4)
    y = x.clone()
    y[0, 1] += 1.0
    changed = (ppeg(x, 5, 5) - ppeg(y, 5, 5)).abs().sum(-1)[0, 1:].reshape(5, 5) > 0
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    assert torch.equal(changed, (rows <= 3) & (cols <= 3))
    for conv in (ppeg.proj7, ppeg.proj5, ppeg.proj3):  # without the convolutions: identity
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    assert torch.allclose(ppeg(x, 5, 5), x)


def test_transmil_encoder_reads_out_a_separate_class_token():
    torch.manual_seed(0)
    encoder = TransMILEncoder(16, heads=2, n_landmarks=4).eval()
    tokens = torch.randn(2, 7, 16)
    class_token, patch_tokens = encoder(tokens)
    assert class_token.shape == (2, 16) and patch_tokens.shape == (2, 7, 16)
    assert not torch.allclose(class_token, patch_tokens[:, 0], atol=1e-3)
    with torch.no_grad():
        encoder.class_token.add_(torch.randn(16))
    assert not torch.allclose(encoder(tokens)[0], class_token, atol=1e-3)


def test_transmil_takes_a_non_square_bag():
    model = TransMIL(8, 3, dim=16, heads=2, n_landmarks=4).eval()
    logits = model({"patches": torch.randn(2, 7, 8)})
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


# ----------------------------------------------------------------- gated attention


def test_gated_attention_weights_sum_to_one_and_attmil_ignores_patch_order():
    torch.manual_seed(0)
    pool = GatedAttentionPool(6, 4)
    tokens = torch.randn(3, 11, 6)
    pooled, weights = pool(tokens)
    assert weights.shape == (3, 11) and (weights > 0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(3))
    assert torch.allclose(pooled, (weights[..., None] * tokens).sum(1), atol=1e-6)
    model = AttMIL(6, 3, hidden_dim=16, attention_dim=8, rho_dim=8).eval()
    order = torch.randperm(11)
    outputs = model.forward_outputs({"patches": tokens})
    shuffled = model.forward_outputs({"patches": tokens[:, order]})
    assert torch.allclose(outputs["logits"], shuffled["logits"], atol=1e-5)
    assert torch.allclose(outputs["attention"][:, order], shuffled["attention"], atol=1e-6)


# ----------------------------------------------------------------- bilinear fusion


def _bilinear_by_hand(fusion, x1, x2):
    """BilinearFusion of one case with explicit sums (eval mode: no dropout)."""

    def linear(layer, x):
        return [
            sum(layer.weight[o, i] * x[i] for i in range(len(x))) + layer.bias[o]
            for o in range(layer.out_features)
        ]

    def bilinear(layer, a, b):
        return [
            sum(a[i] * layer.weight[o, i, j] * b[j] for i in range(len(a)) for j in range(len(b)))
            + layer.bias[o]
            for o in range(layer.out_features)
        ]

    def relu(values):
        return [max(value, 0.0) for value in values]

    def gated(h_layer, z_layer, o_layer, x):
        h = relu(linear(h_layer, x))
        z = [1 / (1 + math.exp(-value)) for value in bilinear(z_layer, x1, x2)]
        return relu(linear(o_layer, [zi * hi for zi, hi in zip(z, h, strict=True)]))

    o1 = gated(fusion.linear_h1[0], fusion.linear_z1, fusion.linear_o1[0], x1)
    o2 = gated(fusion.linear_h2[0], fusion.linear_z2, fusion.linear_o2[0], x2)
    kronecker = [a * b for a in [*o1, 1.0] for b in [*o2, 1.0]]
    encoded = relu(linear(fusion.encoder1[0], kronecker))
    return o1, o2, relu(linear(fusion.encoder2[0], encoded + x1 + x2))


def test_kronecker_fusion_keeps_unimodal_terms_and_products():
    first, second = torch.tensor([[2.0, 3.0]]), torch.tensor([[5.0, 7.0, 11.0]])
    expected = torch.tensor([[10.0, 14, 22, 2, 15, 21, 33, 3, 5, 7, 11, 1]])
    assert torch.equal(kronecker_fusion(first, second), expected)
    # a zero vector leaves only the other modality and the constant
    assert torch.equal(
        kronecker_fusion(first, torch.zeros(1, 3)),
        torch.tensor([[0, 0, 0, 2.0] + [0, 0, 0, 3] + [0, 0, 0, 1]]),
    )


@pytest.mark.parametrize("zero_genes", [False, True])
def test_bilinear_fusion_matches_the_hand_computed_formula(zero_genes):
    torch.manual_seed(0)
    fusion = BilinearFusion(3, 2, 1, 1, mmhid=6, dropout=0.5).double().eval()
    x1 = torch.randn(4, 3, dtype=torch.float64)
    x2 = torch.zeros(4, 2, dtype=torch.float64) if zero_genes else torch.randn(4, 2).double()
    with torch.no_grad():
        o1, o2 = fusion.gated(x1, x2)
        out = fusion(x1, x2)
        for case in range(4):
            expected = _bilinear_by_hand(fusion, x1[case].tolist(), x2[case].tolist())
            for got, want in zip((o1, o2, out), expected, strict=True):
                assert torch.allclose(got[case], torch.tensor(want).double())
    assert o1.abs().sum() > 0 and o2.abs().sum() > 0 and out.abs().sum() > 0


def test_bilinear_fusion_is_not_additive_in_its_modalities():
    torch.manual_seed(0)
    fusion = BilinearFusion(8, 8, 2, 2, mmhid=8, skip=False).eval()
    a, a2, b, b2 = torch.randn(4, 16, 8).unbind(0)
    interaction = fusion(a, b) - fusion(a, b2) - fusion(a2, b) + fusion(a2, b2)
    assert interaction.abs().max() > 1e-3


# ---------------------------------------------------------------------------- MCAT


def _token_batch(n_patches=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "patches": torch.randn(4, n_patches, 8, generator=generator),
        "genes": torch.randn(4, 12, generator=generator),
        "label": torch.tensor([0, 1, 2, 3]),
        "event": torch.tensor([1.0, 0.0, 1.0, 0.0]),
        "time": torch.tensor([1.0, 5.0, 9.0, 20.0]),
    }


def test_mcat_has_one_genomic_token_per_group_and_normalised_coattention():
    torch.manual_seed(0)
    model = MCAT(8, GROUPS, 4, dim=16, gene_hidden_dims=(16,), heads=2, ffn_dim=32).eval()
    batch = _token_batch(n_patches=9)
    outputs = model.forward_outputs(batch)
    assert outputs["gene_tokens"].shape == (4, 3, 16)
    assert outputs["coattention"].shape == (4, 3, 9)
    assert torch.allclose(outputs["coattention"].sum(-1), torch.ones(4, 3), atol=1e-6)
    assert torch.allclose(outputs["patch_attention"].sum(-1), torch.ones(4), atol=1e-6)
    assert outputs["logits"].shape == (4, 4)
    # genes outside a group do not move its token
    other = dict(batch, genes=batch["genes"].clone())
    other["genes"][:, GROUPS["b"]] += 1.0
    changed = (model.forward_outputs(other)["gene_tokens"] - outputs["gene_tokens"]).abs()
    assert torch.equal(changed.sum(-1).gt(0).any(0), torch.tensor([False, True, False]))


def test_mcat_and_cmta_need_gene_groups():
    for model in (MCAT, CMTA):
        with pytest.raises(ValueError, match="gene_groups"):
            model(8, None, 4)


# ---------------------------------------------------------------------------- CMTA


@pytest.mark.parametrize("task", ["survival", "classification"])
def test_cmta_loss_is_task_loss_plus_half_the_l1_alignment(task):
    torch.manual_seed(0)
    model = CMTA(8, GROUPS, 4, task, dim=16, gene_hidden_dims=(16,), heads=2, n_landmarks=4)
    model.eval()
    batch = _token_batch()
    loss, logits, terms = model.loss(batch)
    outputs = model.forward_outputs(batch)
    l1_path = (outputs["path_translated"] - outputs["path_encoded"]).abs().mean()
    l1_genes = (outputs["gene_translated"] - outputs["gene_encoded"]).abs().mean()
    expected = task_loss(outputs["logits"], batch, task) + 0.5 * (l1_path + l1_genes)
    assert l1_path > 0 and l1_genes > 0
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(logits, outputs["logits"])
    assert set(terms) == {"task", "path_alignment", "gene_alignment"}
    assert torch.allclose(terms["path_alignment"], 0.5 * l1_path, atol=1e-6)


def test_cmta_alignment_does_not_pull_the_encoded_target():
    torch.manual_seed(0)
    model = CMTA(8, GROUPS, 4, dim=16, gene_hidden_dims=(16,), heads=2, n_landmarks=4).eval()
    outputs = model.forward_outputs(_token_batch())
    terms = model.auxiliary_terms(outputs, _token_batch())
    (grad,) = torch.autograd.grad(
        terms["path_alignment"], outputs["path_encoded"], allow_unused=True
    )
    assert grad is None


# ------------------------------------------------------------------------ survival


@pytest.mark.parametrize("name", NAMES)
def test_survival_loss_is_the_discrete_time_nll(name):
    kwargs, batch = registered_model(name).example()
    kwargs = {**kwargs, "task": "survival", "n_outputs": 4}
    batch = {**batch, "label": torch.tensor([0, 3, 1, 2])}
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    loss, logits, terms = model.loss(batch)
    expected = nll_survival_loss(logits, batch["label"], batch["event"], alpha=0.0)
    auxiliary = sum(value for key, value in terms.items() if key != "task")
    assert logits.shape == (4, 4)
    assert torch.allclose(terms["task"], expected)
    assert torch.allclose(loss, expected + auxiliary, atol=1e-6)
    assert (auxiliary > 0) == (name == "cmta")
    with pytest.raises(ValueError, match="class weights"):
        model.loss(batch, class_weight=torch.ones(4))


# ----------------------------------------------------------------- learning signal


def _synthetic(n_cases=32, seed=0):
    """Label 1 has gene 0 high and 3 of its 9 patches shifted along feature 0."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.arange(n_cases) % 2
    patches = torch.randn(n_cases, 9, 8, generator=generator)
    shifted = torch.rand(n_cases, 9, generator=generator).argsort(1)[:, :3]
    shift = torch.zeros(n_cases, 9)
    shift.scatter_(1, shifted, 3.0)
    patches[..., 0] += shift * label[:, None]
    genes = torch.randn(n_cases, 12, generator=generator)
    genes[:, 0] += 2.0 * (2 * label - 1)
    return {
        "patches": patches,
        "genes": genes,
        "label": label,
        "event": torch.ones(n_cases),
        "time": torch.ones(n_cases),
    }


@pytest.fixture
def one_thread():
    """Tiny models step faster on one thread than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_every_model_learns_a_tiny_problem(name, one_thread):
    kwargs, _ = registered_model(name).example()
    kwargs = {**kwargs, "task": "classification", "n_outputs": 2}
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    batch = _synthetic()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimiser.zero_grad()
        model.loss(batch)[0].backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(batch).argmax(1) == batch["label"]).float().mean()
    assert accuracy >= 0.85, f"{name}: training accuracy {accuracy:.2f}"
