"""CrossFormer++ (CMUS-Net Tables 5 and 6, CrossFormer++ row): shapes, SDA/LDA grouping,
masked padding against a slow reference, the dynamic position bias, the amplitude cooling
layer's placement, a learning signal, and its use inside the concatenation baseline."""

import itertools

import pytest
import torch
from torch.nn import functional as F

from mmdiag.models import create_model
from mmdiag.models.cmus import CMUSNet, tiny_example
from mmdiag.models.crossformer import (
    CROSSFORMER_SIZES,
    CrossFormerBlock,
    CrossFormerPP,
    CrossFormerSize,
    create_crossformer_encoder,
    from_groups,
    to_groups,
)
from tests.image_classifiers import assert_loss_falls_on_separable_images, random_images

TINY = CROSSFORMER_SIZES["test_crossformerpp"]  # 32 px, widths 32-256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_output_shapes():
    torch.manual_seed(0)
    model = CrossFormerPP(3, size=TINY).eval()
    assert model.forward_features(random_images()).shape == (2, 256) == (2, model.num_features)
    assert model(random_images()).shape == (2, 3)
    assert create_crossformer_encoder("test_crossformerpp")(random_images()).shape == (2, 256)
    with pytest.raises(ValueError, match="32 px"):
        model(random_images(size_px=64))


def test_paper_size_is_crossformerpp_s():
    model = CrossFormerPP(0)  # configs/crossformer_pp/small_patch4_group_const_224.yaml
    assert model.num_features == 512
    groups = [[(b.group, b.long_distance) for b in stage.blocks] for stage in model.layers]
    assert groups[0] == [(4, False), (4, True)] and groups[1] == [(4, False), (4, True)]
    assert set(groups[2]) == {(14, False)} and groups[3] == [(7, False), (7, False)]
    # ACL after every third block of a stage but its last: only stage 3 has some
    cooled = [[i for i, b in enumerate(s.blocks) if hasattr(b, "ex_conv")] for s in model.layers]
    assert cooled == [[], [], [2, 5, 8, 11, 14], []]


@pytest.mark.parametrize(("long_distance", "interval"), [(False, 1), (True, 2)])
def test_grouping_round_trips_and_lda_samples_every_interval(long_distance, interval):
    size, group = 8, 2
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    grid = torch.stack([rows, cols], dim=-1)[None].float()  # (1, 8, 8, 2): coordinates
    groups = to_groups(grid, group, interval, long_distance)
    assert groups.shape == (size * size // group**2, group**2, 2)
    torch.testing.assert_close(from_groups(groups, 1, size, group, interval, long_distance), grid)
    steps = (groups[0, 1] - groups[0, 0]).tolist()
    assert steps == [0.0, float(interval if long_distance else 1)]  # neighbours in a group


def _slow_block_attention(block, tokens):
    """Attention of each group over its non-padding keys only, group by group."""
    batch, _, dim = tokens.shape
    size, res = block.padded_size, block.resolution
    grid = F.pad(tokens.view(batch, res, res, dim), (0, 0, 0, size - res, 0, size - res))
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    valid_grid = ((rows < res) & (cols < res))[None, ..., None].float()
    groups = to_groups(grid, block.group, block.interval, block.long_distance)
    valid = to_groups(valid_grid, block.group, block.interval, block.long_distance)
    attn = block.attn
    heads, bias = attn.num_heads, attn.position_bias()
    n_groups = valid.shape[0]
    out = torch.zeros_like(groups)
    for index in range(groups.shape[0]):
        keep = valid[index % n_groups, :, 0] > 0
        q, k, v = attn.qkv(groups[index]).view(-1, 3, heads, dim // heads).permute(1, 2, 0, 3)
        scores = q @ k.transpose(1, 2) / (dim // heads) ** 0.5 + bias
        weights = scores[:, :, keep].softmax(dim=-1)
        out[index] = attn.proj((weights @ v[:, keep]).transpose(0, 1).reshape(-1, dim))
    grid = from_groups(out, batch, size, block.group, block.interval, block.long_distance)
    return grid[:, :res, :res].reshape(batch, -1, dim)


@pytest.mark.parametrize("long_distance", [False, True])
def test_padded_keys_are_masked_as_a_slow_reference(long_distance):
    torch.manual_seed(0)
    block = CrossFormerBlock(
        8,
        6,  # 6 x 6 map: groups of 4 (SDA) or 4 x interval 2 (LDA) need padding to 8
        2,
        group=4 if not long_distance else 2,
        interval=2,
        long_distance=long_distance,
        amplitude_cooling=False,
        drop_path=0.0,
    ).eval()
    assert block.padded_size == 8 and block.attn_mask is not None
    tokens = torch.randn(2, 36, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(block.attention(tokens), _slow_block_attention(block, tokens))


def test_dynamic_position_bias_depends_on_the_relative_offset_only():
    torch.manual_seed(0)
    block = CrossFormerBlock(
        16, 4, 2, group=4, interval=1, long_distance=False, amplitude_cooling=False, drop_path=0
    )
    with torch.no_grad():
        bias = block.attn.position_bias()  # (heads, 16, 16)
    coords = list(itertools.product(range(4), range(4)))
    by_offset = {}
    for (i, a), (j, b) in itertools.product(enumerate(coords), repeat=2):
        offset = (a[0] - b[0], a[1] - b[1])
        by_offset.setdefault(offset, bias[:, i, j])
        torch.testing.assert_close(bias[:, i, j], by_offset[offset])
    assert len(by_offset) == 7 * 7


def test_loss_falls_on_a_separable_problem():
    torch.manual_seed(0)
    assert_loss_falls_on_separable_images(CrossFormerPP(2, size=TINY), lr=1e-3)


def test_crossformer_encoders_inside_the_concatenation_baseline(tmp_path):
    _, batch = tiny_example()
    torch.manual_seed(0)
    model = create_model("cmus_concat", num_classes=3, encoder="test_crossformerpp", hidden_dim=8)
    assert all(isinstance(e, CrossFormerPP) for e in model.encoders.values())
    assert model.num_features == 3 * 256
    logits = model(batch)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    F.cross_entropy(logits, batch["label"]).backward()
    for modality, encoder in model.encoders.items():
        parameters = list(encoder.parameters())
        learning = [p for p in parameters if p.grad is not None and p.grad.abs().sum() > 0]
        # all but the position bias of the last stage, whose 1 x 1 map has a single offset
        assert len(learning) > 0.9 * len(parameters), modality
    path = tmp_path / "crossformerpp.pt"
    torch.save({"model": model.encoders["TEM"].state_dict()}, path)  # the authors' layout
    loaded = create_model(
        "cmus_concat",
        encoder="test_crossformerpp",
        modalities=["TEM"],
        hidden_dim=8,
        checkpoint=str(path),
    )
    for name, tensor in loaded.encoders["TEM"].state_dict().items():
        torch.testing.assert_close(tensor, model.encoders["TEM"].state_dict()[name], msg=name)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="crossformerpp_small"):
        create_crossformer_encoder("crossformerpp_huge")
    with pytest.raises(ValueError, match="num_classes"):
        CrossFormerPP(-1, size=TINY)
    with pytest.raises(ValueError, match="img_size_px"):
        CrossFormerPP(0, size=CrossFormerSize(img_size_px=48))
    with pytest.raises(ValueError, match="cmus_concat"):
        CMUSNet(encoder="test_crossformerpp")
